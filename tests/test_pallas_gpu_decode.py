"""The fused GPU decode path (gpu/decode_attention.py, hierarchical_scores.py,
decode_reduce.py) vs the float32 references, in interpret mode.

Tolerances as in test_pallas_gpu.py: lse to 1e-4; outputs to 1e-2 with bf16
K/V (softmax weights rounded to bf16 before P.V), 1e-5 with float32. The kept
clusters must equal the reference's exactly (thresholds are quantiles of the
reference scores, far from any score in float32 rounding terms).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import block_sizes
from pallas_kernels import references
from pallas_kernels import selection
from pallas_kernels import synthetic
from pallas_kernels.gpu import decode_attention

NUM_KV_HEADS, NUM_KEYS, NUM_CLUSTERS, NUM_COARSE, WINDOW = 2, 300, 23, 5, 37
# Chunks of 8 clusters (the last one partial), window steps of 16 rows (3
# in all), coarse chunks of 16 (partial), lookup tiles of 16 centroids two
# per program.
TILES = block_sizes.DecodeBlockSizes(
    block_clusters=8, block_rows=16, reduce_rows=16, coarse_block=16,
    fine_block=16,
    lookup=block_sizes.LookupBlockSizes(
        block_k=16, single_pass_max_rows=16, single_pass_tiles=2))


def _inputs(batch, group, head_dim, dtype, window):
  ctx = synthetic.clustered_context(
      jax.random.key(head_dim + group), num_kv_heads=NUM_KV_HEADS,
      num_keys=NUM_KEYS, num_clusters=NUM_CLUSTERS, head_dim=head_dim,
      dtype=dtype)
  coarse = synthetic.coarse_level(jax.random.key(3), ctx.centroids,
                                  ctx.counts, NUM_COARSE)
  q = jax.random.normal(jax.random.key(batch * 7 + group),
                        (batch, NUM_KV_HEADS * group, head_dim), dtype)
  window_kv = ()
  if window:
    window_kv = tuple(jax.random.normal(
        jax.random.key(5), (2, NUM_KV_HEADS, WINDOW, head_dim), dtype))
  return ctx, coarse, q, window_kv


def _check(q, ctx, window_kv, scores, out, lse, kept, num_rows, **mode):
  """Outputs vs reference attention over the clusters that the reference
  selection keeps from `scores` in `mode` (threshold= or key_budget=)."""
  want = selection.select_clusters(scores, ctx.counts, ctx.offsets,
                                   max_rows=NUM_KEYS, **mode)
  np.testing.assert_array_equal(kept, want.clusters)
  np.testing.assert_array_equal(num_rows, want.num_rows)
  want_out, want_lse = references.attention_with_window(
      q, ctx.keys, ctx.values, selection.key_mask(want, NUM_KEYS), *window_kv)
  assert out.shape == q.shape and out.dtype == q.dtype
  tol = 1e-5 if q.dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(want_out, np.float32), rtol=tol,
                             atol=tol)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-4)
  return want


@pytest.mark.parametrize(
    "batch,group,head_dim,dtype,window",
    [
        (3, 4, 64, jnp.bfloat16, True),
        (2, 1, 128, jnp.float32, False),
    ])
def test_flat_lookup(batch, group, head_dim, dtype, window):
  """Ragged, full and empty selections (one compilation: tau is traced)."""
  ctx, _, q, window_kv = _inputs(batch, group, head_dim, dtype, window)
  scores = references.centroid_scores(q, ctx.centroids, ctx.counts)
  for which, tau in (("ragged", float(jnp.quantile(scores, 0.6))),
                     ("all", -1.0), ("none", 1.0)):
    out, lse, kept, num_rows, kept_coarse = (
        decode_attention.squeezed_decode_attention(
            q, ctx.keys, ctx.values, ctx.centroids, ctx.counts, ctx.offsets,
            tau, window_keys=window_kv[0] if window else None,
            window_values=window_kv[1] if window else None,
            block_sizes=TILES, interpret=True))
    want = _check(q, ctx, window_kv, scores, out, lse, kept, num_rows,
                  threshold=tau)
    assert kept_coarse is None
    if which == "ragged":
      assert len(np.unique(np.asarray(want.num_rows))) > 1
    if which == "all":
      np.testing.assert_array_equal(num_rows, NUM_KEYS)
    if which == "none":
      np.testing.assert_array_equal(num_rows, 0)
    if which == "none" and not window:
      assert np.isneginf(np.asarray(lse)).all()
      np.testing.assert_array_equal(np.asarray(out, np.float32), 0.0)


@pytest.mark.parametrize("piece_rows", [1, 8, 16])
def test_the_densest_piece_lists_do_not_overlap(piece_rows):
  """Clusters of 1 and piece_rows + 1 keys (one piece; two, the second
  holding one row): as many list entries per row as a chunk can have, every
  cluster kept. One-row pieces: a plain row list; pieces of a whole step."""
  counts = jnp.tile(jnp.array([1, piece_rows + 1], jnp.int32),
                    (NUM_KV_HEADS, 12))
  num_keys = int(counts[0].sum())
  keys, values = jax.random.normal(jax.random.key(8),
                                   (2, NUM_KV_HEADS, num_keys, 64))
  ctx = synthetic.ClusteredContext(
      keys=keys, values=values, centroids=synthetic.cluster_means(keys, counts),
      counts=counts, offsets=synthetic.offsets_from_counts(counts))
  q = jax.random.normal(jax.random.key(9), (2, NUM_KV_HEADS * 2, 64))
  out, lse, kept, num_rows, _ = decode_attention.squeezed_decode_attention(
      q, keys, values, ctx.centroids, counts, ctx.offsets, -1.0,
      block_sizes=dataclasses.replace(TILES, piece_rows=piece_rows),
      interpret=True)
  assert bool(kept.all())
  np.testing.assert_array_equal(num_rows, num_keys)
  want_out, want_lse = references.attention(q, keys, values)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "batch,group,head_dim,dtype,window",
    [
        (2, 4, 64, jnp.bfloat16, True),
        (3, 1, 128, jnp.float32, False),
    ])
def test_hierarchical_lookup(batch, group, head_dim, dtype, window):
  ctx, coarse, q, window_kv = _inputs(batch, group, head_dim, dtype, window)
  coarse_scores = references.centroid_scores(q, coarse[0], coarse[1])
  coarse_tau = float(jnp.quantile(coarse_scores, 0.5))
  scores, want_coarse = references.hierarchical_centroid_scores(
      q, ctx.centroids, ctx.counts, *coarse, coarse_threshold=coarse_tau)
  assert 0 < np.asarray(want_coarse).sum() < want_coarse.size
  tau = float(jnp.quantile(scores[scores > 0], 0.5))
  out, lse, kept, num_rows, kept_coarse = (
      decode_attention.squeezed_decode_attention(
          q, ctx.keys, ctx.values, ctx.centroids, ctx.counts, ctx.offsets,
          tau, window_keys=window_kv[0] if window else None,
          window_values=window_kv[1] if window else None,
          coarse_centroids=coarse[0], coarse_counts=coarse[1],
          coarse_offsets=coarse[2], coarse_threshold=coarse_tau,
          block_sizes=TILES, interpret=True))
  np.testing.assert_array_equal(kept_coarse, want_coarse)
  _check(q, ctx, window_kv, scores, out, lse, kept, num_rows, threshold=tau)


@pytest.mark.parametrize("hierarchical,fine_centroid_cost",
                         [(False, 0.0), (True, 0.0), (True, 0.5), (True, 3.0)])
def test_key_budget_keeps_the_top_clusters_of_each_sequence(
    hierarchical, fine_centroid_cost):
  """Per-(sequence, KV head) thresholds from the kernel's own lookup scores
  keep exactly the reference's top clusters within the budget (the
  hierarchical one less ceil(cost x the fine centroids it scored))."""
  batch, group = 3, 4
  ctx, coarse, q, window_kv = _inputs(batch, group, 64, jnp.float32, True)
  levels = {}
  scores = references.centroid_scores(q, ctx.centroids, ctx.counts)
  scored_fine = jnp.zeros((batch, NUM_KV_HEADS), jnp.int32)
  if hierarchical:
    coarse_tau = float(jnp.quantile(
        references.centroid_scores(q, coarse[0], coarse[1]), 0.5))
    levels = dict(coarse_centroids=coarse[0], coarse_counts=coarse[1],
                  coarse_offsets=coarse[2], coarse_threshold=coarse_tau,
                  fine_centroid_cost=fine_centroid_cost)
    scores, kept_coarse = references.hierarchical_centroid_scores(
        q, ctx.centroids, ctx.counts, *coarse, coarse_threshold=coarse_tau)
    scored_fine = jnp.where(kept_coarse, jnp.diff(coarse[2])[None], 0).sum(-1)
  for key_budget in (1, 70, NUM_KEYS):
    out, lse, kept, num_rows, _ = decode_attention.squeezed_decode_attention(
        q, ctx.keys, ctx.values, ctx.centroids, ctx.counts, ctx.offsets,
        key_budget=key_budget, window_keys=window_kv[0],
        window_values=window_kv[1], block_sizes=TILES, interpret=True,
        **levels)
    budgets = np.maximum(
        key_budget - np.ceil(fine_centroid_cost * np.asarray(scored_fine)),
        0).astype(np.int32)
    want = _check(q, ctx, window_kv, scores, out, lse, kept, num_rows,
                  key_budget=jnp.asarray(budgets))
    assert (np.asarray(num_rows) <= budgets).all()
    if key_budget == 70:
      assert len(np.unique(np.asarray(want.num_rows))) > 1
      if fine_centroid_cost:
        assert len(np.unique(budgets)) > 1


def test_selection_modes_are_exclusive():
  ctx, _, q, _ = _inputs(1, 1, 64, jnp.float32, False)
  for mode in ({}, dict(threshold=0.1, key_budget=5)):
    with pytest.raises(ValueError, match="exactly one"):
      decode_attention.squeezed_decode_attention(
          q, ctx.keys, ctx.values, ctx.centroids, ctx.counts, ctx.offsets,
          interpret=True, **mode)


def test_prefill_queries_are_rejected():
  ctx, _, _, _ = _inputs(1, 1, 64, jnp.float32, False)
  q = jnp.ones((1, 3, NUM_KV_HEADS, 64))
  with pytest.raises(ValueError, match="decode queries"):
    decode_attention.squeezed_decode_attention(
        q, ctx.keys, ctx.values, ctx.centroids, ctx.counts, ctx.offsets, 0.1,
        interpret=True)
