"""Tests of the benchmarks' example makers and scorers (`benchmark_runs`); no model needed."""

from __future__ import annotations

import os

import pytest

from models.llama.tokenizer import load_tokenizer
from squeezed_jax.eval import benchmark_runs, prompt_templates

LLAMA2 = load_tokenizer("assets/tokenizers/llama2_tokenizer.model")
MINI_DIR = os.path.join(os.path.dirname(__file__), "data", "longbench_mini")


def test_ruler_runs_make_fixed_shape_examples_per_task_and_length():
  runs = benchmark_runs.ruler_runs(LLAMA2, tasks=["single_needle", "variable_tracking"],
                                   lengths=[1024, 2048], num_examples=2, seed=7,
                                   question_tokens=96)
  assert [r.name for r in runs] == ["single_needle_1024", "single_needle_2048",
                                    "variable_tracking_1024", "variable_tracking_2048"]
  assert runs[1].ids == ["single_needle-2048-7", "single_needle-2048-8"]
  for run in runs:
    examples = [run.make_example(i) for i in run.ids]
    length = int(run.name.rsplit("_", 1)[1])
    assert {len(e.context) for e in examples} == {length - 96}
    assert {len(e.questions[0]) for e in examples} == {96}
    assert examples[0].context != examples[1].context
    assert examples[0].max_new_tokens == 64
    answers = examples[0].answers[0]
    assert run.scorer(examples[0], 0, " ".join(answers)) == 100.0
    assert run.scorer(examples[0], 0, "no idea") == 0.0
  with pytest.raises(ValueError, match=r"unknown RULER tasks \['niah'\]"):
    benchmark_runs.ruler_runs(LLAMA2, tasks=["niah"], lengths=[1024], num_examples=1)


def test_multiquery_runs_one_context_per_seed():
  (run,) = benchmark_runs.multiquery_runs(LLAMA2, lengths=[2500], num_contexts=2,
                                          num_questions=6, seed=3, question_tokens=96,
                                          max_new_tokens=20)
  assert run.name == "multiquery_2500" and run.ids == ["multiquery-2500-3", "multiquery-2500-4"]
  example = run.make_example(run.ids[1])
  assert len(example.context) == 2500 - 96 and len(example.questions) == 6
  assert example.max_new_tokens == 20
  assert run.scorer(example, 2, f"it is {example.answers[2][0]}.") == 100.0


def test_longbench_runs_from_minilongbench_files():
  runs = benchmark_runs.longbench_runs(LLAMA2, tasks=["trec", "2wikimqa"], source=MINI_DIR,
                                       num_examples=1, max_length=1500,
                                       chat_template="llama2_chat")
  trec, wiki = runs
  assert (trec.name, trec.ids, wiki.ids) == ("trec", ["4"], ["0"])
  example = trec.make_example("4")
  assert len(example.context) + len(example.questions[0]) == 1500
  assert LLAMA2.decode(example.questions[0]).startswith("Question:")
  assert not LLAMA2.decode(example.context).startswith("[INST]")  # few-shot: never chat-wrapped
  assert example.max_new_tokens == prompt_templates.MAX_NEW_TOKENS["trec"]
  assert example.extra["all_classes"] and trec.scorer(example, 0, example.answers[0][0]) == 100.0
  example = wiki.make_example("0")
  assert LLAMA2.decode(example.context).startswith("[INST]")
  assert LLAMA2.decode(example.questions[0]).endswith("Answer:[/INST]")
  assert wiki.scorer(example, 0, example.answers[0][0]) == 100.0
  assert wiki.scorer(example, 0, "unrelated words") == 0.0
  assert len(benchmark_runs.longbench_runs(LLAMA2, tasks=["lcc"], source=MINI_DIR,
                                           num_examples=0, max_length=4000)[0].ids) == 2


@pytest.mark.parametrize("kwargs,message", [
    ({"tasks": ["dureader"]}, "Chinese LongBench task"),
    ({"tasks": ["trec"], "chat_template": "chatml"}, "unknown chat_template='chatml'"),
])
def test_longbench_run_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    benchmark_runs.longbench_runs(LLAMA2, source=MINI_DIR, num_examples=1, max_length=100,
                                  **kwargs)
