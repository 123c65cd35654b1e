"""LongBench scoring, equivalent to the official scorer (THUDM/LongBench `eval.py` + `metrics.py`).

Per example, a task's metric is taken against every reference answer and the maximum is kept; for
trec, triviaqa and samsum only the first line of the prediction (after leading newlines) is scored.
A task's score is `round(100 * mean(example scores), 2)`. English tasks only.

Metrics (each returns a float in [0, 1]):
  qa_f1: token F1 after SQuAD-style normalisation (lowercase, no punctuation, no a/an/the).
  rouge: ROUGE-L F of the `rouge` package (sentences split on "."), 0 when it fails (e.g. empty).
  classification: 1/|matches| when the ground truth is among the class names found in the
    prediction.
  retrieval: the fraction of numbers in the prediction equal to the ground truth's "Paragraph N".
  count: the fraction of numbers in the prediction equal to the ground truth.
  code_sim: edit similarity (thefuzz/fuzzywuzzy `ratio`, an integer percent) of the first line
    free of '`', '#' and '//'.
"""

from __future__ import annotations

import collections
import functools
import re
import string
from typing import Callable, Iterable, Mapping, Sequence

import rapidfuzz.fuzz
import rouge

Metric = Callable[[str, str], float]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"\d+")
_PARAGRAPH_ID = re.compile(r"Paragraph (\d+)")
_PUNCTUATION = frozenset(string.punctuation)
# Lines holding any of these are skipped by code_sim (comments and markdown fences).
_CODE_SKIP_MARKERS = ("`", "#", "//")
# Tasks whose prediction is cut to its first line before scoring.
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum"})
# Chinese-language LongBench tasks; their scorers (jieba-based) are not implemented.
CHINESE_TASKS = frozenset({"multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"})


