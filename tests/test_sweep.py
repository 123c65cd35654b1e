"""Tests of the evaluation loop (`sweep`): settings, resume, batching, warm-up, real generation."""

from __future__ import annotations

import dataclasses
import json
import random
import types

import numpy as np
import pytest

from squeezed_jax.attention_methods import MethodConfig
from squeezed_jax.eval import sweep
from squeezed_jax.eval.results_io import ResultsFile
from squeezed_jax.fixed_context import ContextConfig
from squeezed_jax.kv_budget import BudgetTooSmallError
from squeezed_jax.online import Answers, generate


def test_settings_put_dense_once_and_every_other_method_at_every_budget():
  settings = sweep.sweep_settings(["dense", "squeezed", "quest", "dense"],
                                  kv_budgets=[0.25, 0.125])
  assert settings == [sweep.Setting("dense", "dense", 1.0),
                      sweep.Setting("squeezed", "kv_budget", 0.25),
                      sweep.Setting("squeezed", "kv_budget", 0.125),
                      sweep.Setting("quest", "kv_budget", 0.25),
                      sweep.Setting("quest", "kv_budget", 0.125)]
  assert sweep.sweep_settings(["streaming"], percentiles=[0.9]) == [
      sweep.Setting("streaming", "percentile", 0.9)]
  assert sweep.sweep_settings(["dense"]) == [sweep.Setting("dense", "dense", 1.0)]


@pytest.mark.parametrize("kwargs,message", [
    ({"methods": ["squeezed"]}, "need kv_budgets or percentiles"),
    ({"methods": ["squeezed"], "kv_budgets": [0.5], "percentiles": [0.9]}, "not both"),
    ({"methods": ["sparse"], "kv_budgets": [0.5]}, "method 'sparse' must be one of"),
    ({"methods": ["quest"], "kv_budgets": [1.5]}, "budget=1.5 must be in"),
    ({"methods": ["quest"], "percentiles": [1.0]}, "budget=1.0 must be in"),
])
def test_bad_settings_are_errors(kwargs, message):
  methods = kwargs.pop("methods")
  with pytest.raises(ValueError, match=message):
    sweep.sweep_settings(methods, **kwargs)


def test_context_config_calibrates_what_the_settings_need():
  base = ContextConfig(observation_window=16, percentiles=(0.7,))
  flat = sweep.context_config_for(sweep.sweep_settings(["squeezed"], percentiles=[0.95]), base)
  assert not flat.hierarchical and flat.percentiles == (0.7, 0.95)
  assert flat.observation_window == 16
  hierarchical = sweep.context_config_for(
      sweep.sweep_settings(["squeezed_hierarchical"], kv_budgets=[0.25]), base)
  assert hierarchical.hierarchical and hierarchical.percentiles == (0.5, 0.7)


# A fake model stack: `generate` echoes each question's last token back and reports a budget.
class _FakeStack:

  def __init__(self, monkeypatch):
    self.builds, self.calls = 0, []
    monkeypatch.setattr(sweep, "FixedContext", types.SimpleNamespace(build=self._build))
    monkeypatch.setattr(sweep, "generate", self._generate)

  def _build(self, model, token_ids, config):
    self.builds += 1
    return types.SimpleNamespace(num_tokens=len(token_ids), config=config)

  def _generate(self, model, ctx, questions, *, method, max_new_tokens, stop_tokens,
                prefill_chunk, options, **budget):
    self.calls.append((method, len(questions), budget, options))
    if method == "quest" and budget.get("kv_budget", 1.0) < 0.1:
      raise BudgetTooSmallError("kv_budget leaves no rows for quest")
    batch = len(questions)
    fraction = budget.get("kv_budget", 1.0)
    return Answers(token_ids=[[q[-1]] * 2 for q in questions], stopped=[True] * batch,
                   kv_budget=np.full((batch, 2, 3), fraction + 0.01),
                   rows_fraction=np.full((batch, 2, 3), fraction),
                   overflows=np.zeros((batch, 2, 3), np.int32), attention_mass=None,
                   config=MethodConfig("dense"))


