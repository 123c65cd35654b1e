"""Tests of pallas_kernels.hierarchical (two-level lookup) vs the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import hierarchical
from pallas_kernels import references
from pallas_kernels import synthetic

NUM_KV_HEADS, NUM_CLUSTERS, NUM_COARSE = 2, 24, 5


@pytest.fixture(scope="module")
def levels():
  ctx = synthetic.clustered_context(
      jax.random.key(0), num_kv_heads=NUM_KV_HEADS, num_keys=400,
      num_clusters=NUM_CLUSTERS, head_dim=16, dtype=jnp.float32)
  coarse = synthetic.coarse_level(jax.random.key(1), ctx.centroids,
                                  ctx.counts, NUM_COARSE)
  return ctx, coarse


@pytest.mark.parametrize("shape", [(3, 4, 16), (2, 5, 8, 16)])
def test_matches_reference(levels, shape):
  ctx, coarse = levels
  q = jax.random.normal(jax.random.key(2), shape)
  coarse_scores = references.centroid_scores(q, coarse[0], coarse[1])
  threshold = float(jnp.quantile(coarse_scores, 0.5))
  want, want_kept = references.hierarchical_centroid_scores(
      q, ctx.centroids, ctx.counts, *coarse, coarse_threshold=threshold)
  got, kept = hierarchical.hierarchical_centroid_scores(
      q, ctx.centroids, ctx.counts, *coarse, coarse_threshold=threshold,
      max_fine_clusters=NUM_CLUSTERS)
  np.testing.assert_array_equal(kept, want_kept)
  assert 0 < np.asarray(kept).sum() < kept.size
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)


def test_candidate_cap_scores_only_the_first_fine_clusters(levels):
  ctx, coarse = levels
  q = jax.random.normal(jax.random.key(3), (1, 4, 16))
  got, kept = hierarchical.hierarchical_centroid_scores(
      q, ctx.centroids, ctx.counts, *coarse, coarse_threshold=-1.0,
      max_fine_clusters=7)
  assert np.asarray(kept).all()
  np.testing.assert_array_equal(got[..., 7:], 0.0)
  assert (np.asarray(got[..., :7]) > 0).any()


def test_fine_candidates_and_the_budget_they_leave():
  coarse_offsets = jnp.array([[0, 3, 4, 9], [0, 1, 5, 9]])  # 3 coarse each
  kept_coarse = jnp.array([[[True, False, True], [False, True, True]]])
  candidates = hierarchical.fine_candidates(kept_coarse, coarse_offsets)
  np.testing.assert_array_equal(candidates, [[8, 8]])
  kept_coarse = kept_coarse.at[0, 1].set([True, False, False])
  candidates = hierarchical.fine_candidates(kept_coarse, coarse_offsets)
  np.testing.assert_array_equal(candidates, [[8, 1]])
  left = hierarchical.key_budget_after_fine_lookup(10, kept_coarse,
                                                   coarse_offsets, 0.5)
  np.testing.assert_array_equal(left, [[6, 9]])  # 10 - ceil(0.5 x scored)
  capped = hierarchical.key_budget_after_fine_lookup(
      jnp.array([[10, 3]]), kept_coarse, coarse_offsets, 0.5,
      max_fine_clusters=5)
  np.testing.assert_array_equal(capped, [[7, 2]])
  np.testing.assert_array_equal(hierarchical.key_budget_after_fine_lookup(
      3, kept_coarse, coarse_offsets, 1.0), [[0, 2]])  # never below 0

