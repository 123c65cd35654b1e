"""Time to answer and decode speed of `squeezed_jax.generate`: dense vs squeezed attention.

A LLaMA-2-7B-shaped model with random bf16 weights (shapes are what matter for speed) and a
synthetic clustered fixed context (`pallas_kernels.synthetic`: realistic cluster sizes) of S tokens;
per case: a batch of B random questions of `question_tokens` tokens, answered with N =
`new_tokens` greedy tokens (no stop token). Decode tokens/s = B * (N - n) / (t(N) - t(n)), with
t(n) the median wall time of `repeats` `generate` calls producing n = N // 2 + 1 tokens (one
compiled program serves both: the decode loop's length is traced), after a first (compiling)
call; the prefill
and first token take t(N) - (N - 1) / (decode tokens/s per sequence).

  python -m experiments.bench_generate --seq_lens=32768 --batch_sizes=1,8 --output_json=out.jsonl

With `--mesh=data,heads,context` (e.g. 1,1,2) the model is placed on that device mesh and
`generate(..., mesh=)` runs the fixed-context attention context-parallel; each call then lays the
context out for the mesh first (`relayout_s`, timed alone, is part of time to answer and of the
prefill time, not of the decode rate). `--profile` adds the GPU kernels of one decode token.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from experiments import gpu_trace
from experiments.cli import launcher
from models.llama import PRESETS, Llama
from pallas_kernels import synthetic
from squeezed_jax import online
from squeezed_jax import sharding
from squeezed_jax.attention_methods import OnlineAttention, context_attention
from squeezed_jax.calibration import calibrate_thresholds
from squeezed_jax.context_layers import split_layers
from squeezed_jax.fixed_context import ContextConfig, FixedContext
from squeezed_jax.key_clustering import ClusteredKeys, num_clusters_for

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["32768"], "Fixed-context lengths S.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Questions answered together.")
_BUDGETS = flags.DEFINE_list("kv_budgets", ["0.125", "0.25"],
                             "Squeezed KV budgets (fractions of the clustered fixed context's "
                             "KV bytes, centroids included: rows_fraction is the rows' part).")
_PERCENTILES = flags.DEFINE_list(
    "percentiles", [], "Squeezed pruned fractions (threshold mode; the synthetic context's "
    "thresholds are calibrated on random window queries, so the budget actually read is reported "
    "as `rows_fraction`).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per length (median taken).")
_QUESTION_TOKENS = flags.DEFINE_integer("question_tokens", 512, "Tokens per question.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "Tokens generated per question.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 32, "Layers (32 = LLaMA-2-7B).")
_HIDDEN = flags.DEFINE_integer("hidden_size", 4096, "Model width (4096 = LLaMA-2-7B).")
_WINDOW = flags.DEFINE_integer("window", 100, "Observation window W.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Append one JSON line per case here.")
_MESH = flags.DEFINE_list(
    "mesh", None, "data,heads,context sizes of a device mesh (e.g. 1,1,2); default: one device "
    "without a mesh.")
_BREAKDOWN = flags.DEFINE_bool(
    "step_breakdown", False,
    "Also time, per case, one decode step of the whole model outside the decode loop, and one "
    "layer's fixed-context attention alone, to locate per-token overhead.")
_PROFILE = flags.DEFINE_bool(
    "profile", False,
    "Also trace one call of each length per case and report the GPU kernels of one decode token "
    "(the difference of the two traces over the tokens between them): kernels, busy and span "
    "microseconds, and the kernel families taking the most time. Traces run after every case of "
    "a length is timed (once a process has traced, its kernel launches are slower).")


def _model(max_positions: int) -> Llama:
  config = PRESETS["llama2-7b"].replace(
      num_layers=_NUM_LAYERS.value, hidden_size=_HIDDEN.value, head_dim=128,
      num_heads=_HIDDEN.value // 128, num_kv_heads=_HIDDEN.value // 128,
      intermediate_size=_HIDDEN.value * 11008 // 4096, max_position_embeddings=max_positions,
      dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  return Llama(config, rngs=nnx.Rngs(0))


def _synthetic_context(model: Llama, num_tokens: int) -> FixedContext:
  """A clustered context in the binding layout; every layer gets its own random clusters."""
  config = model.config
  clustered = num_tokens - _WINDOW.value
  num_clusters = num_clusters_for(clustered, 5.0)
  layers = [synthetic.clustered_context(jax.random.key(layer), num_kv_heads=config.num_kv_heads,
                                        num_keys=clustered, num_clusters=num_clusters,
                                        head_dim=config.head_dim)
            for layer in range(config.num_layers)]
  per_layer = lambda name: tuple(getattr(layer, name) for layer in layers)
  stack = lambda name: jnp.stack(per_layer(name))
  counts = stack("counts")
  labels = jax.vmap(jax.vmap(lambda c: jnp.repeat(jnp.arange(num_clusters), c,
                                                  total_repeat_length=clustered)))(counts)
  window = lambda seed: tuple(
      jax.random.normal(jax.random.key(seed + layer), (config.num_kv_heads, _WINDOW.value,
                                                       config.head_dim), jnp.bfloat16)
      for layer in range(config.num_layers))
  percentiles = tuple(sorted({*ContextConfig().percentiles, *map(float, _PERCENTILES.value)}))
  centroids = stack("centroids")
  window_queries = jax.random.normal(
      jax.random.key(30_000), (config.num_layers, _WINDOW.value, config.num_heads,
                               config.head_dim), jnp.bfloat16)
  thresholds = calibrate_thresholds(window_queries, centroids, counts, percentiles)
  return FixedContext(
      keys=per_layer("keys"), values=per_layer("values"),
      window_keys=window(10_000), window_values=window(20_000),
      clusters=ClusteredKeys(centroids, counts, stack("offsets"),
                             jnp.broadcast_to(jnp.arange(clustered, dtype=jnp.int32),
                                              labels.shape), labels.astype(jnp.int32)),
      thresholds=thresholds.thresholds, kept_fraction=thresholds.kept_fraction,
      coarse_thresholds=None, token_ids=jnp.zeros((num_tokens,), jnp.int32),
      config=ContextConfig(observation_window=_WINDOW.value, percentiles=percentiles),
      model_config=config)


def _median_ms(fn, *args, repeats: int = 20) -> float:
  """Median wall time of fn(*args) in ms, after a compiling call."""
  call = lambda: jax.block_until_ready(fn(*args))
  call()
  return round(1e3 * _median_seconds(call, repeats), 3)


def _step_breakdown(model: Llama, ctx: FixedContext, batch: int, method: str,
                    selection: dict[str, float]) -> dict[str, float]:
  """Times one decode step of the model (no loop) and one layer's fixed-context attention."""
  config, threshold, coarse = online.resolve_method(ctx, method, **selection)
  layers = split_layers(ctx, threshold=threshold, coarse_threshold=coarse)
  lengths = jnp.full((batch,), _QUESTION_TOKENS.value, jnp.int32)
  caches = online.init_caches(layers, lengths, _QUESTION_TOKENS.value + 64, model.config.dtype)
  attention = OnlineAttention(config)
  graphdef, state = nnx.split(model)
  tokens = jnp.ones((batch, 1), jnp.int32)
  positions = jnp.full((batch, 1), ctx.num_tokens + _QUESTION_TOKENS.value, jnp.int32)
  step = lambda: online.forward(graphdef, state, layers, tokens, positions, caches, attention)
  head_dim = model.config.head_dim
  q = jax.random.normal(jax.random.key(0), (batch, 1, model.config.num_heads, head_dim),
                        model.config.dtype)
  query_mask = jnp.ones((batch, 1), bool)
  layer_attention = jax.jit(lambda q, layer: context_attention(config, q, layer, query_mask)[:2])
  return {"model_step_ms": _median_ms(step),
          "layer_context_attention_ms": _median_ms(layer_attention, q, layers[0])}


