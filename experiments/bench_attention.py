"""Benchmark of Squeezed Attention's online phase on a GPU (H200).

For each case (fixed context S, KV budget, decode batch B or prefill of T
user tokens) it times, after warm-up:
  * dense attention over the whole fixed context on the same shapes
    (`jax.nn.dot_product_attention`, implementation "cudnn" and "xla"; the
    decode batch shares one context, so its B queries are folded into the
    query axis and K/V are read once, as in the sparse path);
  * the lookup (Pallas centroid scores + threshold selection; also the XLA
    reference lookup);
  * the block-sparse attention alone;
  * the whole path (lookup + selection + sparse attention over the selected
    rows and the observation window), with float32 centroids (the layout) and
    with bfloat16 centroids (half the lookup's bytes).
With --sweep it times tile variants and the selection's steps instead (the
tuning behind the defaults in pallas_kernels/block_sizes.py).
Times are medians over repeats of a loop of `--iters` calls (mean per call),
alternating between two input sets so the selected rows are not in L2.
The threshold is calibrated like the offline phase: the pooled per-key score
quantile that keeps the budget's fraction of keys.

Usage (from the repository root, on the GPU machine):
  python3 -m experiments.bench_attention --check --out=/tmp/bench.json
"""

from __future__ import annotations

import functools
import json
import math
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
from pallas_kernels.gpu import sparse_attention as gpu_attention

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
_ITERS = flags.DEFINE_integer("iters", 20, "Calls per timed loop.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed loops (median taken).")
_CHECK = flags.DEFINE_bool("check", False,
                           "Check the compiled kernels against references.")
_DENSE_XLA = flags.DEFINE_bool("dense_xla", True,
                               "Also time dense attention through XLA.")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")
_SWEEP = flags.DEFINE_bool(
    "sweep", False, "Time kernel variants (tiles, selection steps) at the "
    "largest S and first budget instead of the cases.")
_INTERPRET = flags.DEFINE_bool(
    "interpret", False, "Pallas interpreter (a CPU smoke test of this script).")


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
  for group, shape in [(1, (3, 32)), (4, (3, 32)), (1, (1, 64, 32)),
                       (4, (2, 48, 32))]:
    num_kv_heads, head_dim = 4, 128
    ctx = synthetic.clustered_context(
        jax.random.key(group), num_kv_heads=num_kv_heads, num_keys=4000,
        num_clusters=200, head_dim=head_dim)
    q_shape = (*shape[:-1], num_kv_heads * group, head_dim)
    q = jax.random.normal(jax.random.key(7), q_shape, jnp.bfloat16)
    want_scores = references.centroid_scores(q, ctx.centroids, ctx.counts)
    got_scores = gpu_scores.centroid_scores(q, ctx.centroids, ctx.counts,
                                            interpret=_INTERPRET.value)
    tau = float(jnp.quantile(want_scores, 0.8))
    sel = selection_lib.select_clusters(want_scores, ctx.counts, ctx.offsets,
                                        max_rows=4000, threshold=tau)
    out, lse = gpu_attention.sparse_attention(q, ctx.keys, ctx.values, sel,
                                              interpret=_INTERPRET.value)
    want_out, want_lse = references.attention(
        q, ctx.keys, ctx.values, selection_lib.key_mask(sel, 4000))
    all_sel = selection_lib.select_clusters(want_scores, ctx.counts,
                                            ctx.offsets, max_rows=4000,
                                            threshold=-1.0)
    dense_out, _ = gpu_attention.sparse_attention(
        q, ctx.keys, ctx.values, all_sel, interpret=_INTERPRET.value)
    ref_dense, _ = references.attention(q, ctx.keys, ctx.values)
    row = dict(q_shape=q_shape, scores_rel_err=rel_err(got_scores, want_scores),
               out_rel_err=rel_err(out, want_out),
               lse_max_abs_err=float(jnp.abs(lse - want_lse).max()),
               all_selected_vs_dense_rel_err=rel_err(dense_out, ref_dense),
               finite=bool(jnp.isfinite(out.astype(jnp.float32)).all()))
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


