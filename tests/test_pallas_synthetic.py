"""Tests of pallas_kernels.synthetic: the generated contexts obey the layout."""

from __future__ import annotations

import jax
import numpy as np

from pallas_kernels import synthetic


def test_clustered_context_follows_layout():
  ctx = synthetic.clustered_context(jax.random.key(0), num_kv_heads=2,
                                    num_keys=500, num_clusters=30, head_dim=8)
  counts, offsets = np.asarray(ctx.counts), np.asarray(ctx.offsets)
  np.testing.assert_array_equal(counts.sum(-1), 500)
  np.testing.assert_array_equal(offsets[:, 0], 0)
  np.testing.assert_array_equal(np.diff(offsets, axis=-1), counts)
  keys = np.asarray(ctx.keys, np.float32)
  for h in range(2):
    for c in range(30):
      block = keys[h, offsets[h, c]:offsets[h, c + 1]]
      want = block.mean(0) if len(block) else np.zeros(8)
      np.testing.assert_allclose(ctx.centroids[h, c], want, rtol=1e-5,
                                 atol=1e-6)


def test_coarse_level_groups_contiguous_fine_clusters():
  ctx = synthetic.clustered_context(jax.random.key(1), num_kv_heads=2,
                                    num_keys=300, num_clusters=20, head_dim=8)
  coarse_centroids, coarse_counts, coarse_offsets = synthetic.coarse_level(
      jax.random.key(2), ctx.centroids, ctx.counts, 4)
  counts = np.asarray(ctx.counts)
  for h in range(2):
    for c in range(4):
      fine = range(coarse_offsets[h, c], coarse_offsets[h, c + 1])
      assert coarse_counts[h, c] == counts[h, list(fine)].sum()
      nonempty = [f for f in fine if counts[h, f] > 0]
      want = (np.asarray(ctx.centroids)[h, nonempty].mean(0) if nonempty
              else np.zeros(8))
      np.testing.assert_allclose(coarse_centroids[h, c], want, rtol=1e-5,
                                 atol=1e-6)
