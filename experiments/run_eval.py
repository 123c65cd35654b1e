"""Accuracy sweeps: methods x KV budgets x tasks on LongBench, RULER-style tasks or many questions.

  python -m experiments.run_eval --benchmark=ruler --tasks=single_needle,kv_lookup \
      --lengths=8192,16384 --num_examples=20 --checkpoint=assets/<model> \
      --tokenizer=assets/tokenizers/llama2_tokenizer.model \
      --methods=dense,squeezed,squeezed_hierarchical,quest,oracle_topk,streaming \
      --kv_budgets=0.5,0.25,0.125,0.0625 --output_dir=/tmp/eval

Benchmarks:
  ruler       `squeezed_jax.eval.ruler_tasks` examples at each of --lengths prompt tokens, one
              question each (`ruler_prompts`: every example of a length has the same shapes).
  multiquery  --num_examples contexts per length, each with --num_questions needles asked in one
              batch (`squeezed_jax.eval.multiquery`): accuracy and amortised time per question.
  longbench   LongBench tasks (`longbench_data`: the hub, or --data_dir with official .jsonl or
              MiniLongBench .json files), official templates split before the question,
              middle-truncated to --max_length tokens, scored by the official metrics.

Each example's fixed context is built once and asked under every method and budget. Predictions go
to <output_dir>/predictions/<task>[_<length>].jsonl, one line per (question, method, budget): a
rerun skips what is there (resuming after a crash) and --overwrite starts afresh; a line is never
written twice. The summary (all records of those files) goes to <output_dir>/<benchmark>.csv,
.md and .png (score against KV budget used).

Compilation: every length compiles the build once and each (method, budget) once (with 21 settings,
about 200 s per length for a 15M-parameter model on one H200); examples then take a few seconds
each. LongBench prompts keep their own lengths, so there every example compiles anew. Runs of one
length each may go in parallel, one GPU each (CUDA_VISIBLE_DEVICES), into one --output_dir;
`--report_only` then writes their joint summary without loading the model.
"""

from __future__ import annotations

import logging
import os
import time

from absl import app, flags

from experiments.cli import launcher

# Spelled out here, so that --help needs no JAX import (checked against the library by a test).
BENCHMARKS = ("ruler", "multiquery", "longbench")
METHODS = ("dense", "squeezed", "squeezed_hierarchical", "quest", "oracle_topk", "streaming")

_BENCHMARK = flags.DEFINE_enum("benchmark", None, BENCHMARKS, "Which benchmark.", required=True)
_TASKS = flags.DEFINE_list("tasks", None, "Tasks (default: all of the benchmark's; multiquery "
                           "has one).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A llama2.c .bin file or a Hugging Face checkpoint directory.",
    required=True)
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "A SentencePiece tokenizer.model or a llama2.c tokenizer .bin. Default: "
    "tokenizer.model inside a Hugging Face checkpoint directory.")
_METHODS = flags.DEFINE_list("methods", ",".join(METHODS), f"Methods, of {METHODS}.")
_KV_BUDGETS = flags.DEFINE_list(
    "kv_budgets", None, "Fractions of the fixed context's KV bytes read per lookup, summaries "
    "included (default 0.5,0.25,0.125,0.0625 unless --percentiles is given; a budget a method's "
    "summaries alone exceed, e.g. quest's at 0.0625, is skipped with a warning).")
_PERCENTILES = flags.DEFINE_list(
    "percentiles", None, "Calibrated fractions of keys to prune (squeezed methods; the baselines "
    "get the KV budget flat squeezed spends there on average). Instead of --kv_budgets.")
_LENGTHS = flags.DEFINE_list("lengths", ["8192", "16384"],
                             "ruler / multiquery: prompt lengths in tokens.")
_NUM_EXAMPLES = flags.DEFINE_integer(
    "num_examples", 10, "Examples per task and length (ruler), contexts per length (multiquery), "
    "first examples per task (longbench; 0 = all).")
_NUM_QUESTIONS = flags.DEFINE_integer("num_questions", 64, "multiquery: questions per context.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 0,
                                   "Questions per generate call (0: all of a context's).")
