"""Tests of squeezed_jax.eval.longbench_metrics against hand-computed LongBench scores."""

from __future__ import annotations

import json
import os

import pytest

from squeezed_jax.eval import longbench_metrics as lm
from squeezed_jax.eval.longbench_data import load_longbench

MINI_DIR = os.path.join(os.path.dirname(__file__), "data", "longbench_mini")
TREC_CLASSES = ["Other entity", "Other location", "City", "Country", "Entity"]


def test_normalize_answer_drops_case_punctuation_articles_and_extra_space():
  assert lm.normalize_answer("  The Cat's  hat, an apple & A theory!\n") == "cats hat apple theory"


@pytest.mark.parametrize("prediction, truth, expected", [
    ("The Eiffel Tower.", "eiffel tower", 1.0),
    # 2 common tokens; precision 2/3, recall 2/2 -> F1 = 0.8.
    ("Paris France capital", "Paris, France", 0.8),
    # Counter intersection: "a a b" vs "a b b" shares {a: 1, b: 1}; P = R = 2/3.
    ("x x y", "x y y", 2 / 3),
    ("an answer", "a reply", 0.0),
    ("", "anything", 0.0),
    ("the", "the", 0.0),  # Both normalise to nothing.
])
def test_qa_f1(prediction, truth, expected):
  assert lm.qa_f1_score(prediction, truth) == pytest.approx(expected, abs=1e-12)


def test_rouge_l_sentence_split_and_failures():
  # Hypothesis sentences "Maddie is in Asda" and "John needs some white bread and apples"; the union
  # LCS with the reference is {Maddie, white, bread, and, apples}: P = R = 5/11.
  prediction = "Maddie is in Asda. John needs some white bread and apples."
  truth = "Maddie will buy a white bread and apples on John's request."
  assert lm.rouge_l_score(prediction, truth) == pytest.approx(5 / 11, abs=1e-7)
  assert lm.rouge_l_score("same words here", "same words here") == pytest.approx(1.0, abs=1e-7)
  assert lm.rouge_l_score("", truth) == 0.0
  assert lm.rouge_l_score("...", truth) == 0.0  # No sentence left after splitting on ".".


def test_classification_overlapping_class_names():
  # "Other entity" and "entity" both occur; "entity" is a proper substring of the truth -> dropped.
  classes = ["Other entity", "entity", "City", "Country"]
  assert lm.classification_score("Other entity", "Other entity", classes) == 1.0
  # Matching is case-sensitive: "Entity" is not inside "Other entity", so it stays -> 1/2.
  assert lm.classification_score("Other entity. Entity", "Other entity", TREC_CLASSES) == 0.5
  # "Country" and "City" both match and neither is inside the truth: 1/2.
  assert lm.classification_score("City or Country", "Country", TREC_CLASSES) == 0.5
  assert lm.classification_score("City", "Country", TREC_CLASSES) == 0.0
  assert lm.classification_score("nothing known", "Country", TREC_CLASSES) == 0.0


def test_classification_keeps_official_removal_quirk():
  # The official scorer removes while iterating: dropping "ab" shifts "b" into the slot just
  # examined, so "b" is never checked and stays: matches ["b", "abc"] -> 1/2 (not 1).
  classes = ["ab", "b", "abc"]
  assert lm.classification_score("abc", "abc", classes) == 0.5


@pytest.mark.parametrize("prediction, truth, expected", [
    ("Paragraph 22", "Paragraph 22", 1.0),
    ("Paragraphs 3 and 22, maybe 22", "Paragraph 22", 2 / 3),
    ("it is 122", "Paragraph 22", 0.0),
    ("no number at all", "Paragraph 22", 0.0),
])
def test_retrieval(prediction, truth, expected):
  assert lm.retrieval_score(prediction, truth) == pytest.approx(expected)


def test_retrieval_needs_paragraph_in_truth():
  with pytest.raises(ValueError, match="Paragraph"):
    lm.retrieval_score("3", "22")


@pytest.mark.parametrize("prediction, expected", [
    ("46", 1.0), ("46 or 47", 0.5), ("4 6", 0.0), ("", 0.0),
])
def test_count(prediction, expected):
  assert lm.count_score(prediction, "46") == expected


def test_code_sim_takes_first_line_free_of_fences_and_comments():
  truth = "x = compute(a, b)"
  prediction = "\n\n```python\n# comment\ny = 1  // not code\nx = compute(a, c)\nz = 3"
  # Chosen line "x = compute(a, c)": Indel distance 2 over 34 characters -> 94.12 -> 94.
  assert lm.code_sim_score(prediction, truth) == 0.94
  assert lm.code_sim_score("# only comments\n```", truth) == 0.0
  assert lm.code_sim_score(truth, truth) == 1.0


