"""Tests of squeezed_jax.key_clustering: the invariants of the reordered fixed-context layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from squeezed_jax import key_clustering

NUM_LAYERS, NUM_KV_HEADS, NUM_KEYS, HEAD_DIM = 2, 3, 250, 16
NUM_CLUSTERS, NUM_COARSE = 13, 4


@pytest.fixture(scope="module")
def keys() -> jax.Array:
  """Clustered keys with per-head directions and varying norms (bf16, like a model's cache)."""
  rng = np.random.default_rng(0)
  modes = rng.normal(size=(NUM_LAYERS, NUM_KV_HEADS, 20, HEAD_DIM))
  picks = rng.integers(0, 20, size=(NUM_LAYERS, NUM_KV_HEADS, NUM_KEYS))
  keys = np.take_along_axis(modes, picks[..., None], axis=2)
  keys = keys * rng.uniform(0.5, 4.0, size=keys.shape[:-1] + (1,))
  keys += 0.2 * rng.normal(size=keys.shape)
  return jnp.asarray(keys, jnp.bfloat16)


@pytest.fixture(scope="module")
def flat(keys) -> key_clustering.ClusteredKeys:
  return key_clustering.cluster_keys(keys, num_clusters=NUM_CLUSTERS, key=jax.random.key(0),
                                     chunk_size=64, heads_per_step=2)


@pytest.fixture(scope="module")
def hierarchical(keys) -> key_clustering.HierarchicalClusteredKeys:
  return key_clustering.cluster_keys_hierarchical(
      keys, num_clusters=NUM_CLUSTERS, num_coarse_clusters=NUM_COARSE, key=jax.random.key(1),
      chunk_size=64, heads_per_step=2)


def _check_fine_layout(keys: jax.Array, clustered) -> None:
  """Offsets, permutation, reordered labels and centroids (means of the un-normalised keys)."""
  num_clusters = clustered.counts.shape[-1]
  assert clustered.centroids.shape == (NUM_LAYERS, NUM_KV_HEADS, num_clusters, HEAD_DIM)
  assert clustered.centroids.dtype == jnp.float32
  for name in ("counts", "offsets", "permutation", "labels"):
    assert getattr(clustered, name).dtype == jnp.int32, name
  counts, offsets = np.asarray(clustered.counts), np.asarray(clustered.offsets)
  np.testing.assert_array_equal(offsets[..., 0], 0)
  np.testing.assert_array_equal(offsets[..., 1:], np.cumsum(counts, axis=-1))
  np.testing.assert_array_equal(offsets[..., -1], NUM_KEYS)
  permutation, labels = np.asarray(clustered.permutation), np.asarray(clustered.labels)
  np.testing.assert_array_equal(np.sort(permutation, axis=-1),
                                np.broadcast_to(np.arange(NUM_KEYS), permutation.shape))
  reordered_labels = np.take_along_axis(labels, permutation, axis=-1)
  keys64 = np.asarray(keys.astype(jnp.float32), np.float64)
  reordered = np.asarray(key_clustering.reorder(keys, clustered.permutation).astype(jnp.float32))
  np.testing.assert_array_equal(reordered, np.take_along_axis(keys64, permutation[..., None], 2))
  for l in range(NUM_LAYERS):
    for h in range(NUM_KV_HEADS):
      for c in range(num_clusters):
        rows = slice(offsets[l, h, c], offsets[l, h, c + 1])
        np.testing.assert_array_equal(reordered_labels[l, h, rows], c)
        expected = keys64[l, h][labels[l, h] == c].mean(0) if counts[l, h, c] else 0.0
        np.testing.assert_allclose(clustered.centroids[l, h, c], expected, rtol=1e-5, atol=1e-5)


def test_cluster_keys_layout_invariants(keys, flat):
  _check_fine_layout(keys, flat)


def test_clusters_are_cosine_clusters(keys, flat):
  """Each key is at least as cosine-close to its own centroid as to any other, up to bf16."""
  unit_keys = np.asarray(keys.astype(jnp.float32))
  unit_keys = unit_keys / np.linalg.norm(unit_keys, axis=-1, keepdims=True)
  centroids = np.asarray(flat.centroids)
  unit_centroids = centroids / np.maximum(np.linalg.norm(centroids, axis=-1, keepdims=True), 1e-30)
  cosines = np.einsum("lhsd,lhkd->lhsk", unit_keys, unit_centroids)
  own = np.take_along_axis(cosines, np.asarray(flat.labels)[..., None], -1)[..., 0]
  # The labels are the final assignment to the spherical centroids; the mean of the un-normalised
  # keys points in a slightly different direction, so allow a small slack.
  assert np.mean(own >= cosines.max(-1) - 0.05) > 0.97


def test_hierarchical_layout_invariants(keys, hierarchical):
  _check_fine_layout(keys, hierarchical.fine)
  counts = np.asarray(hierarchical.counts)
  coarse_offsets = np.asarray(hierarchical.coarse_offsets)
  coarse_labels = np.asarray(hierarchical.coarse_labels)
  offsets = np.asarray(hierarchical.offsets)
  assert hierarchical.coarse_centroids.shape == (NUM_LAYERS, NUM_KV_HEADS, NUM_COARSE, HEAD_DIM)
  np.testing.assert_array_equal(coarse_offsets[..., 0], 0)
  np.testing.assert_array_equal(coarse_offsets[..., -1], NUM_CLUSTERS)
  assert np.all(np.diff(coarse_labels, axis=-1) >= 0)
  for l in range(NUM_LAYERS):
    for h in range(NUM_KV_HEADS):
      for j in range(NUM_COARSE):
        fine = slice(coarse_offsets[l, h, j], coarse_offsets[l, h, j + 1])
        np.testing.assert_array_equal(coarse_labels[l, h, fine], j)
        assert hierarchical.coarse_counts[l, h, j] == counts[l, h, fine].sum()
        assert hierarchical.coarse_counts[l, h, j] == (offsets[l, h, coarse_offsets[l, h, j + 1]] -
                                                       offsets[l, h, coarse_offsets[l, h, j]])
        live = counts[l, h, fine] > 0
        expected = (np.asarray(hierarchical.centroids[l, h, fine])[live].mean(0) if live.any()
                    else 0.0)
        np.testing.assert_allclose(hierarchical.coarse_centroids[l, h, j], expected, rtol=1e-5,
                                   atol=1e-5)
  np.testing.assert_array_equal(np.sum(hierarchical.coarse_counts, -1), NUM_KEYS)


def test_num_clusters_for():
  assert key_clustering.num_clusters_for(2000, 5) == 100
  assert key_clustering.num_clusters_for(1000, 0.7) == 7
  assert key_clustering.num_clusters_for(100, 7) == 7  # float: ceil(7 / 100 * 100) == 8
  assert key_clustering.num_clusters_for(1000, 1.1) == 11
  assert key_clustering.num_clusters_for(101, 5) == 6
  assert key_clustering.num_clusters_for(3, 1) == 1
  with pytest.raises(ValueError, match="percent=0"):
    key_clustering.num_clusters_for(100, 0)


def test_invalid_arguments_raise(keys):
  with pytest.raises(ValueError, match="num_clusters=251"):
    key_clustering.cluster_keys(keys, num_clusters=251, key=jax.random.key(0))
  with pytest.raises(ValueError, match="num_coarse_clusters=14"):
    key_clustering.cluster_keys_hierarchical(keys, num_clusters=13, num_coarse_clusters=14,
                                             key=jax.random.key(0))
  with pytest.raises(ValueError, match="keys must be"):
    key_clustering.cluster_keys(keys[0], num_clusters=3, key=jax.random.key(0))
  with pytest.raises(ValueError, match="permutation"):
    key_clustering.reorder(keys, jnp.zeros((2, 3, 10), jnp.int32))
