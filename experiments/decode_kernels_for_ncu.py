"""Runs the decode kernels a few times, for Nsight Compute (ncu) to profile.

Two decode paths over one synthetic clustered context (the shapes of
`bench_attention`: Hq = Hkv = 32, D = 128, bf16 K/V, 5% centroids in bf16),
one query token, a key budget:
  * fused: `squeezed_decode_attention(key_budget=)` (lookup pass, budget cut,
    selection, attention, reduce);
  * row list: the same budget's row list (selected once, before the calls) and
    `sparse_attention` (split-K kernel, reduce).
ncu replays each kernel and restores the memory it writes, so XLA must not
preallocate the GPU's memory. On the H200 (from the repository root):

  XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD \\
    ncu --clock-control none --section SpeedOfLight --section Occupancy \\
    --section WarpStateStats --section SchedulerStats -k regex:squeezed \\
    -c 8 python3 -m experiments.decode_kernels_for_ncu

profiles the first call of each path (8 kernels: the row list's lookup, then
the fused path's five and the row-list path's two). Results: RESULTS.md,
"Sixth pass".
"""

from __future__ import annotations

import math

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

import pallas_kernels as pk
from pallas_kernels import synthetic

_SEQ_LEN = flags.DEFINE_integer("seq_len", 131072, "Fixed-context tokens S.")
_BUDGET = flags.DEFINE_float("budget", 0.125, "Fraction of the keys read.")
_CALLS = flags.DEFINE_integer("calls", 3, "Calls of each path.")
_WINDOW = flags.DEFINE_integer("window", 100, "Observation window W.")
_HEADS = flags.DEFINE_integer("heads", 32, "Query and KV heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "D.")
_INTERPRET = flags.DEFINE_bool(
    "interpret", False, "Pallas interpreter (a CPU smoke test of this script).")


def decode_paths(seq_len: int, budget: float, *, window: int, heads: int,
                 head_dim: int, interpret: bool) -> dict:
  """The two decode paths by name: (jitted function, its arguments)."""
  num_keys = seq_len - window
  ctx = synthetic.clustered_context(
      jax.random.key(seq_len), num_kv_heads=heads, num_keys=num_keys,
      num_clusters=math.ceil(0.05 * num_keys), head_dim=head_dim)
  window_kv = tuple(
      jax.random.normal(k, (heads, window, head_dim), jnp.bfloat16)
      for k in jax.random.split(jax.random.key(1), 2))
  q = jax.random.normal(jax.random.key(0), (1, heads, head_dim), jnp.bfloat16)
  centroids = ctx.centroids.astype(jnp.bfloat16)
  key_budget = max(1, round(budget * num_keys))
  kernels = dict(backend="gpu", interpret=interpret)

  def fused(q, keys, values, centroids, counts, offsets, window_keys,
            window_values):
    return pk.squeezed_decode_attention(
        q, keys, values, centroids, counts, offsets, key_budget=key_budget,
        window_keys=window_keys, window_values=window_values, **kernels)[0]

  def row_list(q, keys, values, selection, window_keys, window_values):
    return pk.sparse_attention(q, keys, values, selection,
                               window_keys=window_keys,
                               window_values=window_values, **kernels)[0]

  scores = pk.centroid_scores(q, centroids, ctx.counts, **kernels)
  selection = pk.select_clusters(scores, ctx.counts, ctx.offsets,
                                 max_rows=key_budget, key_budget=key_budget)
  return {
      "fused": (jax.jit(fused), (q, ctx.keys, ctx.values, centroids,
                                 ctx.counts, ctx.offsets, *window_kv)),
      "row list": (jax.jit(row_list),
                   (q, ctx.keys, ctx.values, selection, *window_kv)),
  }


def main(argv):
  del argv
  paths = decode_paths(_SEQ_LEN.value, _BUDGET.value, window=_WINDOW.value,
                       heads=_HEADS.value, head_dim=_HEAD_DIM.value,
                       interpret=_INTERPRET.value)
  for _ in range(_CALLS.value):
    for name, (fn, args) in paths.items():
      out = jax.block_until_ready(fn(*args))
      print(name, out.shape, flush=True)


if __name__ == "__main__":
  app.run(main)