def test_code_sim_rounds_ratio_to_integer_percent():
  # "ab" vs "abcdefgh": 2 * 2 / 10 = 40 exactly; "abc" vs "abd": 2 * 2 / 6 = 66.67 -> 67.
  assert lm.code_sim_score("ab", "abcdefgh") == 0.4
  assert lm.code_sim_score("abc", "abd") == 0.67


def test_first_line_rule_only_for_trec_triviaqa_samsum():
  prediction = "\n\nParis\nQuestion: what is the capital of Italy? Rome"
  assert lm.score_example("triviaqa", prediction, ["Paris"]) == 1.0
  # Other QA tasks score the whole text: 1 common token out of 8 ("the" dropped) -> F1 = 2/9.
  assert lm.score_example("hotpotqa", prediction, ["Paris"]) == pytest.approx(2 / 9)
  assert lm.score_example("trec", "City\nCountry", ["City"], TREC_CLASSES) == 1.0
  samsum = lm.score_example("samsum", "\nJohn buys bread\nMary sells milk", ["John buys bread"])
  assert samsum == pytest.approx(1.0, abs=1e-7)


def test_max_over_references():
  # "fifty-five" normalises to "fiftyfive" (0); "five" gives P = 1/2, R = 1 -> 2/3.
  assert lm.score_example("narrativeqa", "fifty five", ["55", "fifty-five", "five"]) == 2 / 3
  assert lm.score_example("passage_count", "3 or 4", ["4", "3"]) == 0.5


def test_task_score_is_rounded_mean_times_100():
  # Per-example F1: 1, 0, 2/3 -> 100 * (5/3) / 3 = 55.5555... -> 55.56.
  score = lm.score_task("qasper", ["yes", "no", "x x y"], [["yes"], ["maybe"], ["x y y"]])
  assert score == 55.56


def test_score_records_groups_by_task():
  records = [
      {"task": "trec", "pred": "City", "answers": ["City"], "all_classes": TREC_CLASSES},
      {"task": "passage_count", "pred": "7", "answers": ["7"]},
      {"task": "trec", "pred": "Country", "answers": ["City"], "all_classes": TREC_CLASSES},
  ]
  assert lm.score_records(records) == {"passage_count": 100.0, "trec": 50.0}


@pytest.mark.parametrize("task, match", [("lsht", "Chinese"), ("not_a_task", "unknown")])
def test_unsupported_tasks_raise(task, match):
  with pytest.raises(ValueError, match=match):
    lm.score_example(task, "x", ["x"])


def test_classification_needs_all_classes_and_records_need_fields():
  with pytest.raises(ValueError, match="all_classes"):
    lm.score_example("trec", "City", ["City"])
  with pytest.raises(ValueError, match="lacks fields"):
    lm.score_records([{"task": "lcc", "pred": "x"}])
  with pytest.raises(ValueError, match="at least one"):
    lm.score_task("lcc", [], [])


def _mini_scores(task):
  """Per-example scores of MiniLongBench's stored predictions against their gold answers."""
  examples = load_longbench(task, source=MINI_DIR)
  return [lm.score_example(task, e.prediction, e.answers, e.all_classes) for e in examples]


@pytest.mark.parametrize("task", sorted(
    name.removesuffix(".json") for name in os.listdir(MINI_DIR) if name.endswith(".json")))
def test_mini_longbench_reference_predictions_score_in_range_and_deterministically(task):
  scores = _mini_scores(task)
  assert all(0.0 <= s <= 1.0 for s in scores)
  assert scores == _mini_scores(task)
  examples = load_longbench(task, source=MINI_DIR)
  task_score = lm.score_task(task, [e.prediction for e in examples], [e.answers for e in examples],
                             [e.all_classes for e in examples])
  assert task_score == round(100 * sum(scores) / len(scores), 2)
  assert 0.0 <= task_score <= 100.0


def test_mini_longbench_hand_computed_entries():
  with open(os.path.join(MINI_DIR, "lcc.json"), encoding="utf-8") as f:
    lcc = json.load(f)["25"]
  # First line "\t\tint[]\t\tscoresNeg \t= new int[length];" (38 chars) against the 39-char truth
  # (an extra space, "Tmh" for "Neg"): LCS 35, Indel distance 7 -> 70/77 = 90.9 -> 91.
  assert lm.code_sim_score(lcc["prediction"], lcc["gold"][0]) == 0.91
  # samsum 14: its first line is the rouge example above -> 100 * 5/11 = 45.45.
  samsum = load_longbench("samsum", source=MINI_DIR)
  samsum_score = lm.score_task(
      "samsum", [e.prediction for e in samsum], [e.answers for e in samsum])
  assert samsum_score == 45.45
  # trec 4: first line "Disease and medicine" (a class), truth "Country" -> 0.
  # passage_retrieval_en 2: numbers 30, 10, 1, 1990, truth Paragraph 22 -> 0.
  for task in ("trec", "passage_retrieval_en"):
    assert _mini_scores(task) == [0.0]
