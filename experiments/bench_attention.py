"""Benchmark of Squeezed Attention's online phase on a GPU (H200).

For each case (fixed context S, KV budget, decode batch B or prefill of T
user tokens) it times, after warm-up:
  * dense attention over the whole fixed context on the same shapes
    (`jax.nn.dot_product_attention`, implementation "cudnn" and "xla"; the
    decode batch shares one context, so its B queries are folded into the
    query axis and K/V are read once, as in the sparse path);
  * the row-list path: the lookup (Pallas centroid scores + threshold
    selection into a row list), the block-sparse attention alone over the
    rows, and the whole `squeezed_lookup_attention` (lookup + selection +
    attention over the rows and the observation window), with float32
    centroids (the layout) and bfloat16 centroids (half the lookup's bytes);
  * decode only, the fused path `squeezed_decode_attention` (selection and
    attention kernels, no XLA between them): flat lookup with float32 /
    bfloat16 centroids, the hierarchical lookup (coarse level = 1% of S',
    coarse threshold keeping `--coarse_keep` of the keys, fine threshold
    calibrated for the same budget), and its selection, attention and reduce
    alone (the K/V bandwidth).
With --sweep it first times tile variants (the tuning behind the defaults in
pallas_kernels/block_sizes.py; --tune then times the fused cases with the
fastest decode tiles); with --profile it traces decode and prefill calls and
lists the GPU kernels of one call (count, busy time, span).
Times are medians over repeats of a loop of `--iters` calls (mean per call),
alternating between two input sets so the selected rows are not in L2.
Thresholds are calibrated like the offline phase: the pooled per-key score
quantile that keeps the budget's fraction of keys.

Usage (from the repository root, on the GPU machine):
  python3 -m experiments.bench_attention --check --out=/tmp/bench.json
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from pallas_kernels import references
from pallas_kernels import selection as selection_lib
from pallas_kernels import synthetic
from pallas_kernels.gpu import centroid_scores as gpu_scores
from pallas_kernels.gpu import decode_attention as gpu_decode
from pallas_kernels.gpu import sparse_attention as gpu_attention

from experiments import gpu_trace

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["32768", "131072"],
                              "Fixed-context lengths S.")
_BUDGETS = flags.DEFINE_list("budgets", ["0.125", "0.25"],
                             "Fractions of the clustered keys to read.")
_CASES = flags.DEFINE_list(
    "cases", ["decode1", "decode8", "prefill512", "prefill2048"],
    "decode<B> (one token per sequence) or prefill<T> (batch 1).")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 32, "Query heads Hq.")
_NUM_KV_HEADS = flags.DEFINE_integer("num_kv_heads", 32, "KV heads Hkv.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "D.")
_WINDOW = flags.DEFINE_integer("window", 100, "Observation window W.")
_PERCENT_CLUSTERS = flags.DEFINE_float("percent_clusters", 5.0,
                                       "K = ceil(pct / 100 * S').")
_PERCENT_COARSE = flags.DEFINE_float("percent_coarse", 1.0,
                                     "Kc = ceil(pct / 100 * S').")
_COARSE_KEEP = flags.DEFINE_float(
    "coarse_keep", 0.5, "Fraction of keys the coarse threshold keeps (the "
    "project's default coarse percentile 0.5).")
_ITERS = flags.DEFINE_integer("iters", 20, "Calls per timed loop.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed loops (median taken).")
_INPUT_SETS = flags.DEFINE_integer(
    "input_sets", 2, "Input sets the timed loops cycle through: 2 = the K/V "
    "swapped; more add fresh copies of the K/V (as a model's consecutive "
    "layers read distinct memory: cold TLBs, not only a cold L2).")
_CHECK = flags.DEFINE_bool("check", False,
                           "Check the compiled kernels against references.")
_DENSE_XLA = flags.DEFINE_bool("dense_xla", True,
                               "Also time dense attention through XLA.")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")
_SWEEP = flags.DEFINE_bool(
    "sweep", False, "Time kernel variants (tiles) at the largest S and first "
    "budget, before the cases.")
_SWEEP_CASES = flags.DEFINE_list(
    "sweep_cases", ["decode1", "decode8", "prefill2048"],
    "Cases of the sweep (decode1, decode8: fused tiles; prefill2048: lookup "
    "and sparse tiles).")
_PROFILE = flags.DEFINE_bool(
    "profile", False, "Trace decode / prefill calls at the largest S and "
    "first budget and list their GPU kernels.")
_TUNE = flags.DEFINE_bool(
    "tune", False, "With --sweep: time the fused decode cases with the "
    "fastest flat fused tiles of the sweep's decode1 (printed) instead of "
    "the defaults.")
_RUN_CASES = flags.DEFINE_bool(
    "run_cases", True, "Time the cases (after --profile / --sweep if given).")
_INTERPRET = flags.DEFINE_bool(
    "interpret", False, "Pallas interpreter (a CPU smoke test of this script).")

Level = collections.namedtuple("Level", "centroids counts offsets")


def timed_ms(fn, inputs: list[tuple]) -> float:
  """Median over repeats of the mean time per call (ms), after warm-up."""
  for args in inputs:
    jax.block_until_ready(fn(*args))
  means = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    for i in range(_ITERS.value):
      result = fn(*inputs[i % len(inputs)])
    jax.block_until_ready(result)
    means.append((time.perf_counter() - start) / _ITERS.value)
  return 1e3 * statistics.median(means)


def copy_bandwidth() -> float:
  """Device copy bandwidth in GB/s (bytes read + written), 2 GiB buffers.

  The best of a bf16 and a float32 elementwise copy-with-update.
  """
  best = 0.0
  num_bytes = 1 << (24 if _INTERPRET.value else 31)
  for dtype in (jnp.bfloat16, jnp.float32):
    x = jax.random.normal(jax.random.key(0),
                          (num_bytes // jnp.dtype(dtype).itemsize,), dtype)
    y = x[::-1]
    ms = timed_ms(jax.jit(lambda a: a * 2), [(x,), (y,)])
    best = max(best, 2 * x.nbytes / (ms * 1e-3) / 1e9)
    del x, y
  return best


def rel_err(got, want) -> float:
  got, want = (np.asarray(a, np.float64) for a in (got, want))
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def check_kernels() -> list[dict]:
  """Compiled GPU kernels vs the float32 references at small shapes."""
  rows = []
  num_kv_heads, head_dim, num_keys = 4, 128, 4000
  for group, shape in [(4, (3, 32)), (1, (8, 32)), (4, (2, 48, 32))]:
    ctx = synthetic.clustered_context(
        jax.random.key(group), num_kv_heads=num_kv_heads, num_keys=num_keys,
        num_clusters=200, head_dim=head_dim)
    q_shape = (*shape[:-1], num_kv_heads * group, head_dim)
    q = jax.random.normal(jax.random.key(7), q_shape, jnp.bfloat16)
    want_scores = references.centroid_scores(q, ctx.centroids, ctx.counts)
    got_scores = gpu_scores.centroid_scores(q, ctx.centroids, ctx.counts,
                                            interpret=_INTERPRET.value)
    tau = float(jnp.quantile(want_scores, 0.8))
    sel = selection_lib.select_clusters(want_scores, ctx.counts, ctx.offsets,
                                        max_rows=num_keys, threshold=tau)
    window_kv = jax.random.normal(jax.random.key(8),
                                  (2, num_kv_heads, 100, head_dim),
                                  jnp.bfloat16)
    out, lse = gpu_attention.sparse_attention(
        q, ctx.keys, ctx.values, sel, window_keys=window_kv[0],
        window_values=window_kv[1], interpret=_INTERPRET.value)
    keys = jnp.concatenate([ctx.keys, window_kv[0]], axis=1)
    values = jnp.concatenate([ctx.values, window_kv[1]], axis=1)
    window_mask = jnp.ones((q.shape[0], num_kv_heads, 100), bool)
    mask = jnp.concatenate([selection_lib.key_mask(sel, num_keys),
                            window_mask], axis=-1)
    want_out, want_lse = references.attention(q, keys, values, mask)
    row = dict(q_shape=q_shape,
               scores_rel_err=rel_err(got_scores, want_scores),
               out_rel_err=rel_err(out, want_out),
               lse_max_abs_err=float(jnp.abs(lse - want_lse).max()),
               finite=bool(jnp.isfinite(out.astype(jnp.float32)).all()))
    if len(shape) == 2:
      coarse = Level(*synthetic.coarse_level(jax.random.key(9), ctx.centroids,
                                             ctx.counts, 40))
      coarse_scores = references.centroid_scores(q, coarse.centroids,
                                                 coarse.counts)
      coarse_tau = float(jnp.quantile(coarse_scores, 0.5))
      hierarchical = dict(
          coarse_centroids=coarse.centroids, coarse_counts=coarse.counts,
          coarse_offsets=coarse.offsets, coarse_threshold=coarse_tau)
      for name, mode in (("fused", dict(threshold=tau)),
                         ("fused_budget", dict(key_budget=num_keys // 8)),
                         ("fused_hierarchical",
                          dict(threshold=tau, **hierarchical))):
        for dtype in (jnp.float32, jnp.bfloat16):
          args = (q, ctx.keys, ctx.values, ctx.centroids.astype(dtype),
                  ctx.counts, ctx.offsets)
          kwargs = dict(window_keys=window_kv[0], window_values=window_kv[1],
                        **mode)
          got_out, got_lse, got_kept = pk.squeezed_decode_attention(
              *args, backend="gpu", interpret=_INTERPRET.value, **kwargs)
          ref_out, ref_lse, ref_kept = pk.squeezed_decode_attention(
              q, ctx.keys, ctx.values, ctx.centroids, ctx.counts, ctx.offsets,
              backend="xla", **kwargs)
          flips = int((got_kept.clusters != ref_kept.clusters).sum())
          key = f"{name}_{jnp.dtype(dtype).name}"
          row[f"{key}_out_rel_err"] = rel_err(got_out, ref_out)
          row[f"{key}_lse_max_abs_err"] = float(
              jnp.abs(got_lse - ref_lse).max())
          row[f"{key}_cluster_flips"] = flips
          row[f"{key}_finite"] = bool(
              jnp.isfinite(got_out.astype(jnp.float32)).all())
    print("check", row, flush=True)
    rows.append(row)
  return rows


def calibrate_threshold(scores: jax.Array, counts: jax.Array,
                        budget: float) -> float:
  """Pooled per-key score quantile keeping `budget` of the keys."""
  flat = np.asarray(scores, np.float64).reshape(-1)
  weights = np.broadcast_to(np.asarray(counts), scores.shape).reshape(-1)
  order = np.argsort(-flat)
  kept = np.cumsum(weights[order])
  return float(flat[order][np.searchsorted(kept, budget * weights.sum())])


def parse_case(case: str) -> tuple[int, int | None]:
  """'decode8' -> (8, None); 'prefill512' -> (1, 512)."""
  if case.startswith("decode"):
    return int(case[len("decode"):]), None
  if case.startswith("prefill"):
    return 1, int(case[len("prefill"):])
  raise ValueError(f"{case=} must be decode<B> or prefill<T>")


class Setup:
  """One fixed context of S tokens: clustered part, coarse level, window,
  input sets (K and V swapped, centroids negated; then copies) that defeat
  the L2."""

  def __init__(self, seq_len: int):
    num_kv_heads, head_dim = _NUM_KV_HEADS.value, _HEAD_DIM.value
    self.seq_len = seq_len
    self.num_keys = seq_len - _WINDOW.value
    self.num_clusters = math.ceil(_PERCENT_CLUSTERS.value / 100
                                  * self.num_keys)
    self.ctx = synthetic.clustered_context(
        jax.random.key(seq_len), num_kv_heads=num_kv_heads,
        num_keys=self.num_keys, num_clusters=self.num_clusters,
        head_dim=head_dim)
    self.coarse = Level(*synthetic.coarse_level(
        jax.random.key(seq_len + 1), self.ctx.centroids, self.ctx.counts,
        math.ceil(_PERCENT_COARSE.value / 100 * self.num_keys)))
    self.window = tuple(
        jax.random.normal(k, (num_kv_heads, _WINDOW.value, head_dim),
                          jnp.bfloat16)
        for k in jax.random.split(jax.random.key(1), 2))
    self.contexts = [(self.ctx.keys, self.ctx.values, self.ctx.centroids,
                      self.coarse.centroids),
                     (self.ctx.values, self.ctx.keys, -self.ctx.centroids,
                      -self.coarse.centroids)]
    for i in range(2, _INPUT_SETS.value):
      keys, values, centroids, coarse = self.contexts[i % 2]
      self.contexts.append((jnp.array(keys, copy=True),
                            jnp.array(values, copy=True), centroids, coarse))

  def queries(self, case: str) -> list[jax.Array]:
    batch, tokens = parse_case(case)
    shape = ((batch, _NUM_HEADS.value, _HEAD_DIM.value) if tokens is None
             else (batch, tokens, _NUM_HEADS.value, _HEAD_DIM.value))
    return [jax.random.normal(jax.random.key(i), shape, jnp.bfloat16)
            for i in range(len(self.contexts))]

  def dense_kv(self):
    return [tuple(jnp.concatenate([a, w], axis=1).transpose(1, 0, 2)[None]
                  for a, w in ((k, self.window[0]), (v, self.window[1])))
            for k, v, _, _ in self.contexts]

  def thresholds(self, q: jax.Array, budget: float) -> dict:
    """Flat tau, and hierarchical (coarse tau, fine tau), for `budget`."""
    ctx, coarse = self.ctx, self.coarse
    scores = jax.jit(references.centroid_scores)(q, ctx.centroids, ctx.counts)
    result = dict(tau=calibrate_threshold(scores, ctx.counts, budget),
                  scores=scores)
    if q.ndim == 3:
      coarse_scores = jax.jit(references.centroid_scores)(
          q, coarse.centroids, coarse.counts)
      coarse_tau = calibrate_threshold(coarse_scores, coarse.counts,
                                       _COARSE_KEEP.value)
      fine_scores, _ = jax.jit(functools.partial(
          references.hierarchical_centroid_scores,
          coarse_threshold=coarse_tau))(q, ctx.centroids, ctx.counts,
                                        *coarse)
      result.update(coarse_tau=coarse_tau, fine_tau=calibrate_threshold(
          fine_scores, ctx.counts, budget))
    return result

  def fused_fn(self, thresholds: dict, hierarchical: bool,
               window: bool = True, block_sizes=None):
    """jit(q, keys, values, centroids, coarse centroids) of the fused path."""
    ctx, coarse = self.ctx, self.coarse

    def step(q, keys, values, centroids, coarse_centroids):
      levels = {}
      tau = thresholds["tau"]
      if hierarchical:
        levels = dict(coarse_centroids=coarse_centroids,
                      coarse_counts=coarse.counts,
                      coarse_offsets=coarse.offsets,
                      coarse_threshold=thresholds["coarse_tau"])
        tau = thresholds["fine_tau"]
      out, lse, kept = pk.squeezed_decode_attention(
          q, keys, values, centroids, ctx.counts, ctx.offsets, threshold=tau,
          window_keys=self.window[0] if window else None,
          window_values=self.window[1] if window else None, backend="gpu",
          block_sizes=block_sizes, interpret=_INTERPRET.value, **levels)
      return out, lse, kept.num_rows

    return jax.jit(step)

  def fused_inputs(self, qs, dtype) -> list[tuple]:
    return [(q, k, v, c.astype(dtype), cc.astype(dtype))
            for q, (k, v, c, cc) in zip(qs, self.contexts)]


def time_dense(setup: Setup, qs: list[jax.Array]) -> dict:
  """Dense attention over all S keys of the fixed context."""
  result = {}
  for impl in ["cudnn"] + (["xla"] if _DENSE_XLA.value else []):
    fn = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
        q.reshape(1, -1, *q.shape[-2:]), k, v, implementation=impl))
    try:
      result[impl] = timed_ms(fn, [(q, *kv) for q, kv in
                                   zip(qs, setup.dense_kv())])
    except Exception as e:  # pylint: disable=broad-except
      print(f"dense {impl} failed: {type(e).__name__}: {str(e)[:200]}",
            flush=True)
      result[impl] = None
  return result


def run_case(setup: Setup, case: str, budget: float, dense: dict,
             copy_gbs: float, decode_tiles: pk.DecodeBlockSizes) -> dict:
  """All timings of one (S, case, budget); fused paths with `decode_tiles`."""
  ctx, num_keys, head_dim = setup.ctx, setup.num_keys, _HEAD_DIM.value
  batch, tokens = parse_case(case)
  qs = setup.queries(case)
  thresholds = setup.thresholds(qs[0], budget)
  tau = thresholds["tau"]
  probe = selection_lib.select_clusters(thresholds["scores"], ctx.counts,
                                        ctx.offsets, max_rows=num_keys,
                                        threshold=tau)
  most = int(probe.num_rows.max())
  max_rows = -(-max(most, int(1.25 * budget * num_keys)) // 512) * 512

  def lookup(q, centroids):
    scores = pk.centroid_scores(q, centroids, ctx.counts, backend="gpu",
                                interpret=_INTERPRET.value)
    return pk.select_clusters(scores, ctx.counts, ctx.offsets,
                              max_rows=max_rows, threshold=tau)

  def row_list_total(q, keys, values, centroids, _):
    out, lse, _ = pk.squeezed_lookup_attention(
        q, keys, values, centroids, ctx.counts, ctx.offsets,
        max_rows=max_rows, threshold=tau, window_keys=setup.window[0],
        window_values=setup.window[1], backend="gpu",
        interpret=_INTERPRET.value)
    return out, lse

  lookup_jit = jax.jit(lookup)
  sels = [lookup_jit(q, c) for q, (_, _, c, _) in zip(qs, setup.contexts)]
  row = dict(seq_len=setup.seq_len, budget=budget, case=case, batch=batch,
             tokens=tokens, num_kv_heads=_NUM_KV_HEADS.value,
             num_heads=_NUM_HEADS.value, head_dim=head_dim,
             num_clusters=setup.num_clusters, max_rows=max_rows,
             selected_fraction=float(np.mean(np.asarray(sels[0].num_rows)))
             / num_keys,
             truncated_heads=int((np.asarray(sels[0].num_rows)
                                  >= max_rows).sum()),
             dense_cudnn_ms=dense.get("cudnn"), dense_xla_ms=dense.get("xla"))
  f32_inputs = setup.fused_inputs(qs, jnp.float32)
  bf16_inputs = setup.fused_inputs(qs, jnp.bfloat16)
  row["lookup_ms"] = timed_ms(lookup_jit, [(q, c) for q, _, _, c, _ in
                                           f32_inputs])
  row["scores_ms"] = timed_ms(
      jax.jit(functools.partial(pk.centroid_scores, backend="gpu",
                                interpret=_INTERPRET.value)),
      [(q, c, ctx.counts) for q, _, _, c, _ in f32_inputs])
  row["sparse_ms"] = timed_ms(
      jax.jit(functools.partial(pk.sparse_attention, backend="gpu",
                                interpret=_INTERPRET.value)),
      [(q, k, v, s) for (q, k, v, _, _), s in zip(f32_inputs, sels)])
  total = jax.jit(row_list_total)
  row["total_ms"] = timed_ms(total, f32_inputs)
  row["total_bf16_centroids_ms"] = timed_ms(total, bf16_inputs)
  kv_bytes = float(np.asarray(sels[0].num_rows).sum()) * 2 * head_dim * 2
  row["sparse_gbs"] = kv_bytes / (row["sparse_ms"] * 1e-3) / 1e9
  row["sparse_fraction_of_copy_bw"] = row["sparse_gbs"] / copy_gbs
  if tokens is None:
    fused = setup.fused_fn(thresholds, hierarchical=False,
                           block_sizes=decode_tiles)
    row["fused_ms"] = timed_ms(fused, f32_inputs)
    row["fused_bf16_centroids_ms"] = timed_ms(fused, bf16_inputs)
    fused_rows = np.asarray(fused(*bf16_inputs[0])[2])
    row["fused_selected_fraction"] = float(fused_rows.mean()) / num_keys
    hierarchical = setup.fused_fn(thresholds, hierarchical=True,
                                  block_sizes=decode_tiles)
    row["hierarchical_ms"] = timed_ms(hierarchical, f32_inputs)
    row["hierarchical_bf16_centroids_ms"] = timed_ms(hierarchical,
                                                     bf16_inputs)
    row["hierarchical_selected_fraction"] = float(np.asarray(
        hierarchical(*bf16_inputs[0])[2]).mean()) / num_keys
    row["fused_attention_ms"], row["fused_attention_gbs"] = (
        time_fused_attention(setup, qs, tau, decode_tiles))
    row["fused_attention_fraction_of_copy_bw"] = (
        row["fused_attention_gbs"] / copy_gbs)
  for impl in ("cudnn", "xla"):
    dense_ms = dense.get(impl)
    for key in ("total", "total_bf16_centroids", "fused",
                "fused_bf16_centroids", "hierarchical",
                "hierarchical_bf16_centroids"):
      if f"{key}_ms" in row:
        row[f"speedup_{key}_vs_{impl}"] = (
            dense_ms / row[f"{key}_ms"] if dense_ms else None)
  row["lookup_share"] = row["lookup_ms"] / row["total_ms"]
  print("case", json.dumps(row), flush=True)
  return row


def time_fused_attention(setup: Setup, qs: list[jax.Array], tau: float,
                         block_sizes: pk.DecodeBlockSizes
                         ) -> tuple[float, float]:
  """The selection and attention kernels (+ the reduce) alone, no window.

  Returns (ms, GB/s of the kept K/V rows).
  """
  ctx, num_kv_heads = setup.ctx, _NUM_KV_HEADS.value
  batch, num_heads, _ = qs[0].shape
  group = num_heads // num_kv_heads
  scale = 1.0 / math.sqrt(_HEAD_DIM.value)
  inputs = []
  for q, (keys, values, centroids, _) in zip(qs, setup.contexts):
    q_rows = gpu_scores.decode_query_rows(q, num_kv_heads)
    logits, parts = gpu_scores.single_pass_logits(
        q_rows, centroids.astype(jnp.bfloat16), ctx.counts,
        num_q_rows=batch * group, sm_scale=scale,
        block_sizes=block_sizes.lookup, interpret=_INTERPRET.value)
    inputs.append((q_rows, logits, parts, keys, values))
  num_parts = gpu_scores.num_single_pass_splits(setup.num_clusters,
                                                block_sizes.lookup)
  fn = jax.jit(lambda q_rows, logits, parts, keys, values: (
      gpu_decode.fused_selection_attention(
          q_rows, logits, parts, num_parts, keys, values, ctx.counts,
          ctx.offsets, tau, active=None, batch=batch, group=group,
          window_keys=None, window_values=None, own=None, sm_scale=scale,
          out_dtype=qs[0].dtype,
          block_sizes=block_sizes, interpret=_INTERPRET.value)))
  ms = timed_ms(fn, inputs)
  rows = float(np.asarray(fn(*inputs[0])[3]).sum())
  return ms, rows * 2 * _HEAD_DIM.value * 2 / (ms * 1e-3) / 1e9


def profile(setup: Setup, budget: float,
            decode_tiles: pk.DecodeBlockSizes) -> list[dict]:
  """GPU kernels per call of the decode and prefill paths."""
  ctx = setup.ctx
  results = []
  for case in ("decode1", "decode8", "prefill2048"):
    if case not in _CASES.value:
      continue
    qs = setup.queries(case)
    thresholds = setup.thresholds(qs[0], budget)
    max_rows = -(-int(1.25 * budget * setup.num_keys) // 512) * 512
    bf16_inputs = setup.fused_inputs(qs, jnp.bfloat16)
    variants = {"row list": jax.jit(
        lambda q, k, v, c, _: pk.squeezed_lookup_attention(
            q, k, v, c, ctx.counts, ctx.offsets, max_rows=max_rows,
            threshold=thresholds["tau"], window_keys=setup.window[0],
            window_values=setup.window[1], backend="gpu",
            interpret=_INTERPRET.value)[:2])}
    if case.startswith("decode"):
      variants["fused"] = setup.fused_fn(thresholds, hierarchical=False,
                                         block_sizes=decode_tiles)
      variants["fused hierarchical"] = setup.fused_fn(
          thresholds, hierarchical=True, block_sizes=decode_tiles)
    for name, fn in variants.items():
      try:
        kernels = gpu_trace.gpu_kernels(fn, bf16_inputs)
      except Exception as e:  # pylint: disable=broad-except
        print(f"profile {case} {name} failed: {str(e)[:200]}", flush=True)
        continue
      row = dict(case=case, variant=name, **kernels)
      print("profile", json.dumps(row), flush=True)
      results.append(row)
  return results


def sweep(setup: Setup, budget: float) -> list[dict]:
  """Times tile variants (tuning, not the report).

  Rows of flat fused decode variants carry their `DecodeBlockSizes` under
  "tiles" (dropped from the JSON report).
  """
  ctx = setup.ctx
  rows = []

  def record(case, name, ms_fn, tiles=None):
    try:
      ms = ms_fn()
    except Exception as e:  # pylint: disable=broad-except
      print(f"sweep {case} {name} failed: {str(e)[:300]}", flush=True)
      return
    row = dict(case=case, variant=name, ms=ms)
    print("sweep", json.dumps(row), flush=True)
    rows.append(dict(row, tiles=tiles))

  lookup = pk.LookupBlockSizes
  tiles = pk.DecodeBlockSizes
  variants = [  # (hierarchical, tiles)
      (False, tiles()), (False, tiles(num_warps=4)),
      (False, tiles(piece_rows=1)), (False, tiles(piece_rows=4)),
      (False, tiles(piece_rows=16)), (False, tiles(block_clusters=256)),
      (False, tiles(block_clusters=64)), (False, tiles(block_rows=32)),
      (False, tiles(block_rows=128)), (False, tiles(num_stages=2)),
      (False, tiles(num_stages=4)),
      (False, tiles(lookup=lookup(block_k=64))), (True, tiles()),
  ]
  for case in ("decode1", "decode8"):
    if case not in _SWEEP_CASES.value:
      continue
    qs = setup.queries(case)
    thresholds = setup.thresholds(qs[0], budget)
    inputs = setup.fused_inputs(qs, jnp.bfloat16)
    for hierarchical, block_sizes in variants:
      fn = setup.fused_fn(thresholds, hierarchical, block_sizes=block_sizes)
      record(case, f"{'hierarchical' if hierarchical else 'fused'} "
             f"{block_sizes}", functools.partial(timed_ms, fn, inputs),
             tiles=None if hierarchical else block_sizes)
  if "prefill2048" in _SWEEP_CASES.value:
    qs = setup.queries("prefill2048")
    thresholds = setup.thresholds(qs[0], budget)
    q_sets = [(q, c, ctx.counts) for q, (_, _, c, _) in
              zip(qs, setup.contexts)]
    for bm, bk, warps, stages in [(64, 128, 4, 2), (128, 128, 8, 2),
                                  (64, 64, 4, 2), (128, 64, 8, 3)]:
      tiles = lookup(block_m=bm, block_k=bk, num_warps=warps,
                     num_stages=stages)
      fn = jax.jit(functools.partial(pk.centroid_scores, backend="gpu",
                                     interpret=_INTERPRET.value,
                                     block_sizes=tiles))
      record("prefill2048", f"scores {tiles}",
             functools.partial(timed_ms, fn, q_sets))
    max_rows = -(-int(1.25 * budget * setup.num_keys) // 512) * 512
    sel = pk.select_clusters(thresholds["scores"], ctx.counts, ctx.offsets,
                             max_rows=max_rows, threshold=thresholds["tau"])
    sel_sets = [(q, k, v, sel) for q, (k, v, _, _) in zip(qs, setup.contexts)]
    for bm, br, warps, stages in [(128, 128, 8, 2), (128, 64, 8, 3),
                                  (128, 128, 8, 3)]:
      tiles = pk.AttentionBlockSizes(block_m=bm, block_rows=br,
                                     split_rows=None, num_warps=warps,
                                     num_stages=stages)
      fn = jax.jit(functools.partial(pk.sparse_attention, backend="gpu",
                                     interpret=_INTERPRET.value,
                                     block_sizes=tiles))
      record("prefill2048", f"sparse {tiles}",
             functools.partial(timed_ms, fn, sel_sets))
  return rows


def summary_table(rows: list[dict]) -> str:
  """Markdown tables of the results (row-list path; fused decode path)."""
  fmt = lambda x, f="{:.3f}": "n/a" if x is None else f.format(x)
  lines = ["| S | budget | case | sel. | dense cuDNN ms | dense XLA ms | "
           "lookup ms [scores] | sparse ms | total ms (bf16 C) | "
           "x cuDNN (bf16 C) | x XLA | sparse GB/s (% copy) |",
           "|" + "---|" * 12]
  for r in rows:
    lines.append(
        f"| {r['seq_len']} | {r['budget']} | {r['case']} | "
        f"{r['selected_fraction']:.3f} | {fmt(r['dense_cudnn_ms'])} | "
        f"{fmt(r['dense_xla_ms'])} | {r['lookup_ms']:.3f} "
        f"[{r['scores_ms']:.3f}] | {r['sparse_ms']:.3f} | "
        f"{r['total_ms']:.3f} ({r['total_bf16_centroids_ms']:.3f}) | "
        f"{fmt(r.get('speedup_total_vs_cudnn'), '{:.2f}')} "
        f"({fmt(r.get('speedup_total_bf16_centroids_vs_cudnn'), '{:.2f}')})"
        f" | {fmt(r.get('speedup_total_vs_xla'), '{:.2f}')} | "
        f"{r['sparse_gbs']:.0f} ({100 * r['sparse_fraction_of_copy_bw']:.0f}%)"
        " |")
  lines += ["", "| S | budget | case | sel. flat / hier. | fused ms (bf16 C) | "
            "x cuDNN (bf16 C) | hierarchical ms (bf16 C) | x cuDNN (bf16 C) | "
            "fused kernel alone ms, GB/s (% copy) |", "|" + "---|" * 9]
  for r in rows:
    if "fused_ms" not in r:
      continue
    hierarchical_bf16_speedup = r.get(
        "speedup_hierarchical_bf16_centroids_vs_cudnn")
    lines.append(
        f"| {r['seq_len']} | {r['budget']} | {r['case']} | "
        f"{r['fused_selected_fraction']:.3f} / "
        f"{r['hierarchical_selected_fraction']:.3f} | {r['fused_ms']:.3f} "
        f"({r['fused_bf16_centroids_ms']:.3f}) | "
        f"{fmt(r.get('speedup_fused_vs_cudnn'), '{:.2f}')} "
        f"({fmt(r.get('speedup_fused_bf16_centroids_vs_cudnn'), '{:.2f}')}) "
        f"| {r['hierarchical_ms']:.3f} "
        f"({r['hierarchical_bf16_centroids_ms']:.3f}) | "
        f"{fmt(r.get('speedup_hierarchical_vs_cudnn'), '{:.2f}')} ("
        f"{fmt(hierarchical_bf16_speedup, '{:.2f}')}) | "
        f"{r['fused_attention_ms']:.3f}, "
        f"{r['fused_attention_gbs']:.0f} "
        f"({100 * r['fused_attention_fraction_of_copy_bw']:.0f}%) |")
  return "\n".join(lines)


def main(argv):
  del argv
  print(jax.__version__, jax.devices(), flush=True)
  report = {"jax": jax.__version__, "device": str(jax.devices()[0])}

  def save():
    if _OUT.value:
      with open(_OUT.value, "w") as f:
        json.dump(report, f, indent=1)

  if _CHECK.value:
    report["check"] = check_kernels()
    save()
  report["copy_gbs"] = copy_bandwidth()
  print(f"copy bandwidth {report['copy_gbs']:.0f} GB/s", flush=True)
  tiny = [(jnp.full((8, 128), float(i)),) for i in range(2)]
  report["dispatch_floor_ms"] = timed_ms(jax.jit(lambda x: x + 1), tiny)
  print(f"one-kernel call floor {report['dispatch_floor_ms']:.4f} ms",
        flush=True)
  budget = float(_BUDGETS.value[0])
  decode_tiles = pk.DecodeBlockSizes()
  if _PROFILE.value or _SWEEP.value:
    setup = Setup(int(_SEQ_LENS.value[-1]))
    if _SWEEP.value:
      rows = sweep(setup, budget)
      tuned = [r for r in rows if r["tiles"] and r["case"] == "decode1"]
      if _TUNE.value and tuned:
        decode_tiles = min(tuned, key=lambda r: r["ms"])["tiles"]
        report["tuned_decode_tiles"] = str(decode_tiles)
        print(f"tuned decode tiles {decode_tiles}", flush=True)
      report["sweep"] = [{k: v for k, v in r.items() if k != "tiles"}
                         for r in rows]
      save()
    if _PROFILE.value:
      report["profile"] = profile(setup, budget, decode_tiles)
      save()
    del setup
  if not _RUN_CASES.value:
    return
  report["cases"] = []
  for seq_len in map(int, _SEQ_LENS.value):
    setup = Setup(seq_len)
    for case in _CASES.value:
      qs = setup.queries(case)
      dense = time_dense(setup, qs)
      for case_budget in map(float, _BUDGETS.value):
        try:
          report["cases"].append(run_case(setup, case, case_budget, dense,
                                          report["copy_gbs"], decode_tiles))
        except Exception as e:  # pylint: disable=broad-except
          print(f"case {seq_len} {case} {case_budget} failed: "
                f"{type(e).__name__}: {str(e)[:300]}", flush=True)
        save()
    del setup
  print(summary_table(report["cases"]), flush=True)
  if _OUT.value:
    print(f"wrote the results to {os.path.abspath(_OUT.value)}", flush=True)


if __name__ == "__main__":
  app.run(main)
