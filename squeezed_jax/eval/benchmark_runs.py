"""The examples of each benchmark as `TaskRun`s: a results file name, example ids, a lazy example
maker and a scorer, ready for `sweep.Sweep.run`.

  ruler       `ruler_tasks` examples, one per seed, at each length (`ruler_prompts` shapes).
  multiquery  one context per seed and length, many questions each (`multiquery`).
  longbench   LongBench examples (`longbench_data`), split before the question, chat-wrapped,
              middle-truncated (`prompt_templates`), scored by the official metrics.

Examples are made only when the sweep gets to them (a resumed run skips finished ids without
generating them). The LongBench modules (which need `datasets`, `rouge`, `rapidfuzz`) are imported
only by `longbench_runs`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

from squeezed_jax.eval import multiquery, ruler_prompts, ruler_tasks
from squeezed_jax.eval.haystack import TextTokenizer
from squeezed_jax.eval.sweep import EvalExample, Scorer

BENCHMARKS = ("ruler", "multiquery", "longbench")


@dataclasses.dataclass(frozen=True)
class TaskRun:
  """name: the results file's stem; ids: example ids in order; make_example(id) -> EvalExample."""

  name: str
  ids: list[str]
  make_example: Callable[[str], EvalExample]
  scorer: Scorer


def _string_match_scorer(example: EvalExample, question: int, prediction: str) -> float:
  """RULER's string_match_all, x100."""
  return 100.0 * ruler_tasks.ruler_score(prediction, example.answers[question])


def _seeded_ids(prefix: str, seed: int, num_examples: int) -> dict[str, int]:
  return {f"{prefix}-{s}": s for s in range(seed, seed + num_examples)}


def ruler_runs(tokenizer: TextTokenizer, *, tasks: Sequence[str], lengths: Sequence[int],
               num_examples: int, seed: int = 0, question_tokens: int = 128,
               max_new_tokens: int | None = None) -> list[TaskRun]:
  """One run per (task, length): examples of seeds seed.. seed + num_examples - 1."""
  unknown = sorted(set(tasks) - set(ruler_tasks.TASKS))
  if unknown:
    raise ValueError(f"unknown RULER tasks {unknown}; expected some of {ruler_tasks.TASKS}")
  runs = []
  for task in tasks:
    for length in lengths:
      seeds = _seeded_ids(f"{task}-{length}", seed, num_examples)

      def make(example_id: str, task=task, length=length, seeds=seeds) -> EvalExample:
        example = ruler_tasks.make_example(task, num_tokens=length, tokenizer=tokenizer,
                                           seed=seeds[example_id])
        prompt = ruler_prompts.ruler_prompt(tokenizer, example, num_tokens=length,
                                            question_tokens=question_tokens)
        return EvalExample(
            id=example_id, task=task, length=length, context=prompt.context,
            questions=[prompt.question], answers=[example.answers],
            max_new_tokens=max_new_tokens or ruler_prompts.MAX_NEW_TOKENS[task])

      runs.append(TaskRun(f"{task}_{length}", list(seeds), make, _string_match_scorer))
  return runs


def multiquery_runs(tokenizer: TextTokenizer, *, lengths: Sequence[int], num_contexts: int,
                    num_questions: int, seed: int = 0, question_tokens: int = 128,
                    max_new_tokens: int | None = None) -> list[TaskRun]:
  """One run per length: contexts of seeds seed.. seed + num_contexts - 1."""
  runs = []
  for length in lengths:
    seeds = _seeded_ids(f"{multiquery.TASK}-{length}", seed, num_contexts)

    def make(example_id: str, length=length, seeds=seeds) -> EvalExample:
      return multiquery.multiquery_example(
          tokenizer, example_id=example_id, num_tokens=length, num_questions=num_questions,
          seed=seeds[example_id], question_tokens=question_tokens,
          max_new_tokens=max_new_tokens or multiquery.MAX_NEW_TOKENS)

    runs.append(TaskRun(f"{multiquery.TASK}_{length}", list(seeds), make,
                        _string_match_scorer))
  return runs


def longbench_runs(tokenizer: TextTokenizer, *, tasks: Sequence[str],
                   source: str | os.PathLike[str] | None, num_examples: int, max_length: int,
                   chat_template: str = "none",
                   max_new_tokens: int | None = None) -> list[TaskRun]:
  """One run per task: its first `num_examples` examples (0: all) from `source` (None: hub)."""
  # Imported here: RULER-only machines need not have `datasets`, `rouge` or `rapidfuzz`.
  from squeezed_jax.eval import longbench_data, longbench_metrics, prompt_templates

  for task in tasks:
    longbench_metrics.check_task(task)
  if chat_template not in prompt_templates.CHAT_TEMPLATES:
    raise ValueError(f"unknown {chat_template=}; expected one of "
                     f"{sorted(prompt_templates.CHAT_TEMPLATES)}")

  def scorer(example: EvalExample, question: int, prediction: str) -> float:
    return 100.0 * longbench_metrics.score_example(
        example.task, prediction, example.answers[question], example.extra["all_classes"])

  runs = []
  for task in tasks:
    loaded = longbench_data.load_longbench(task, source=source)
    by_id = {example.id: example for example in loaded[:num_examples or None]}

    def make(example_id: str, task=task, by_id=by_id) -> EvalExample:
      example = by_id[example_id]
      prompt = prompt_templates.apply_chat_template(
          prompt_templates.longbench_prompt(example), task, chat_template)
      ids = prompt_templates.encode_prompt(tokenizer, prompt, max_length)
      return EvalExample(
          id=example_id, task=task, length=max_length, context=ids.context,
          questions=[ids.question], answers=[example.answers],
          max_new_tokens=max_new_tokens or prompt_templates.MAX_NEW_TOKENS[task],
          extra={"all_classes": example.all_classes})

    runs.append(TaskRun(task, list(by_id), make, scorer))
  return runs