_QUESTION_TOKENS = flags.DEFINE_integer(
    "question_tokens", 128, "ruler / multiquery: tokens reserved for the user input (the "
    "question, left-padded with the tokens before it).")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 31500,
                                   "longbench: prompts are middle-truncated to this many tokens.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "longbench: a directory of <task>.jsonl (official) or <task>.json "
    "(MiniLongBench) files; default: the THUDM/LongBench hub dataset.")
_CHAT_TEMPLATE = flags.DEFINE_enum("chat_template", "none", ["none", "llama2_chat", "vicuna"],
                                   "longbench: the model family's chat wrapping.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 0,
                                       "Most tokens generated per answer (0: the task's default).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where results go.", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Start the prediction files afresh instead of resuming.")
_SEED = flags.DEFINE_integer("seed", 0, "Example i of a task uses seed + i.")
_OBSERVATION_WINDOW = flags.DEFINE_integer("observation_window", 100,
                                           "Fixed-context tokens never clustered (W).")
_PERCENT_CLUSTERS = flags.DEFINE_float("percent_clusters", 5.0,
                                       "Fine clusters, % of the clustered keys.")
_PERCENT_CLUSTERS_COARSE = flags.DEFINE_float(
    "percent_clusters_coarse", 1.0, "Coarse clusters (squeezed_hierarchical), % of the keys.")
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 512, "Context prefill chunk (tokens).")
_QUESTION_CHUNK = flags.DEFINE_integer("question_chunk", 32, "Question prefill chunk (tokens).")
_BACKEND = flags.DEFINE_enum(
    "backend", None, ["xla", "gpu", "tpu"],
    "Kernel backend of the squeezed methods (default: from the platform).")
_WARMUP = flags.DEFINE_bool("warmup", True, "Run each new shape once untimed before timing it.")
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "Only write the summary of the prediction files already there (e.g. "
    "after runs of single lengths in parallel into one --output_dir); loads no model.")
_COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", None, "A JAX persistent compilation cache directory (speeds up "
    "reruns).")


def _floats(flag: str, values: list[str] | None) -> list[float]:
  try:
    return [float(v) for v in values or []]
  except ValueError as e:
    raise app.UsageError(f"--{flag} must be comma-separated numbers: {e}") from None


def _ints(flag: str, values: list[str]) -> list[int]:
  try:
    return [int(v) for v in values]
  except ValueError as e:
    raise app.UsageError(f"--{flag} must be comma-separated integers: {e}") from None


def _tokenizer_path() -> str:
  if _TOKENIZER.value:
    return _TOKENIZER.value
  candidate = os.path.join(_CHECKPOINT.value, "tokenizer.model")
  if not os.path.isfile(candidate):
    raise app.UsageError("--tokenizer is needed (no tokenizer.model in the checkpoint)")
  return candidate


def _check_flags() -> tuple[list[float], list[float]]:
  """Flag errors caught before anything heavy is imported; returns (kv_budgets, percentiles)."""
  unknown = sorted(set(_METHODS.value) - set(METHODS))
  if unknown:
    raise app.UsageError(f"unknown --methods {unknown}; expected some of {METHODS}")
  if _KV_BUDGETS.value and _PERCENTILES.value:
    raise app.UsageError("give --kv_budgets or --percentiles, not both")
  if _BENCHMARK.value == "multiquery" and _TASKS.value:
    raise app.UsageError("multiquery has a single task; --tasks does not apply")
  kv_budgets = _floats("kv_budgets", _KV_BUDGETS.value)
  percentiles = _floats("percentiles", _PERCENTILES.value)
  if not kv_budgets and not percentiles:
    kv_budgets = [0.5, 0.25, 0.125, 0.0625]
  _ints("lengths", _LENGTHS.value)
  return kv_budgets, percentiles


