"""Random clustered fixed contexts in the binding layout (tests and benchmarks).

Cluster sizes are drawn like real K-means output: a multinomial over clusters
with log-normal weights (sizes vary by an order of magnitude, some clusters
are empty). Keys are their cluster's centre plus noise, stored
cluster-contiguously; centroids are the exact means of their keys.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClusteredContext:
  """One layer of a clustered fixed context.

  Attributes:
    keys, values: [Hkv, S', D] cluster-contiguous.
    centroids: [Hkv, K, D] float32 means of each cluster's keys (0 if empty).
    counts: [Hkv, K] int32.
    offsets: [Hkv, K + 1] int32.
  """

  keys: jax.Array
  values: jax.Array
  centroids: jax.Array
  counts: jax.Array
  offsets: jax.Array


def random_counts(key: jax.Array, num_kv_heads: int, num_keys: int,
                  num_clusters: int, spread: float = 1.0) -> jax.Array:
  """[Hkv, K] int32 cluster sizes summing to num_keys per head.

  Each key picks a cluster with probability proportional to a log-normal
  weight (inverse-CDF sampling: O(S' log K) time, O(S' + K) memory).
  """
  weight_key, label_key = jax.random.split(key)
  weights = jnp.exp(spread * jax.random.normal(weight_key,
                                               (num_kv_heads, num_clusters)))
  cdf = jnp.cumsum(weights, axis=-1)
  cdf = cdf / cdf[:, -1:]
  draws = jax.random.uniform(label_key, (num_kv_heads, num_keys))
  labels = jax.vmap(jnp.searchsorted)(cdf, draws)
  labels = jnp.minimum(labels, num_clusters - 1)
  return jax.vmap(lambda l: jnp.bincount(l, length=num_clusters))(
      labels).astype(jnp.int32)


def offsets_from_counts(counts: jax.Array) -> jax.Array:
  """[..., K] -> [..., K + 1]: concat(0, cumsum(counts))."""
  zero = jnp.zeros((*counts.shape[:-1], 1), jnp.int32)
  return jnp.concatenate([zero, jnp.cumsum(counts, axis=-1, dtype=jnp.int32)],
                         axis=-1)


def cluster_means(rows: jax.Array, counts: jax.Array) -> jax.Array:
  """Per-cluster means of cluster-contiguous rows.

  Args:
    rows: [H, S, D].
    counts: [H, K] with counts.sum(-1) == S.

  Returns:
    [H, K, D] float32, 0 for empty clusters.
  """
  num_clusters = counts.shape[-1]
  labels = jax.vmap(lambda c: jnp.repeat(jnp.arange(num_clusters), c,
                                         total_repeat_length=rows.shape[1]))(
                                             counts)
  sums = jax.vmap(lambda r, l: jax.ops.segment_sum(
      r.astype(jnp.float32), l, num_segments=num_clusters))(rows, labels)
  return sums / jnp.maximum(counts, 1)[..., None].astype(jnp.float32)


def clustered_context(key: jax.Array, *, num_kv_heads: int, num_keys: int,
                      num_clusters: int, head_dim: int,
                      dtype: jnp.dtype = jnp.bfloat16,
                      noise: float = 0.5) -> ClusteredContext:
  """A random clustered context (keys ~ centre + noise, values ~ N(0, 1))."""
  count_key, centre_key, noise_key, value_key = jax.random.split(key, 4)
  counts = random_counts(count_key, num_kv_heads, num_keys, num_clusters)
  centres = jax.random.normal(centre_key,
                              (num_kv_heads, num_clusters, head_dim))
  labels = jax.vmap(lambda c: jnp.repeat(jnp.arange(num_clusters), c,
                                         total_repeat_length=num_keys))(counts)
  keys = jnp.take_along_axis(centres, labels[..., None], axis=1)
  keys = (keys + noise * jax.random.normal(noise_key, keys.shape)).astype(dtype)
  values = jax.random.normal(value_key, keys.shape, dtype)
  return ClusteredContext(keys=keys, values=values,
                          centroids=cluster_means(keys, counts), counts=counts,
                          offsets=offsets_from_counts(counts))


def coarse_level(key: jax.Array, centroids: jax.Array, counts: jax.Array,
                 num_coarse: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Groups contiguous fine clusters into random coarse clusters.

  Args:
    key: PRNG key.
    centroids: [Hkv, K, D] fine centroids.
    counts: [Hkv, K] fine counts.
    num_coarse: Kc.

  Returns:
    (coarse_centroids [Hkv, Kc, D] f32 = mean of non-empty fine centroids,
     coarse_counts [Hkv, Kc] int32, coarse_offsets [Hkv, Kc + 1] int32).
  """
  num_kv_heads, num_fine = counts.shape
  sizes = random_counts(key, num_kv_heads, num_fine, num_coarse, spread=0.3)
  coarse_offsets = offsets_from_counts(sizes)
  nonempty = (counts > 0).astype(jnp.float32)
  coarse_centroids = (cluster_means(centroids * nonempty[..., None], sizes)
                      * sizes[..., None]
                      / jnp.maximum(cluster_means(nonempty[..., None], sizes)
                                    * sizes[..., None], 1.0))
  coarse_counts = jax.vmap(lambda c, s: jax.ops.segment_sum(
      c, jnp.repeat(jnp.arange(num_coarse), s, total_repeat_length=num_fine),
      num_segments=num_coarse))(counts, sizes)
  return coarse_centroids, coarse_counts.astype(jnp.int32), coarse_offsets
