"""Clustering a fixed context's keys into the layout that the offline phase and the kernels share.

Keys [L, Hkv, S', D] (post-RoPE, observation window excluded) are clustered per (layer, KV head) by
spherical K-means (`squeezed_jax.kmeans`). The result describes a reordering of every head's rows
by cluster: cluster c of head (l, h) becomes rows offsets[l, h, c] : offsets[l, h, c + 1] of the
reordered keys and values (`reorder`), and its centroid is the mean of the un-normalised keys.

The hierarchical variant adds coarse clusters made by spherical K-means over the fine centroids;
fine clusters are renumbered so that those of one coarse cluster are contiguous (empty fine clusters
last within their coarse cluster), and so are the keys of one coarse cluster.
"""

from __future__ import annotations

import fractions
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# The package exports the function `kmeans`, which shadows the module name there.
from squeezed_jax.kmeans import cluster_sums, kmeans


class ClusteredKeys(NamedTuple):
  """Fine clusters of every (layer, KV head); K clusters over S' keys.

  centroids: [L, Hkv, K, D] float32, mean of the un-normalised keys of each cluster (0 if empty).
  counts: [L, Hkv, K] int32, keys per cluster (0 = empty: never select it).
  offsets: [L, Hkv, K + 1] int32, concat(0, cumsum(counts)): cluster c is reordered rows
    offsets[..., c] : offsets[..., c + 1].
  permutation: [L, Hkv, S'] int32, original position of each reordered row.
  labels: [L, Hkv, S'] int32, cluster of each key, in original key order.
  """

  centroids: jax.Array
  counts: jax.Array
  offsets: jax.Array
  permutation: jax.Array
  labels: jax.Array


class HierarchicalClusteredKeys(NamedTuple):
  """Fine clusters (fields as in `ClusteredKeys`, ordered by coarse cluster) plus Kc coarse ones.

  coarse_centroids: [L, Hkv, Kc, D] float32, mean of the coarse cluster's non-empty fine centroids
    (0 if it has none).
  coarse_counts: [L, Hkv, Kc] int32, keys per coarse cluster (sum of its fine counts).
  coarse_offsets: [L, Hkv, Kc + 1] int32, coarse cluster j holds fine clusters
    coarse_offsets[..., j] : coarse_offsets[..., j + 1] (and so reordered key rows
    offsets[..., coarse_offsets[..., j]] : offsets[..., coarse_offsets[..., j + 1]]).
  coarse_labels: [L, Hkv, K] int32, coarse cluster of each fine cluster (non-decreasing).
  """

  centroids: jax.Array
  counts: jax.Array
  offsets: jax.Array
  permutation: jax.Array
  labels: jax.Array
  coarse_centroids: jax.Array
  coarse_counts: jax.Array
  coarse_offsets: jax.Array
  coarse_labels: jax.Array

  @property
  def fine(self) -> ClusteredKeys:
    return ClusteredKeys(*self[:len(ClusteredKeys._fields)])


def num_clusters_for(num_keys: int, percent: float) -> int:
  """ceil(percent / 100 * num_keys), at least 1; `percent` is read as its decimal text.

  Exact for decimal percentages: num_clusters_for(100, 7) == 7, where ceil(7 / 100 * 100) == 8.
  """
  if num_keys < 1 or not 0 < percent <= 100:
    raise ValueError(f"{num_keys=} must be >= 1 and {percent=} in (0, 100]")
  return max(1, math.ceil(fractions.Fraction(str(percent)) * num_keys / 100))


def reorder(x: jax.Array, permutation: jax.Array) -> jax.Array:
  """Rows of every head in cluster order: out[l, h, i] = x[l, h, permutation[l, h, i]].

  x: [L, Hkv, S', D] (keys or values); permutation: [L, Hkv, S'] -> [L, Hkv, S', D].
  """
  if x.ndim != 4 or permutation.shape != x.shape[:3]:
    raise ValueError(f"x must be [L, Hkv, S', D] and permutation [L, Hkv, S']: "
                     f"{x.shape=}, {permutation.shape=}")
  return jnp.take_along_axis(x, permutation[..., None], axis=2)


def cluster_keys(keys: jax.Array, *, num_clusters: int, key: jax.Array, max_iters: int = 10,
                 tol: float = 1e-3, **kmeans_options: Any) -> ClusteredKeys:
  """Spherical K-means of each (layer, KV head)'s keys, in the reordered layout.

  Args:
    keys: [L, Hkv, S', D] keys (any float dtype; bf16 is clustered in bf16 with f32 accumulation).
    num_clusters: K per head, 1 <= K <= S' (see `num_clusters_for`).
    key: PRNG key; the result is a deterministic function of it.
    max_iters, tol: Lloyd stopping rule of `squeezed_jax.kmeans.kmeans`, looser than its
      defaults because one Lloyd step over 128K keys x 1024 heads takes seconds and the last
      steps change the inertia by well under 1%.
    **kmeans_options: other options of `squeezed_jax.kmeans.kmeans` (heads_per_step,
      chunk_size, ...); `spherical` is always True.

  Returns:
    ClusteredKeys with centroids [L, Hkv, K, D] f32, counts [L, Hkv, K], offsets [L, Hkv, K + 1],
    permutation and labels [L, Hkv, S'].
  """
  labels, centroids, counts = _fine_clusters(keys, num_clusters, key, dict(
      max_iters=max_iters, tol=tol, **kmeans_options))
  return ClusteredKeys(centroids, counts, _offsets(counts), _permutation(labels), labels)