def _answer(model: Llama, ctx: FixedContext, questions: list[list[int]], method: str,
            selection: dict[str, float], mesh, max_new_tokens: int) -> online.Answers:
  """One timed `generate` call (no stop token: exactly max_new_tokens per question)."""
  return online.generate(model, ctx, questions, method=method, max_new_tokens=max_new_tokens,
                         stop_tokens=[], mesh=mesh, **selection)


def _report(result: dict) -> None:
  print(json.dumps(result), flush=True)
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "a") as f:
      f.write(json.dumps(result) + "\n")


def _seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _median_seconds(fn, repeats: int | None = None) -> float:
  """Median wall time of fn() in seconds over `repeats` calls (--repeats if None)."""
  return float(np.median([_seconds(fn) for _ in range(repeats or _REPEATS.value)]))


@launcher
def main(argv):
  del argv
  new_tokens = _NEW_TOKENS.value
  # Both runs use one compiled program (the decode loop's width is new_tokens rounded up to 64).
  half = new_tokens // 2 + 1
  if new_tokens < 3 or -(-half // 64) != -(-new_tokens // 64):
    raise ValueError(f"{new_tokens=} must be >= 3, with new_tokens // 2 + 1 in the same multiple "
                     "of 64 (e.g. 128)")
  mesh = None
  if _MESH.value:
    if _BREAKDOWN.value:
      raise ValueError("--step_breakdown times one device; leave it out with --mesh")
    mesh_config = sharding.MeshConfig(*map(int, _MESH.value))
    mesh = sharding.make_mesh(mesh_config, jax.devices()[:mesh_config.num_devices])
  for num_tokens in map(int, _SEQ_LENS.value):
    model = _model(num_tokens + _QUESTION_TOKENS.value + new_tokens + 64)
    ctx = _synthetic_context(model, num_tokens)
    relayout_s = None
    if mesh is not None:
      model = sharding.shard_model(model, mesh)
      relayout_s = round(_seconds(lambda: sharding.context_parallel_layers(ctx, mesh)), 3)
    methods = ([("dense", {})] + [("squeezed", {"kv_budget": float(b)}) for b in _BUDGETS.value]
               + [("squeezed", {"percentile": float(p)}) for p in _PERCENTILES.value])
    to_trace = []  # (result, run) of this length, traced once every case is timed
    for batch in map(int, _BATCH_SIZES.value):
      questions = np.random.default_rng(batch).integers(
          3, model.config.vocab_size, (batch, _QUESTION_TOKENS.value)).tolist()
      for method, selection in methods:
        run = functools.partial(_answer, model, ctx, questions, method, selection, mesh)
        start = time.perf_counter()
        answers = run(new_tokens)
        compile_s = time.perf_counter() - start
        partial = _median_seconds(lambda: run(half))
        answer = _median_seconds(lambda: run(new_tokens))
        per_token = (answer - partial) / (new_tokens - half)
        result = {
            "seq_len": num_tokens, "batch": batch, "method": method,
            "kv_budget": selection.get("kv_budget"), "percentile": selection.get("percentile"),
            "rows_fraction": round(float(answers.rows_fraction.mean()), 4),
            "kv_budget_used": round(float(answers.kv_budget.mean()), 4),
            "num_layers": model.config.num_layers, "question_tokens": _QUESTION_TOKENS.value,
            "new_tokens": new_tokens, "time_to_answer_s": round(answer, 4),
            "prefill_and_first_token_s": round(answer - (new_tokens - 1) * per_token, 4),
            "decode_tokens_per_s": round(batch / per_token, 1),
            "first_call_s": round(compile_s, 2), "device": jax.devices()[0].device_kind,
            "mesh": None if mesh is None else dict(mesh.shape), "relayout_s": relayout_s,
        }
        if _BREAKDOWN.value:
          result.update(_step_breakdown(model, ctx, batch, method, selection))
        if _PROFILE.value:
          print("timed, to be traced:", json.dumps(result), flush=True)
          to_trace.append((result, run))
        else:
          _report(result)
    # The profiler slows the kernel launches of a process once it has traced, so no timed call
    # comes after a trace.
    for result, run in to_trace:
      trace = lambda n, run=run: gpu_trace.traced_kernels(lambda: run(n))
      result["decode_token_kernels"] = gpu_trace.per_step_difference(
          trace(new_tokens), trace(half), steps=new_tokens - half)
      _report(result)
  if _OUTPUT_JSON.value:
    print(f"appended the results to {os.path.abspath(_OUTPUT_JSON.value)}", flush=True)


if __name__ == "__main__":
  app.run(main)