def normalize_answer(text: str) -> str:
  """Lowercases, drops ASCII punctuation and the articles a/an/the, collapses whitespace."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def qa_f1_score(prediction: str, ground_truth: str) -> float:
  """Token-level F1 (multiset overlap) between the normalised prediction and ground truth."""
  prediction_tokens = normalize_answer(prediction).split()
  truth_tokens = normalize_answer(ground_truth).split()
  num_same = sum((collections.Counter(prediction_tokens)
                  & collections.Counter(truth_tokens)).values())
  if num_same == 0:
    return 0.0
  precision = num_same / len(prediction_tokens)
  recall = num_same / len(truth_tokens)
  return 2 * precision * recall / (precision + recall)


def rouge_l_score(prediction: str, ground_truth: str) -> float:
  """ROUGE-L F of the `rouge` package; 0 where it raises (empty text, too deep a recursion)."""
  try:
    scores = rouge.Rouge(metrics=["rouge-l"]).get_scores(prediction, ground_truth)
  except Exception:  # pylint: disable=broad-except  # The official scorer maps any failure to 0.
    return 0.0
  return scores[0]["rouge-l"]["f"]


def _fraction_equal(numbers: Sequence[str], target: str) -> float:
  """Share of `numbers` equal to `target`; 0 when there are none."""
  if not numbers:
    return 0.0
  return sum(number == target for number in numbers) / len(numbers)


def count_score(prediction: str, ground_truth: str) -> float:
  """Fraction of the digit runs in the prediction that equal the ground truth."""
  return _fraction_equal(_NUMBER.findall(prediction), ground_truth)


def retrieval_score(prediction: str, ground_truth: str) -> float:
  """Fraction of the digit runs in the prediction equal to N of the ground truth "Paragraph N"."""
  match = _PARAGRAPH_ID.search(ground_truth)
  if match is None:
    raise ValueError(f"retrieval ground truth must contain 'Paragraph <number>': {ground_truth=}")
  return _fraction_equal(_NUMBER.findall(prediction), match.group(1))


def code_sim_score(prediction: str, ground_truth: str) -> float:
  """Edit similarity of the first prediction line free of '`', '#', '//' (or "" if none).

  The similarity is thefuzz's/fuzzywuzzy's `fuzz.ratio` (rapidfuzz's Indel ratio rounded to an
  integer percent with Python's `round`) divided by 100.
  """
  lines = prediction.lstrip("\n").split("\n")
  code_line = next(
      (line for line in lines if not any(marker in line for marker in _CODE_SKIP_MARKERS)), "")
  return int(round(rapidfuzz.fuzz.ratio(code_line, ground_truth))) / 100


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str]) -> float:
  """1/len(matches) if the ground truth is among the matched class names, else 0.

  Matches are the classes occurring as substrings of the prediction, minus those that are a proper
  substring of the ground truth. As in the official scorer, which removes from the list while
  iterating over it, the match right after a removed one is not examined (and so kept).
  """
  matches = [name for name in all_classes if name in prediction]
  i = 0
  while i < len(matches):
    if matches[i] in ground_truth and matches[i] != ground_truth:
      del matches[i]
    i += 1
  return 1.0 / len(matches) if ground_truth in matches else 0.0


TASK_METRICS: dict[str, Callable[..., float]] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "triviaqa": qa_f1_score,
    "gov_report": rouge_l_score,
    "qmsum": rouge_l_score,
    "multi_news": rouge_l_score,
    "samsum": rouge_l_score,
    "trec": classification_score,
    "passage_retrieval_en": retrieval_score,
    "passage_count": count_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}


def check_task(task: str) -> None:
  """Raises ValueError unless `task` is an English LongBench task this module scores."""
  if task in CHINESE_TASKS:
    raise ValueError(f"{task=} is a Chinese LongBench task; only English tasks are supported: "
                     f"{sorted(TASK_METRICS)}")
  if task not in TASK_METRICS:
    raise ValueError(f"unknown LongBench {task=}; expected one of {sorted(TASK_METRICS)}")


def task_metric(task: str, all_classes: Sequence[str] | None = None) -> Metric:
  """The metric `(prediction, ground_truth) -> [0, 1]` of `task` (trec needs `all_classes`)."""
  check_task(task)
  metric = TASK_METRICS[task]
  if metric is classification_score:
    if not all_classes:
      raise ValueError(f"{task=} is scored by classification and needs all_classes, got "
                       f"{all_classes=}")
    return functools.partial(classification_score, all_classes=all_classes)
  return metric


def score_example(task: str, prediction: str, answers: Sequence[str],
                  all_classes: Sequence[str] | None = None) -> float:
  """Best metric value over the reference `answers` (first line only for FIRST_LINE_TASKS)."""
  metric = task_metric(task, all_classes)
  if not answers:
    raise ValueError(f"{task=}: an example needs at least one reference answer, got {answers=}")
  if task in FIRST_LINE_TASKS:
    prediction = prediction.lstrip("\n").split("\n")[0]
  return max(0.0, *(metric(prediction, answer) for answer in answers))


def score_task(task: str, predictions: Sequence[str], answers: Sequence[Sequence[str]],
               all_classes: Sequence[Sequence[str] | None] | None = None) -> float:
  """Task score: `round(100 * mean(score_example), 2)`; predictions[i] is scored on answers[i]."""
  if not predictions or len(predictions) != len(answers):
    raise ValueError(f"{task=} needs as many predictions as answer lists, at least one: "
                     f"{len(predictions)=}, {len(answers)=}")
  classes = all_classes if all_classes is not None else [None] * len(predictions)
  if len(classes) != len(predictions):
    raise ValueError(f"{task=}: {len(classes)=} must equal {len(predictions)=}")
  total = 0.0
  for prediction, references, example_classes in zip(predictions, answers, classes):
    total += score_example(task, prediction, references, example_classes)
  return round(100 * total / len(predictions), 2)


def score_records(records: Iterable[Mapping]) -> dict[str, float]:
  """Scores records `{task, pred, answers[, all_classes]}` per task: {task: score}, sorted."""
  by_task: dict[str, list[Mapping]] = collections.defaultdict(list)
  for i, record in enumerate(records):
    missing = sorted({"task", "pred", "answers"} - set(record))
    if missing:
      raise ValueError(f"prediction record {i} lacks fields {missing}; it has {sorted(record)}")
    by_task[record["task"]].append(record)
  return {
      task: score_task(task, [r["pred"] for r in task_records],
                       [r["answers"] for r in task_records],
                       [r.get("all_classes") for r in task_records])
      for task, task_records in sorted(by_task.items())
  }
