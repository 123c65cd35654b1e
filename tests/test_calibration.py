"""Tests of squeezed_jax.calibration against float64 numpy references with per-key scores."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from squeezed_jax import calibration


def _reference_scores(queries: np.ndarray, centroids: np.ndarray,
                      counts: np.ndarray) -> np.ndarray:
  """float64 loops. queries [Tq, Hq, D], centroids [Hkv, K, D], counts [Hkv, K] -> [Hkv, K]."""
  num_queries, num_heads, head_dim = queries.shape
  num_kv_heads, num_clusters, _ = centroids.shape
  group = num_heads // num_kv_heads
  out = np.zeros((num_kv_heads, num_clusters))
  for kv_head in range(num_kv_heads):
    live = counts[kv_head] > 0
    per_head = []
    for head in range(kv_head * group, (kv_head + 1) * group):
      s = np.zeros((num_queries, num_clusters))
      for t in range(num_queries):
        logits = centroids[kv_head].astype(np.float64) @ queries[t, head] / np.sqrt(head_dim)
        shift = logits[live].max()
        denominator = np.sum(counts[kv_head][live] * np.exp(logits[live] - shift))
        s[t, live] = np.exp(logits[live] - shift) / denominator
      per_head.append(s.mean(0))
    out[kv_head] = np.max(per_head, axis=0)
  return out


def _problem(seed: int, num_heads: int, num_kv_heads: int, num_clusters: int = 9,
             num_queries: int = 5, head_dim: int = 16, leading=()):
  rng = np.random.default_rng(seed)
  queries = rng.normal(size=(*leading, num_queries, num_heads, head_dim)).astype(np.float32)
  centroids = rng.normal(size=(*leading, num_kv_heads, num_clusters, head_dim)).astype(np.float32)
  counts = rng.integers(0, 6, size=(*leading, num_kv_heads, num_clusters)).astype(np.int32)
  counts[..., 0] = 0  # at least one empty cluster per head
  counts[..., 1] = np.maximum(counts[..., 1], 1)  # and at least one non-empty
  return queries, centroids, counts


def _reference_thresholds(queries, centroids, counts, percentiles):
  """Per-key float64 scores pooled over layers and heads; tau_p as defined in the module."""
  scores = np.stack([_reference_scores(queries[l], centroids[l], counts[l])
                     for l in range(len(queries))])
  per_key = np.sort(np.repeat(scores.reshape(-1), counts.reshape(-1)))
  at_most_fraction = np.arange(1, len(per_key) + 1) / len(per_key)
  taus = np.array([per_key[np.argmax(at_most_fraction >= p)] for p in percentiles])
  kept = np.stack([[[np.sum(np.repeat(scores[l, h], counts[l, h]) > tau) / counts[l, h].sum()
                     for h in range(scores.shape[1])] for l in range(scores.shape[0])]
                   for tau in taus])
  return taus, kept


@pytest.mark.parametrize("group", [1, 4])
def test_calibrate_thresholds_match_per_key_reference(group):
  """tau_p within rtol 1e-5 of the float64 per-key quantile; kept fractions equal (to 1e-6)."""
  queries, centroids, counts = _problem(3, num_heads=2 * group, num_kv_heads=2, num_clusters=40,
                                        num_queries=7, leading=(3,))
  percentiles = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0)
  result = calibration.calibrate_thresholds(queries, centroids, counts, percentiles)
  taus, kept = _reference_thresholds(queries, centroids, counts, percentiles)
  np.testing.assert_allclose(result.percentiles, percentiles)
  np.testing.assert_allclose(result.thresholds, taus, rtol=1e-5)
  np.testing.assert_allclose(result.kept_fraction, kept, atol=1e-6)
  total_kept = np.sum(np.asarray(result.kept_fraction) * counts.sum(-1), axis=(1, 2))
  assert np.all(total_kept <= (1 - np.asarray(percentiles)) * counts.sum() + 1e-3)


def test_weighted_quantiles_exact_fractions_and_ties():
  """Values 1, 2, 2, 3 with weights 3, 1, 1, 5 (10 keys): fractions at most 0.3, 0.5, 1.0."""
  values = jnp.array([3.0, 2.0, 1.0, 2.0, 7.0])
  weights = jnp.array([5, 1, 3, 1, 0])  # the weight-0 value 7 is never a quantile
  quantiles = calibration.weighted_quantiles(values, weights, (0.0, 0.3, 0.31, 0.5, 0.51, 1.0))
  np.testing.assert_array_equal(quantiles, [1.0, 1.0, 2.0, 2.0, 3.0, 3.0])


def test_coarse_calibration_weights_coarse_clusters_by_their_keys():
  queries, centroids, counts = _problem(4, num_heads=4, num_kv_heads=2, num_clusters=6,
                                        leading=(2,))
  coarse = calibration.calibrate_coarse_thresholds(queries, centroids, counts, (0.5, 0.9))
  taus, kept = _reference_thresholds(queries, centroids, counts, (0.5, 0.9))
  np.testing.assert_allclose(coarse.thresholds, taus, rtol=1e-5)
  np.testing.assert_allclose(coarse.kept_fraction, kept, atol=1e-6)


def test_invalid_shapes_raise():
  queries, centroids, counts = _problem(5, num_heads=4, num_kv_heads=2, leading=(2,))
  with pytest.raises(ValueError, match="layer counts differ"):
    calibration.calibrate_thresholds(queries[:1], centroids, counts)
  with pytest.raises(ValueError, match="percentiles"):
    calibration.calibrate_thresholds(queries, centroids, counts, (0.5, 1.5))
