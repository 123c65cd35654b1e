"""The evaluation loop: every example's fixed context built once, then asked under every setting.

A `Setting` is a method at a budget (`kv_budget`: the fraction of the clustered fixed context's
KV bytes a lookup reads, summaries included, or `percentile`: a calibrated pruned fraction; dense
has neither and is recorded at budget 1.0). For
each example the loop builds one `FixedContext` (prefill, clustering, calibration: hierarchical
when any setting needs it) and answers its questions under every setting not yet in the results
file, one record per (question, setting):

    {"id", "question", "num_questions", "task", "length", "method", "budget_kind", "budget",
     "prediction", "answers", "score", "kv_budget", "rows_fraction", "overflows", "seconds",
     "build_seconds", "context_tokens", "question_tokens", "generated_tokens", "stopped", ...}

`kv_budget` is the budget actually used (`Answers.kv_budget`: rows read plus summary vectors, as a
fraction of the clustered fixed context). `seconds` is the wall time of the `generate` call that
answered the question, divided by the questions it answered together (amortised per question);
`build_seconds` the build of the example's context (offline, shown apart).

Timing excludes compilation when `warmup` is on: the first time a shape is met (a context length
for the build; a context length, question batch and setting for `generate`) the call is run once
untimed first. Examples of one length should share their shapes (`ruler_prompts`), so that each
setting compiles once per length.

In percentile mode the squeezed methods keep every cluster above the calibrated threshold (row
capacity = all clustered keys, so nothing overflows) and the baselines get the KV budget the flat
squeezed method spends there on average (`online.resolve_method`). A setting whose budget the
method's summaries alone exceed (e.g. quest's page bounds at a small `kv_budget`) is skipped for
that example with a warning, and no record is written (a rerun tries it again).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax

from models.llama import Llama
from squeezed_jax.attention_methods import METHODS, SQUEEZED_METHODS
from squeezed_jax.eval.results_io import ResultsFile
from squeezed_jax.fixed_context import ContextConfig, FixedContext
from squeezed_jax.kv_budget import BudgetTooSmallError
from squeezed_jax.online import Answers, MethodOptions, generate
from squeezed_jax.progress import progress

BUDGET_KINDS = ("dense", "kv_budget", "percentile")
RECORD_KEY = ("id", "question", "method", "budget_kind", "budget")
# The coarse threshold of squeezed_hierarchical comes from this calibrated percentile.
COARSE_PERCENTILE = MethodOptions().coarse_percentile


@dataclasses.dataclass(frozen=True)
class Setting:
  """A method at one budget: budget_kind "dense" (budget 1.0), "kv_budget" or "percentile"."""

  method: str
  budget_kind: str
  budget: float

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method {self.method!r} must be one of {METHODS}")
    if self.budget_kind not in BUDGET_KINDS:
      raise ValueError(f"{self.budget_kind=} must be one of {BUDGET_KINDS}")
    if (self.method == "dense") != (self.budget_kind == "dense"):
      raise ValueError(f"dense (and only dense) has budget_kind 'dense': got {self}")
    if not 0.0 < self.budget <= 1.0 or (self.budget_kind == "percentile" and self.budget == 1.0):
      raise ValueError(f"{self.budget=} must be in (0, 1] ((0, 1) for a percentile)")


def sweep_settings(methods: Sequence[str], *, kv_budgets: Sequence[float] = (),
                   percentiles: Sequence[float] = ()) -> list[Setting]:
  """Every method at every budget of the one given budget list; dense once, at budget 1.0."""
  if kv_budgets and percentiles:
    raise ValueError(f"give kv_budgets or percentiles, not both: {kv_budgets=}, {percentiles=}")
  kind, budgets = ("percentile", percentiles) if percentiles else ("kv_budget", kv_budgets)
  if not budgets and any(m != "dense" for m in methods):
    raise ValueError(f"{methods=} need kv_budgets or percentiles")
  if not methods:
    raise ValueError("no methods given")
  settings = []
  for method in dict.fromkeys(methods):
    if method == "dense":
      settings.append(Setting("dense", "dense", 1.0))
    else:
      settings.extend(Setting(method, kind, float(b)) for b in dict.fromkeys(budgets))
  return settings


def context_config_for(settings: Sequence[Setting], base: ContextConfig) -> ContextConfig:
  """`base`, hierarchical if a setting needs it, calibrated for every percentile in `settings`."""
  hierarchical = base.hierarchical or any(s.method == "squeezed_hierarchical" for s in settings)
  percentiles = set(base.percentiles) | {s.budget for s in settings
                                         if s.budget_kind == "percentile"}
  if hierarchical:
    percentiles.add(COARSE_PERCENTILE)
  return dataclasses.replace(base, hierarchical=hierarchical, percentiles=tuple(percentiles))


@dataclasses.dataclass(frozen=True)
class EvalExample:
  """One fixed context and the questions asked of it.

  id: unique within its results file. task, length: the report's grouping (length: the prompt
  tokens of RULER-style tasks, max_length for LongBench). context: [S] token ids, BOS first;
  questions: [T_i] token ids each (no BOS), placed right after the context; answers: the
  references of each question; max_new_tokens: greedy decoding stops there or at a stop token;
  extra: more fields copied into every record (e.g. LongBench's all_classes).
  """

  id: str
  task: str
  length: int
  context: list[int]
  questions: list[list[int]]
  answers: list[list[str]]
  max_new_tokens: int
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not self.questions or len(self.questions) != len(self.answers):
      raise ValueError(f"example {self.id!r}: needs as many answer lists as questions, at least "
                       f"one: {len(self.questions)=}, {len(self.answers)=}")


# (example, question index, prediction text) -> score in [0, 100].
Scorer = Callable[[EvalExample, int, str], float]


def _key(example_id: str, question: int, setting: Setting) -> dict[str, Any]:
  return {"id": example_id, "question": question, "method": setting.method,
          "budget_kind": setting.budget_kind, "budget": setting.budget}


def is_done(results: ResultsFile, example_id: str, setting: Setting) -> bool:
  """Whether every question of the example has a record for `setting`."""
  first = results.get(_key(example_id, 0, setting))
  return first is not None and results.has(_key(example_id, first["num_questions"] - 1, setting))


def ask(model: Llama, ctx: FixedContext, questions: Sequence[Sequence[int]], setting: Setting, *,
        max_new_tokens: int, stop_tokens: Sequence[int], question_chunk: int,
        backend: str | None = None) -> Answers:
  """Greedy answers to `questions` under `setting` (see the module docstring for percentiles).

  backend: kernel backend of the squeezed methods (None: from the platform).
  """
  budget: dict[str, Any] = {}
  max_rows = None
  if setting.budget_kind != "dense":
    budget[setting.budget_kind] = setting.budget
  if setting.budget_kind == "percentile" and setting.method in SQUEEZED_METHODS:
    max_rows = ctx.num_tokens - ctx.config.observation_window
  return generate(model, ctx, questions, method=setting.method, max_new_tokens=max_new_tokens,
                  stop_tokens=stop_tokens, prefill_chunk=question_chunk,
                  options=MethodOptions(max_rows=max_rows, backend=backend), **budget)


class Sweep:
  """Runs settings over examples into results files (one `Sweep` per model and settings).

  decode: token ids -> text. question_chunk: question prefill chunk (a fixed chunk keeps the
  compiled shape when question lengths differ a little). batch_size: questions per `generate`
  call (0: all of an example's questions at once). backend: see `ask`.
  """

  def __init__(self, model: Llama, decode: Callable[[list[int]], str],
               settings: Sequence[Setting], *, context_config: ContextConfig,
               stop_tokens: Sequence[int], question_chunk: int = 32, batch_size: int = 0,
               warmup: bool = True, backend: str | None = None):
    if batch_size < 0:
      raise ValueError(f"{batch_size=} must be >= 0 (0: all questions at once)")
    self.model = model
    self.decode = decode
    self.settings = list(settings)
    self.context_config = context_config_for(self.settings, context_config)
    self.stop_tokens = list(stop_tokens)
    self.question_chunk = question_chunk
    self.batch_size = batch_size
    self.warmup = warmup
    self.backend = backend
    self._warm: set[tuple] = set()

  def _timed(self, shape: tuple, call: Callable[[], Any]) -> tuple[Any, float]:
    """(call(), seconds), after an untimed first call if `shape` is new and warmup is on."""
    if self.warmup and shape not in self._warm:
      jax.block_until_ready(call())
      self._warm.add(shape)
    started = time.perf_counter()
    result = jax.block_until_ready(call())
    return result, time.perf_counter() - started

  def run(self, ids: Sequence[str], make_example: Callable[[str], EvalExample],
          results: ResultsFile, scorer: Scorer, *, desc: str = "examples") -> int:
    """Answers the examples of `ids` not yet done; returns how many were run (a progress bar
    with an ETA counts them: `squeezed_jax.progress`)."""
    pending = [i for i in ids if not all(is_done(results, i, s) for s in self.settings)]
    for example_id in progress(pending, desc=desc, unit="example"):
      example = make_example(example_id)
      if example.id != example_id:
        raise ValueError(f"make_example({example_id!r}) returned example {example.id!r}")
      self._run_example(example, results, scorer)
    return len(pending)

  def _run_example(self, example: EvalExample, results: ResultsFile, scorer: Scorer) -> None:
    ctx, build_seconds = self._timed(
        ("build", len(example.context)),
        lambda: FixedContext.build(self.model, example.context, self.context_config))
    for setting in self.settings:
      if is_done(results, example.id, setting):
        continue
      try:
        records = self._ask_all(example, ctx, setting, build_seconds, scorer)
      except BudgetTooSmallError as error:
        warnings.warn(f"example {example.id!r}: {setting} skipped: {error}")
        continue
      for record in records:  # written once all batches are done (see `is_done`)
        results.add(record)

  def _ask_all(self, example: EvalExample, ctx: FixedContext, setting: Setting,
               build_seconds: float, scorer: Scorer) -> list[dict[str, Any]]:
    """The records of every question of `example` under `setting`, asked in batches."""
    size = self.batch_size or len(example.questions)
    records = []
    for start in range(0, len(example.questions), size):
      batch = example.questions[start:start + size]
      shape = ("ask", len(example.context), len(batch), max(map(len, batch)),
               example.max_new_tokens, setting)
      answers, seconds = self._timed(shape, lambda: ask(
          self.model, ctx, batch, setting, max_new_tokens=example.max_new_tokens,
          stop_tokens=self.stop_tokens, question_chunk=self.question_chunk,
          backend=self.backend))
      for row in range(len(batch)):
        records.append(self._record(example, start + row, setting, answers, row,
                                    seconds / len(batch), build_seconds, scorer))
    return records

  def _record(self, example: EvalExample, question: int, setting: Setting, answers: Answers,
              row: int, seconds: float, build_seconds: float, scorer: Scorer) -> dict[str, Any]:
    prediction = self.decode(answers.token_ids[row])
    return {
        **_key(example.id, question, setting),
        "num_questions": len(example.questions), "task": example.task, "length": example.length,
        "prediction": prediction, "answers": list(example.answers[question]),
        "score": float(scorer(example, question, prediction)),
        "kv_budget": float(answers.kv_budget[row].mean()),
        "rows_fraction": float(answers.rows_fraction[row].mean()),
        "overflows": int(answers.overflows[row].sum()),
        "seconds": seconds, "build_seconds": build_seconds,
        "context_tokens": len(example.context),
        "question_tokens": len(example.questions[question]),
        "generated_tokens": len(answers.token_ids[row]), "stopped": answers.stopped[row],
        **example.extra,
    }
