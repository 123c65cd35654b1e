"""Tests of squeezed_jax.kmeans: quality vs scikit-learn, batching, determinism, empty clusters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

from squeezed_jax.kmeans import KMeansResult, cluster_sums, kmeans

SEEDS = (0, 1, 2, 3)


def _blobs(seed: int, centers: int, num_points: int = 1500, dim: int = 8) -> np.ndarray:
  points, _ = make_blobs(n_samples=num_points, centers=centers, n_features=dim,
                         cluster_std=1.0, random_state=seed)
  return points.astype(np.float32)


def _normalized(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _spherical_inertia(points: np.ndarray, labels: np.ndarray, num_clusters: int) -> float:
  """sum |x - c|^2 over unit points x and unit centroids c = normalised cluster means."""
  inertia = 0.0
  for c in range(num_clusters):
    members = points[labels == c].astype(np.float64)
    if len(members):
      centroid = _normalized(members.sum(0))
      inertia += np.sum((members - centroid)**2)
  return inertia


# Blobs over-clustered (K > number of blobs), the regime of key clustering (K = 5% of the keys):
# there both algorithms reach comparable optima for every seed. With K equal to the number of
# well-separated blobs each run lands in a seed-dependent local optimum (+-10% between seeds for
# scikit-learn itself), so no tolerance of 2% could be fair there.
@pytest.mark.parametrize("centers,num_clusters,options", [(10, 20, {}), (30, 60, {}),
                                                          (30, 60, {"seeding_steps": 30})])
def test_euclidean_inertia_within_2_percent_of_sklearn(centers, num_clusters, options):
  """Mean inertia over 4 seeds <= 1.02 x scikit-learn's (k-means++, n_init=1, same seeds).

  seeding_steps=30 with K=60 adds 2 seeds per seeding step, the path used at scale.
  """
  ours, reference = [], []
  for seed in SEEDS:
    points = _blobs(seed, centers)
    result = kmeans(jnp.asarray(points), num_clusters, key=jax.random.key(seed),
                               **options)
    labels, centroids = np.asarray(result.labels), np.asarray(result.centroids)
    recomputed = np.sum((points.astype(np.float64) - centroids[labels])**2)
    np.testing.assert_allclose(float(result.inertia), recomputed, rtol=1e-4)
    ours.append(recomputed)
    reference.append(KMeans(num_clusters, init="k-means++", n_init=1,
                            random_state=seed).fit(points).inertia_)
  assert np.mean(ours) <= 1.02 * np.mean(reference), (ours, reference)


def test_spherical_inertia_within_2_percent_of_sklearn():
  """Cosine objective over 4 seeds <= 1.02 x that of scikit-learn's partition of the unit points.

  The reference partition is scikit-learn's Euclidean K-means on the L2-normalised points,
  scored with normalised cluster means, as spherical K-means scores its own.
  """
  num_clusters = 20
  ours, reference = [], []
  for seed in SEEDS:
    points = _normalized(_blobs(seed, centers=10, dim=16))
    scale = np.random.default_rng(seed).uniform(0.5, 3.0, size=(len(points), 1))
    result = kmeans(jnp.asarray(points * scale, jnp.float32), num_clusters,
                               key=jax.random.key(seed), spherical=True)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(result.centroids), axis=-1), 1.0,
                               rtol=1e-5)
    ours.append(_spherical_inertia(points, np.asarray(result.labels), num_clusters))
    np.testing.assert_allclose(float(result.inertia), ours[-1], rtol=1e-4)
    sklearn_labels = KMeans(num_clusters, init="k-means++", n_init=1,
                            random_state=seed).fit(points).labels_
    reference.append(_spherical_inertia(points, sklearn_labels, num_clusters))
  assert np.mean(ours) <= 1.02 * np.mean(reference), (ours, reference)


def _random_problems(seed: int, shape=(2, 3, 300, 4)) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), shape)


def test_batched_equals_per_item_and_deterministic():
  points = _random_problems(0)
  key = jax.random.key(42)
  options = dict(heads_per_step=4, chunk_size=64, max_iters=20)
  batched = kmeans(points, 7, key=key, **options)
  again = kmeans(points, 7, key=key, **options)
  per_problem_keys = jax.random.split(key, 6).reshape(2, 3)
  with_key_array = kmeans(points, 7, key=per_problem_keys, **options)
  for field in KMeansResult._fields:
    np.testing.assert_array_equal(getattr(batched, field), getattr(again, field))
    np.testing.assert_array_equal(getattr(batched, field), getattr(with_key_array, field))
  for i in range(2):
    for j in range(3):
      single = kmeans(points[i, j], 7, key=per_problem_keys[i, j], **options)
      np.testing.assert_array_equal(single.labels, batched.labels[i, j])
      np.testing.assert_array_equal(single.counts, batched.counts[i, j])
      np.testing.assert_allclose(single.centroids, batched.centroids[i, j], rtol=1e-6,
                                 atol=1e-6)
      np.testing.assert_allclose(single.inertia, batched.inertia[i, j], rtol=1e-6)
  other = kmeans(points, 7, key=jax.random.key(43), **options)
  assert not np.array_equal(other.labels, batched.labels)


def test_chunk_and_group_sizes_do_not_change_the_result():
  points = _random_problems(1)
  key = jax.random.key(7)
  small = kmeans(points, 7, key=key, heads_per_step=4, chunk_size=64, max_iters=20)
  whole = kmeans(points, 7, key=key, heads_per_step=1, chunk_size=4096, max_iters=20)
  np.testing.assert_array_equal(small.labels, whole.labels)
  np.testing.assert_array_equal(small.counts, whole.counts)
  np.testing.assert_allclose(small.centroids, whole.centroids, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spherical", [False, True])
def test_more_clusters_than_distinct_points(spherical):
  """5 distinct points (one of them zero) repeated 12 times, K = 8: 3 clusters stay empty."""
  distinct = np.random.default_rng(3).normal(size=(5, 6)).astype(np.float32)
  distinct[0] = 0.0
  points = np.repeat(distinct, 12, axis=0)[np.random.default_rng(4).permutation(60)]
  result = kmeans(jnp.asarray(points), 8, key=jax.random.key(0), spherical=spherical)
  counts = np.asarray(result.counts)
  assert np.all(np.isfinite(result.centroids)) and np.isfinite(result.inertia)
  assert counts.sum() == 60 and np.sum(counts > 0) == 5 and np.sum(counts == 12) == 5
  # Exactly 0, up to the cancellation in |x|^2 - 2 x.c + |c|^2 (float32, |x|^2 ~ 6).
  np.testing.assert_allclose(float(result.inertia), 0.0, atol=1e-4)
  norms = np.linalg.norm(points, axis=-1, keepdims=True)
  target = points / np.maximum(norms, 1e-30) if spherical else points
  np.testing.assert_allclose(np.asarray(result.centroids)[np.asarray(result.labels)], target,
                             atol=1e-5)


def test_empty_cluster_is_reseeded_when_points_remain_far():
  """K = N distinct points: every cluster ends with exactly one point (re-seeding fills them)."""
  points = np.random.default_rng(5).normal(size=(40, 3)).astype(np.float32)
  result = kmeans(jnp.asarray(points), 40, key=jax.random.key(1), seed_oversampling=1)
  np.testing.assert_array_equal(result.counts, np.ones(40))
  np.testing.assert_allclose(float(result.inertia), 0.0, atol=1e-5)


def test_bfloat16_points_close_to_float32():
  points = jnp.asarray(_blobs(0, centers=10))
  f32 = kmeans(points, 20, key=jax.random.key(0))
  bf16 = kmeans(points.astype(jnp.bfloat16), 20, key=jax.random.key(0))
  assert bf16.centroids.dtype == jnp.float32
  assert float(bf16.inertia) <= 1.03 * float(f32.inertia)


def test_cluster_sums_matches_numpy_and_ignores_out_of_range_labels():
  rng = np.random.default_rng(6)
  points = rng.normal(size=(3, 50, 5)).astype(np.float32)
  labels = rng.integers(-1, 8, size=(3, 50)).astype(np.int32)  # -1 and 7 are ignored, K = 7
  sums, counts = cluster_sums(jnp.asarray(points), jnp.asarray(labels), 7,
                                         heads_per_step=2, chunk_size=16)
  for b in range(3):
    for c in range(7):
      members = points[b][labels[b] == c].astype(np.float64)
      np.testing.assert_allclose(sums[b, c], members.sum(0), rtol=1e-5, atol=1e-5)
      assert counts[b, c] == len(members)


def test_invalid_arguments_raise():
  points = jnp.ones((2, 10, 3))
  with pytest.raises(ValueError, match="num_clusters=11"):
    kmeans(points, 11, key=jax.random.key(0))
  with pytest.raises(ValueError, match="key must be"):
    kmeans(points, 3, key=jax.random.split(jax.random.key(0), 3))
  with pytest.raises(ValueError, match="chunk_size=0"):
    kmeans(points, 3, key=jax.random.key(0), chunk_size=0)