def _examples(rng: random.Random, num_examples: int, num_questions: int):
  examples = {}
  for i in range(num_examples):
    questions = [[rng.randrange(3, 500) for _ in range(rng.randrange(2, 6))]
                 for _ in range(num_questions)]
    examples[f"ex{i}"] = sweep.EvalExample(
        id=f"ex{i}", task="toy", length=64,
        context=[1] + [rng.randrange(3, 500) for _ in range(63)],
        questions=questions, answers=[[str(q[-1])] for q in questions], max_new_tokens=4,
        extra={"all_classes": None})
  return examples


def _scorer(example, question, prediction):
  return 100.0 * (prediction == " ".join(example.answers[question] * 2))


def test_loop_batches_resumes_and_records(monkeypatch, tmp_path):
  fake = _FakeStack(monkeypatch)
  examples = _examples(random.Random(0), num_examples=3, num_questions=5)
  settings = sweep.sweep_settings(["dense", "streaming"], kv_budgets=[0.25])
  runner = sweep.Sweep(None, lambda ids: " ".join(map(str, ids)), settings,
                       context_config=ContextConfig(), stop_tokens=[2], batch_size=2,
                       warmup=False)
  results = ResultsFile(tmp_path / "toy.jsonl", sweep.RECORD_KEY)
  assert runner.run(list(examples), examples.__getitem__, results, _scorer) == 3
  assert fake.builds == 3 and len(fake.calls) == 3 * 2 * 3  # 3 batches of <= 2 questions
  assert [c[1] for c in fake.calls[:3]] == [2, 2, 1]
  assert fake.calls[0][2] == {} and fake.calls[3][2] == {"kv_budget": 0.25}
  assert len(results) == 3 * 5 * 2
  record = results.get({"id": "ex1", "question": 4, "method": "streaming",
                        "budget_kind": "kv_budget", "budget": 0.25})
  question = examples["ex1"].questions[4]
  assert record["prediction"] == f"{question[-1]} {question[-1]}" and record["score"] == 100.0
  assert record["kv_budget"] == pytest.approx(0.26) and record["rows_fraction"] == 0.25
  assert record["num_questions"] == 5 and record["context_tokens"] == 64
  assert record["question_tokens"] == len(question) and record["all_classes"] is None
  # Rerun: nothing left. A lost last record of one setting: only that setting is asked again.
  assert runner.run(list(examples), examples.__getitem__, results, _scorer) == 0
  kept = [r for r in results.records if not (r["id"] == "ex2" and r["question"] == 4
                                             and r["method"] == "dense")]
  (tmp_path / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
  results = ResultsFile(tmp_path / "toy.jsonl", sweep.RECORD_KEY)
  fake.calls.clear()
  assert runner.run(list(examples), examples.__getitem__, results, _scorer) == 1
  assert [c[0] for c in fake.calls] == ["dense"] * 3 and len(results) == 30


def test_a_budget_too_small_for_a_method_is_skipped_with_a_warning(monkeypatch, tmp_path):
  fake = _FakeStack(monkeypatch)
  examples = _examples(random.Random(2), num_examples=2, num_questions=2)
  settings = sweep.sweep_settings(["quest", "streaming"], kv_budgets=[0.5, 0.05])
  runner = sweep.Sweep(None, str, settings, context_config=ContextConfig(), stop_tokens=[2],
                       warmup=False)
  results = ResultsFile(tmp_path / "toy.jsonl", sweep.RECORD_KEY)
  with pytest.warns(UserWarning, match="skipped: kv_budget leaves no rows for quest"):
    runner.run(list(examples), examples.__getitem__, results, _scorer)
  done = {(r["method"], r["budget"]) for r in results.records}
  assert done == {("quest", 0.5), ("streaming", 0.5), ("streaming", 0.05)}
  assert len(results) == 2 * 2 * 3


def test_warmup_runs_each_new_shape_once_untimed(monkeypatch, tmp_path):
  fake = _FakeStack(monkeypatch)
  examples = _examples(random.Random(1), num_examples=2, num_questions=1)
  examples["ex1"] = dataclasses.replace(examples["ex1"],
                                        questions=[examples["ex0"].questions[0][:]])
  settings = sweep.sweep_settings(["dense", "quest"], percentiles=[0.75])
  runner = sweep.Sweep(None, str, settings, context_config=ContextConfig(), stop_tokens=[2])
  results = ResultsFile(tmp_path / "toy.jsonl", sweep.RECORD_KEY)
  runner.run(list(examples), examples.__getitem__, results, _scorer)
  assert fake.builds == 3  # the first context length twice, then once
  assert len(fake.calls) == 2 * 2 + 2  # each setting twice for ex0, once for ex1 (same shapes)
  assert fake.calls[-1][2] == {"percentile": 0.75}  # resolved like squeezed's (online)


def test_squeezed_percentiles_get_the_whole_row_capacity(monkeypatch, tmp_path):
  fake = _FakeStack(monkeypatch)
  examples = _examples(random.Random(2), num_examples=1, num_questions=1)
  settings = sweep.sweep_settings(["squeezed"], percentiles=[0.9])
  runner = sweep.Sweep(None, str, settings, context_config=ContextConfig(observation_window=8),
                       stop_tokens=[2], warmup=False, backend="xla")
  runner.run(["ex0"], examples.__getitem__, ResultsFile(tmp_path / "t.jsonl", sweep.RECORD_KEY),
             _scorer)
  (_, _, budget, options), = fake.calls
  assert budget == {"percentile": 0.9}
  assert options.max_rows == 64 - 8 and options.backend == "xla"


def test_real_sweep_on_stories(stories, tmp_path):
  """Dense and squeezed answers of the stories model, as `generate` gives them."""
  model, tokenizer, ids = stories
  rng = random.Random(3)
  context = ids[:300]
  questions = [[rng.randrange(3, 512) for _ in range(n)] for n in (9, 14)]
  example = sweep.EvalExample(id="story", task="story", length=300, context=context,
                              questions=questions, answers=[["Lily"], ["dog"]],
                              max_new_tokens=6)
  settings = sweep.sweep_settings(["dense", "squeezed"], kv_budgets=[0.25])
  config = ContextConfig(observation_window=32, prefill_chunk=128)
  runner = sweep.Sweep(model, tokenizer.decode, settings, context_config=config,
                       stop_tokens=[1, 2], question_chunk=8, warmup=False)
  results = ResultsFile(tmp_path / "story.jsonl", sweep.RECORD_KEY)
  scorer = lambda example, question, prediction: float(len(prediction))
  assert runner.run(["story"], {"story": example}.__getitem__, results, scorer) == 1
  by_method = {m: [r for r in results.records if r["method"] == m] for m in ("dense", "squeezed")}
  assert [len(v) for v in by_method.values()] == [2, 2]
  assert all(r["kv_budget"] == 1.0 for r in by_method["dense"])
  assert all(0.0 < r["kv_budget"] < 0.5 and r["overflows"] == 0 for r in by_method["squeezed"])
  for records in by_method.values():  # one batched call: its time shared by both questions
    assert records[0]["seconds"] == records[1]["seconds"] > 0.0
    assert records[0]["build_seconds"] == records[1]["build_seconds"] > 0.0
  dense = generate(model, sweep.FixedContext.build(model, context, runner.context_config),
                   questions, method="dense", max_new_tokens=6, stop_tokens=[1, 2],
                   prefill_chunk=8)
  for record, token_ids in zip(by_method["dense"], dense.token_ids):
    assert record["prediction"] == tokenizer.decode(token_ids)
    assert record["score"] == len(record["prediction"])
    assert record["generated_tokens"] == len(token_ids)