def _runs(tokenizer):
  """The benchmark's `TaskRun`s from the flags."""
  from squeezed_jax.eval import benchmark_runs, prompt_templates, ruler_tasks

  max_new_tokens = _MAX_NEW_TOKENS.value or None
  if _BENCHMARK.value == "ruler":
    return benchmark_runs.ruler_runs(
        tokenizer, tasks=_TASKS.value or ruler_tasks.TASKS,
        lengths=_ints("lengths", _LENGTHS.value), num_examples=_NUM_EXAMPLES.value,
        seed=_SEED.value, question_tokens=_QUESTION_TOKENS.value, max_new_tokens=max_new_tokens)
  if _BENCHMARK.value == "multiquery":
    return benchmark_runs.multiquery_runs(
        tokenizer, lengths=_ints("lengths", _LENGTHS.value), num_contexts=_NUM_EXAMPLES.value,
        num_questions=_NUM_QUESTIONS.value, seed=_SEED.value,
        question_tokens=_QUESTION_TOKENS.value, max_new_tokens=max_new_tokens)
  return benchmark_runs.longbench_runs(
      tokenizer, tasks=_TASKS.value or list(prompt_templates.LONGBENCH_TEMPLATES),
      source=_DATA_DIR.value, num_examples=_NUM_EXAMPLES.value, max_length=_MAX_LENGTH.value,
      chat_template=_CHAT_TEMPLATE.value, max_new_tokens=max_new_tokens)


def _make_sweep(tokenizer, settings):
  """The model of --checkpoint in a `Sweep` of `settings` (compiles nothing yet)."""
  from models.llama.checkpoint import load_checkpoint
  from squeezed_jax.eval.sweep import Sweep
  from squeezed_jax.fixed_context import ContextConfig

  model, config = load_checkpoint(_CHECKPOINT.value)
  stop_tokens = [config.eos_token_id]
  if os.path.isfile(_CHECKPOINT.value):  # llama2.c models also stop at BOS, as llama2.c does.
    stop_tokens.append(config.bos_token_id)
  return Sweep(model, tokenizer.decode, settings,
               context_config=ContextConfig(
                   percent_clusters=_PERCENT_CLUSTERS.value,
                   percent_clusters_coarse=_PERCENT_CLUSTERS_COARSE.value,
                   observation_window=_OBSERVATION_WINDOW.value,
                   prefill_chunk=_PREFILL_CHUNK.value, seed=_SEED.value),
               stop_tokens=stop_tokens, question_chunk=_QUESTION_CHUNK.value,
               batch_size=_BATCH_SIZE.value, warmup=_WARMUP.value, backend=_BACKEND.value)


@launcher
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  kv_budgets, percentiles = _check_flags()
  import jax

  from models.llama.tokenizer import load_tokenizer
  from squeezed_jax.eval import sweep_report
  from squeezed_jax.eval.results_io import ResultsFile, read_records
  from squeezed_jax.eval.sweep import RECORD_KEY, sweep_settings

  logging.getLogger("squeezed_jax.fixed_context").setLevel(logging.WARNING)
  if _COMPILATION_CACHE_DIR.value:
    jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE_DIR.value)
  started = time.perf_counter()
  settings = sweep_settings(_METHODS.value, kv_budgets=kv_budgets, percentiles=percentiles)
  tokenizer = load_tokenizer(_tokenizer_path())
  runs = _runs(tokenizer)
  sweep = None if _REPORT_ONLY.value else _make_sweep(tokenizer, settings)
  predictions_dir = os.path.join(_OUTPUT_DIR.value, "predictions")
  records = []
  for run in runs:
    path = os.path.join(predictions_dir, f"{run.name}.jsonl")
    if sweep is None:
      records.extend(read_records(path))
      continue
    results = ResultsFile(path, RECORD_KEY, overwrite=_OVERWRITE.value)
    ran = sweep.run(run.ids, run.make_example, results, run.scorer, desc=run.name)
    print(f"{run.name}: {ran} examples run, {len(run.ids) - ran} already done, {len(results)} "
          f"records in {results.path}")
    records.extend(results.records)
  paths = sweep_report.write_report(records, _OUTPUT_DIR.value, _BENCHMARK.value,
                                    title=f"{_BENCHMARK.value}: {_CHECKPOINT.value}")
  with open(paths["markdown"], encoding="utf-8") as f:
    print(f.read())
  print(f"predictions: {predictions_dir}")
  for kind, path in paths.items():
    print(f"{kind}: {path}")
  print(f"total time: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
  app.run(main)