def cluster_keys_hierarchical(keys: jax.Array, *, num_clusters: int, num_coarse_clusters: int,
                              key: jax.Array, max_iters: int = 10, tol: float = 1e-3,
                              **kmeans_options: Any) -> HierarchicalClusteredKeys:
  """Fine clusters as `cluster_keys`, then coarse clusters by spherical K-means over fine centroids.

  Args:
    keys: [L, Hkv, S', D].
    num_clusters: K fine clusters per head, 1 <= K <= S'.
    num_coarse_clusters: Kc coarse clusters per head, 1 <= Kc <= K.
    key: PRNG key (split for the two levels).
    max_iters, tol, **kmeans_options: as in `cluster_keys`, for both K-means runs.

  Returns:
    HierarchicalClusteredKeys; fine clusters are numbered coarse cluster by coarse cluster and
    the key permutation follows that numbering.
  """
  if not 1 <= num_coarse_clusters <= num_clusters:
    raise ValueError(f"{num_coarse_clusters=} must be in [1, {num_clusters=}]")
  fine_key, coarse_key = jax.random.split(key)
  kmeans_options = dict(max_iters=max_iters, tol=tol, **kmeans_options)
  fine_labels, fine_centroids, fine_counts = _fine_clusters(keys, num_clusters, fine_key,
                                                            kmeans_options)
  coarse = kmeans(fine_centroids, num_coarse_clusters, key=coarse_key, spherical=True,
                             **kmeans_options)
  # New fine numbering: by coarse cluster, empty fine clusters last within it.
  sort_key = 2 * coarse.labels + (fine_counts == 0).astype(jnp.int32)
  fine_order = jnp.argsort(sort_key, axis=-1, stable=True).astype(jnp.int32)
  new_index_of_old = jnp.argsort(fine_order, axis=-1).astype(jnp.int32)
  labels = jnp.take_along_axis(new_index_of_old, fine_labels, axis=-1)
  counts = jnp.take_along_axis(fine_counts, fine_order, axis=-1)
  centroids = jnp.take_along_axis(fine_centroids, fine_order[..., None], axis=-2)
  coarse_labels = jnp.take_along_axis(coarse.labels, fine_order, axis=-1)
  offsets = _offsets(counts)
  non_empty_coarse_labels = jnp.where(counts > 0, coarse_labels, num_coarse_clusters)
  coarse_centroids, _ = _means(centroids, non_empty_coarse_labels, num_coarse_clusters,
                               kmeans_options)
  coarse_offsets = _offsets(coarse.counts)  # coarse.counts = fine clusters per coarse cluster
  coarse_counts = jnp.diff(jnp.take_along_axis(offsets, coarse_offsets, axis=-1), axis=-1)
  return HierarchicalClusteredKeys(centroids, counts, offsets, _permutation(labels), labels,
                                   coarse_centroids, coarse_counts, coarse_offsets,
                                   coarse_labels)


def _fine_clusters(keys: jax.Array, num_clusters: int, key: jax.Array,
                   kmeans_options: dict[str, Any]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Spherical K-means of keys [L, Hkv, S', D].

  Returns labels [L, Hkv, S'], means of the un-normalised keys [L, Hkv, K, D] and counts
  [L, Hkv, K].
  """
  if keys.ndim != 4:
    raise ValueError(f"keys must be [L, Hkv, S', D], got {keys.shape=}")
  if not 1 <= num_clusters <= keys.shape[2]:
    raise ValueError(f"{num_clusters=} must be in [1, S'={keys.shape[2]}]")
  labels = kmeans(keys, num_clusters, key=key, spherical=True,
                             **kmeans_options).labels
  return labels, *_means(keys, labels, num_clusters, kmeans_options)


def _means(points: jax.Array, labels: jax.Array, num_clusters: int,
           kmeans_options: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
  """Per-cluster means (0 for empty clusters) and counts. points: [..., N, D], labels: [..., N]."""
  grouping = {k: v for k, v in kmeans_options.items() if k in ("heads_per_step", "chunk_size")}
  sums, counts = cluster_sums(points, labels, num_clusters, **grouping)
  means = sums / jnp.maximum(counts, 1)[..., None].astype(sums.dtype)
  return means.astype(jnp.float32), counts


def _offsets(counts: jax.Array) -> jax.Array:
  """counts: [..., K] -> [..., K + 1] int32, concat(0, cumsum(counts))."""
  zero = jnp.zeros((*counts.shape[:-1], 1), jnp.int32)
  return jnp.concatenate([zero, jnp.cumsum(counts, axis=-1, dtype=jnp.int32)], axis=-1)


def _permutation(labels: jax.Array) -> jax.Array:
  """labels: [..., N] -> [..., N] int32 original positions sorted by label (stable)."""
  return jnp.argsort(labels, axis=-1, stable=True).astype(jnp.int32)
