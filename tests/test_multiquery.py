"""Tests of the many-questions-per-context benchmark (`multiquery`), on stories260K end to end."""

from __future__ import annotations

import re

import pytest

from models.llama.tokenizer import load_tokenizer
from squeezed_jax.eval import multiquery, ruler_tasks, sweep, sweep_report
from squeezed_jax.eval.results_io import ResultsFile
from squeezed_jax.fixed_context import ContextConfig

LLAMA2 = load_tokenizer("assets/tokenizers/llama2_tokenizer.model")


@pytest.mark.parametrize("seed", [0, 5])
def test_every_needle_is_asked_once_with_its_value(seed):
  example = multiquery.multiquery_example(LLAMA2, example_id="c", num_tokens=3000,
                                          num_questions=12, seed=seed, question_tokens=96)
  assert len(example.context) == 3000 - 96 and example.context[0] == LLAMA2.bos_id
  assert len(example.questions) == len(example.answers) == 12
  context = LLAMA2.decode(example.context)
  asked = []
  for question, (value,) in zip(example.questions, example.answers):
    text = LLAMA2.decode(question)
    key = re.fullmatch(r"What is the special magic number for (\S+) mentioned in the provided "
                       r"text\? The special magic number for \1 mentioned in the provided text is",
                       text).group(1)
    assert f"The special magic number for {key} is {value}." in context
    assert len(question) <= 96
    asked.append(key)
  assert len(set(asked)) == 12
  assert sum(context.count(f"for {key} is") for key in asked) == 12
  original = ruler_tasks.make_example("multi_key_needle", num_tokens=3000 - 96, tokenizer=LLAMA2,
                                      seed=seed, num_keys=12)
  assert sorted(asked) == sorted(original.metadata["keys"])


def test_a_question_over_its_bucket_is_an_error():
  with pytest.raises(ValueError, match="more than question_tokens=10"):
    multiquery.multiquery_example(LLAMA2, example_id="c", num_tokens=2000, num_questions=3,
                                  seed=0, question_tokens=10)


def test_one_context_many_questions_on_stories(stories, tmp_path):
  model, tokenizer, _ = stories
  example = multiquery.multiquery_example(tokenizer, example_id="mq-0", num_tokens=448,
                                          num_questions=3, seed=1, question_tokens=128,
                                          max_new_tokens=6)
  settings = sweep.sweep_settings(["dense", "squeezed"], kv_budgets=[0.5])
  runner = sweep.Sweep(model, tokenizer.decode, settings, stop_tokens=[1, 2], warmup=False,
                       context_config=ContextConfig(observation_window=32, prefill_chunk=128))
  results = ResultsFile(tmp_path / "multiquery_448.jsonl", sweep.RECORD_KEY)
  scorer = lambda ex, question, prediction: 100.0 * ruler_tasks.ruler_score(
      prediction, ex.answers[question])
  runner.run(["mq-0"], {"mq-0": example}.__getitem__, results, scorer)
  assert len(results) == 6
  for method in ("dense", "squeezed"):
    records = [r for r in results.records if r["method"] == method]
    assert sorted(r["question"] for r in records) == [0, 1, 2]
    assert len({r["seconds"] for r in records}) == 1  # one batched call, amortised
    assert len({r["build_seconds"] for r in records}) == 1
    assert all(r["num_questions"] == 3 and r["context_tokens"] == 320 for r in records)
  rows = {r.method: r for r in sweep_report.summarize(results.records)}
  assert rows["dense"].count == 3 and rows["dense"].task == multiquery.TASK
  assert rows["squeezed"].kv_budget < 0.75
  assert rows["dense"].score == pytest.approx(
      sum(r["score"] for r in results.records if r["method"] == "dense") / 3)