def run_seq_len(seq_len: int, copy_gbs: float) -> list[dict]:
  """All cases of one fixed-context length."""
  num_kv_heads, head_dim, window = (_NUM_KV_HEADS.value, _HEAD_DIM.value,
                                    _WINDOW.value)
  num_keys = seq_len - window
  num_clusters = math.ceil(_PERCENT_CLUSTERS.value / 100 * num_keys)
  ctx = synthetic.clustered_context(
      jax.random.key(seq_len), num_kv_heads=num_kv_heads, num_keys=num_keys,
      num_clusters=num_clusters, head_dim=head_dim)
  wk, wv = (jax.random.normal(k, (num_kv_heads, window, head_dim),
                              jnp.bfloat16)
            for k in jax.random.split(jax.random.key(1), 2))
  # Two input sets (K and V swapped, centroids negated) defeat the L2.
  contexts = [(ctx.keys, ctx.values, ctx.centroids),
              (ctx.values, ctx.keys, -ctx.centroids)]
  dense_kv = [
      tuple(jnp.concatenate([a, w], axis=1).transpose(1, 0, 2)[None]
            for a, w in ((k, wk), (v, wv))) for k, v, _ in contexts]
  results = []
  dense_cache = {}
  for case in _CASES.value:
    batch, tokens = parse_case(case)
    q_shape = ((batch, _NUM_HEADS.value, head_dim) if tokens is None
               else (batch, tokens, _NUM_HEADS.value, head_dim))
    qs = [jax.random.normal(jax.random.key(i), q_shape, jnp.bfloat16)
          for i in range(2)]
    if case not in dense_cache:
      dense_cache[case] = {}
      for impl in ["cudnn"] + (["xla"] if _DENSE_XLA.value else []):
        fn = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
            q.reshape(1, -1, *q.shape[-2:]), k, v, implementation=impl))
        try:
          dense_cache[case][impl] = timed_ms(
              fn, [(q, *kv) for q, kv in zip(qs, dense_kv)])
        except Exception as e:  # pylint: disable=broad-except
          print(f"dense {impl} {case} failed: {type(e).__name__}: "
                f"{str(e)[:200]}", flush=True)
          dense_cache[case][impl] = None
    ref_scores = jax.jit(references.centroid_scores)(qs[0], ctx.centroids,
                                                     ctx.counts)
    for budget in map(float, _BUDGETS.value):
      tau = calibrate_threshold(ref_scores, ctx.counts, budget)
      probe = selection_lib.select_clusters(
          ref_scores, ctx.counts, ctx.offsets, max_rows=num_keys,
          threshold=tau)
      most = int(probe.num_rows.max())
      max_rows = -(-max(most, int(1.25 * budget * num_keys)) // 512) * 512

      def lookup(q, centroids, backend):
        scores = pk.centroid_scores(q, centroids, ctx.counts, backend=backend,
                                    interpret=_INTERPRET.value)
        return pk.select_clusters(scores, ctx.counts, ctx.offsets,
                                  max_rows=max_rows, threshold=tau)

      def full(q, keys, values, centroids):
        out, lse, _ = pk.squeezed_lookup_attention(
            q, keys, values, centroids, ctx.counts, ctx.offsets,
            max_rows=max_rows, threshold=tau, window_keys=wk,
            window_values=wv, backend="gpu", interpret=_INTERPRET.value)
        return out, lse

      lookup_gpu = jax.jit(functools.partial(lookup, backend="gpu"))
      lookup_xla = jax.jit(functools.partial(lookup, backend="xla"))
      sparse = jax.jit(functools.partial(pk.sparse_attention, backend="gpu",
                                         interpret=_INTERPRET.value))
      full_jit = jax.jit(full)
      sels = [lookup_gpu(q, c) for q, (_, _, c) in zip(qs, contexts)]
      selected = float(np.mean(np.asarray(sels[0].num_rows))) / num_keys
      truncated = int((np.asarray(sels[0].num_rows) >= max_rows).sum())
      row = dict(seq_len=seq_len, budget=budget, case=case, batch=batch,
                 tokens=tokens, num_kv_heads=num_kv_heads,
                 num_heads=_NUM_HEADS.value, head_dim=head_dim,
                 num_clusters=num_clusters, max_rows=max_rows,
                 selected_fraction=selected, truncated_heads=truncated,
                 dense_cudnn_ms=dense_cache[case]["cudnn"],
                 dense_xla_ms=dense_cache[case].get("xla"))
      row["lookup_ms"] = timed_ms(lookup_gpu, [(q, c) for q, (_, _, c) in
                                               zip(qs, contexts)])
      scores_gpu = jax.jit(functools.partial(
          pk.centroid_scores, backend="gpu", interpret=_INTERPRET.value))
      row["scores_ms"] = timed_ms(
          scores_gpu, [(q, c, ctx.counts) for q, (_, _, c) in
                       zip(qs, contexts)])
      select = jax.jit(functools.partial(
          pk.select_clusters, max_rows=max_rows, threshold=tau))
      row["select_ms"] = timed_ms(
          select, [(s, ctx.counts, ctx.offsets) for s in
                   (ref_scores, ref_scores + 0)])
      row["lookup_xla_ms"] = timed_ms(lookup_xla, [(q, c) for q, (_, _, c) in
                                                   zip(qs, contexts)])
      row["sparse_ms"] = timed_ms(
          sparse, [(q, k, v, s) for q, (k, v, _), s in
                   zip(qs, contexts, sels)])
      row["total_ms"] = timed_ms(full_jit, [(q, *c) for q, c in
                                            zip(qs, contexts)])
      row["total_bf16_centroids_ms"] = timed_ms(
          full_jit, [(q, k, v, c.astype(jnp.bfloat16)) for q, (k, v, c) in
                     zip(qs, contexts)])
      kv_bytes = float(np.asarray(sels[0].num_rows).sum()) * 2 * head_dim * 2
      row["sparse_gbs"] = kv_bytes / (row["sparse_ms"] * 1e-3) / 1e9
      row["sparse_fraction_of_copy_bw"] = row["sparse_gbs"] / copy_gbs
      row["lookup_share"] = row["lookup_ms"] / row["total_ms"]
      for impl in ("cudnn", "xla"):
        dense_ms = dense_cache[case].get(impl)
        for key in ("total", "total_bf16_centroids"):
          row[f"speedup_{key}_vs_{impl}"] = (
              dense_ms / row[f"{key}_ms"] if dense_ms else None)
      print("case", json.dumps(row), flush=True)
      results.append(row)
  return results


def sweep(copy_gbs: float) -> list[dict]:
  """Times tile variants and the selection's steps (tuning, not the report)."""
  seq_len, budget = int(_SEQ_LENS.value[-1]), float(_BUDGETS.value[0])
  num_kv_heads, head_dim = _NUM_KV_HEADS.value, _HEAD_DIM.value
  num_keys = seq_len - _WINDOW.value
  num_clusters = math.ceil(_PERCENT_CLUSTERS.value / 100 * num_keys)
  ctx = synthetic.clustered_context(
      jax.random.key(seq_len), num_kv_heads=num_kv_heads, num_keys=num_keys,
      num_clusters=num_clusters, head_dim=head_dim)
  contexts = [(ctx.keys, ctx.values, ctx.centroids),
              (ctx.values, ctx.keys, -ctx.centroids)]
  lookup_tiles = {
      "decode": [(64, 64, 4, 1), (64, 128, 4, 1), (64, 128, 4, 2),
                 (64, 128, 8, 1), (64, 256, 8, 1), (64, 32, 4, 1)],
      "prefill": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 4, 2),
                  (128, 128, 8, 2), (128, 128, 4, 2), (64, 64, 4, 3)]}
  attention_tiles = {
      "decode": [(16, 64, 512, 4, 3), (16, 64, 256, 4, 3),
                 (16, 128, 512, 4, 3), (16, 128, 1024, 8, 3),
                 (16, 32, 256, 4, 4), (16, 64, 512, 4, 4),
                 (16, 64, 1024, 4, 2)],
      "prefill": [(128, 64, None, 8, 2), (128, 128, None, 8, 2),
                  (64, 64, None, 4, 3), (128, 64, None, 8, 3),
                  (128, 32, None, 4, 3), (64, 128, None, 4, 2)]}
  rows = []

  def record(case, name, ms_fn, **extra):
    try:
      ms = ms_fn()
    except Exception as e:  # pylint: disable=broad-except
      print(f"sweep {case} {name} failed: {str(e)[:150]}", flush=True)
      return
    row = dict(case=case, variant=name, ms=ms,
               **{k: f(ms) for k, f in extra.items()})
    print("sweep", json.dumps(row), flush=True)
    rows.append(row)

  for case in ("decode1", "decode8", "prefill2048"):
    batch, tokens = parse_case(case)
    kind = "decode" if tokens is None else "prefill"
    q_shape = ((batch, _NUM_HEADS.value, head_dim) if tokens is None
               else (batch, tokens, _NUM_HEADS.value, head_dim))
    qs = [jax.random.normal(jax.random.key(i), q_shape, jnp.bfloat16)
          for i in range(2)]
    q_sets = [(q, c, ctx.counts) for q, (_, _, c) in zip(qs, contexts)]
    record(case, "scores xla f32", lambda: timed_ms(
        jax.jit(functools.partial(pk.centroid_scores, backend="xla")), q_sets))
    record(case, "scores xla bf16", lambda: timed_ms(
        jax.jit(functools.partial(pk.centroid_scores, backend="xla")),
        [(q, c.astype(jnp.bfloat16), n) for q, c, n in q_sets]))
    for bm, bk, warps, stages in lookup_tiles[kind]:
      tiles = pk.LookupBlockSizes(block_m=bm, block_k=bk, num_warps=warps,
                                  num_stages=stages)
      fn = jax.jit(functools.partial(pk.centroid_scores, backend="gpu",
                                     interpret=_INTERPRET.value,
                                     block_sizes=tiles))
      record(case, f"scores gpu {bm}x{bk} w{warps} s{stages}",
             functools.partial(timed_ms, fn, q_sets))
    scores = jax.jit(references.centroid_scores)(qs[0], ctx.centroids,
                                                 ctx.counts)
    tau = calibrate_threshold(scores, ctx.counts, budget)
    max_rows = -(-int(1.25 * budget * num_keys) // 512) * 512
    score_sets = [(scores,), (scores + 0,)]
    kept = lambda s: jnp.where(s > tau, ctx.counts[None], 0)
    record(case, "select full", lambda: timed_ms(jax.jit(
        lambda s: pk.select_clusters(s, ctx.counts, ctx.offsets,
                                     max_rows=max_rows, threshold=tau)),
                                         score_sets))
    record(case, "select step: keep + cumsum over K", lambda: timed_ms(
        jax.jit(lambda s: jnp.cumsum(kept(s), axis=-1)), score_sets))
    record(case, "select step: cumsum over R", lambda: timed_ms(
        jax.jit(lambda s: jnp.cumsum(jnp.broadcast_to(
            kept(s)[..., :1], (*s.shape[:2], max_rows)), axis=-1)),
        score_sets))
    slots = lambda s: jnp.cumsum(kept(s), axis=-1).reshape(-1, num_clusters)
    record(case, "select step: keep + cumsum K + scatter", lambda: timed_ms(
        jax.jit(lambda s: jax.vmap(
            lambda i, v: jnp.zeros(max_rows, jnp.int32).at[i].add(
                v, mode="drop"))(slots(s), slots(s))), score_sets))

    sel = pk.select_clusters(scores, ctx.counts, ctx.offsets,
                             max_rows=max_rows, threshold=tau)
    kv_bytes = float(np.asarray(sel.num_rows).sum()) * 2 * head_dim * 2
    sel_sets = [(q, k, v, sel) for q, (k, v, _) in zip(qs, contexts)]
    for bm, br, sr, warps, stages in attention_tiles[kind]:
      tiles = pk.AttentionBlockSizes(block_m=bm, block_rows=br, split_rows=sr,
                                     num_warps=warps, num_stages=stages)
      fn = jax.jit(functools.partial(pk.sparse_attention, backend="gpu",
                                     interpret=_INTERPRET.value,
                                     block_sizes=tiles))
      record(case, f"sparse {bm}x{br} split {sr} w{warps} s{stages}",
             functools.partial(timed_ms, fn, sel_sets),
             fraction_of_copy_bw=lambda ms: kv_bytes / (ms * 1e-3) / 1e9
             / copy_gbs)
  return rows


def summary_table(rows: list[dict]) -> str:
  """A markdown table of the results."""
  header = ("| S | budget | case | sel. | dense cuDNN ms | dense XLA ms | "
            "lookup ms [scores, select] (XLA lookup) | sparse ms | "
            "total ms (bf16 C) | x cuDNN (bf16 C) | x XLA | lookup share | "
            "sparse GB/s (% copy) |")
  lines = [header, "|" + "---|" * 13]
  fmt = lambda x, f="{:.3f}": "n/a" if x is None else f.format(x)
  for r in rows:
    lines.append(
        f"| {r['seq_len']} | {r['budget']} | {r['case']} | "
        f"{r['selected_fraction']:.3f} | {fmt(r['dense_cudnn_ms'])} | "
        f"{fmt(r['dense_xla_ms'])} | {r['lookup_ms']:.3f} "
        f"[{r['scores_ms']:.3f}, {r['select_ms']:.3f}] "
        f"({r['lookup_xla_ms']:.3f}) | {r['sparse_ms']:.3f} | "
        f"{r['total_ms']:.3f} ({r['total_bf16_centroids_ms']:.3f}) | "
        f"{fmt(r['speedup_total_vs_cudnn'], '{:.2f}')} "
        f"({fmt(r['speedup_total_bf16_centroids_vs_cudnn'], '{:.2f}')}) | "
        f"{fmt(r['speedup_total_vs_xla'], '{:.2f}')} | "
        f"{r['lookup_share']:.2f} | {r['sparse_gbs']:.0f} "
        f"({100 * r['sparse_fraction_of_copy_bw']:.0f}%) |")
  return "\n".join(lines)


def main(argv):
  del argv
  print(jax.__version__, jax.devices(), flush=True)
  report = {"jax": jax.__version__, "device": str(jax.devices()[0])}
  if _CHECK.value:
    report["check"] = check_kernels()
  report["copy_gbs"] = copy_bandwidth()
  print(f"copy bandwidth {report['copy_gbs']:.0f} GB/s", flush=True)
  tiny = [(jnp.full((8, 128), float(i)),) for i in range(2)]
  report["dispatch_floor_ms"] = timed_ms(jax.jit(lambda x: x + 1), tiny)
  print(f"one-kernel call floor {report['dispatch_floor_ms']:.4f} ms",
        flush=True)
  if _SWEEP.value:
    report["sweep"] = sweep(report["copy_gbs"])
    if _OUT.value:
      with open(_OUT.value, "w") as f:
        json.dump(report, f, indent=1)
    return
  report["cases"] = []
  for seq_len in map(int, _SEQ_LENS.value):
    report["cases"] += run_seq_len(seq_len, report["copy_gbs"])
    if _OUT.value:
      with open(_OUT.value, "w") as f:
        json.dump(report, f, indent=1)
  print(summary_table(report["cases"]), flush=True)


if __name__ == "__main__":
  app.run(main)
