"""Centroid scores (the one definition of cluster importance) and threshold calibration.

Score of cluster j of one KV head for one query vector q (D = head_dim, N_m = cluster sizes):

    s_j(q) = exp(q.C_j / sqrt(D)) / sum_m N_m exp(q.C_m / sqrt(D)),   empty clusters excluded,

the attention weight that one key of cluster j would get if its key were the centroid. For Tq
queries and the G = Hq / Hkv query heads sharing the KV head (query head n uses KV head n // G),

    sbar_j = max over the G heads of (mean over the Tq queries of s_j(q)).

A cluster is kept iff sbar_j > tau. Everything is computed in float32 with log-sum-exp, so large
logits neither overflow nor underflow the normaliser. An empty cluster (N_j = 0) scores exactly 0,
so it is never kept by a threshold tau >= 0 (every calibrated threshold is >= 0).

Calibration: each clustered key i of the fixed context gets score(i) = sbar_{c(i)} computed over
the W observation-window queries, and tau_p is the p-quantile of these scores pooled over all
layers and KV heads (p = fraction of keys pruned), computed over clusters weighted by their
counts, without per-key arrays.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

DEFAULT_PERCENTILES = (0.5, 0.7, 0.8, 0.9)


class Thresholds(NamedTuple):
  """Calibrated thresholds, one per pruning fraction p.

  percentiles: [P] float32, the fractions p of keys pruned.
  thresholds: [P] float32, tau_p (keep a cluster iff its score > tau_p).
  kept_fraction: [P, L, Hkv] float32, fraction of each (layer, KV head)'s keys whose cluster
    score over the calibration queries is > tau_p (the budget the threshold implies there).
  """

  percentiles: jax.Array
  thresholds: jax.Array
  kept_fraction: jax.Array


def centroid_scores(queries: jax.Array, centroids: jax.Array, counts: jax.Array) -> jax.Array:
  """sbar_j for every cluster: max over the GQA group of the mean over queries of s_j(q).

  Args:
    queries: [..., Tq, Hq, D] queries (any float dtype; computed in float32).
    centroids: [..., Hkv, K, D] centroids; Hq must be a multiple of Hkv.
    counts: [..., Hkv, K] keys per cluster (0 = empty: excluded, scores 0).
    Leading axes "..." broadcast against each other.

  Returns:
    [..., Hkv, K] float32 scores in [0, 1].
  """
  *_, num_queries, num_heads, head_dim = queries.shape
  *_, num_kv_heads, num_clusters, centroid_dim = centroids.shape
  if head_dim != centroid_dim or num_heads % num_kv_heads:
    raise ValueError(f"queries [..., Tq, Hq, D] {queries.shape=} and centroids [..., Hkv, K, D] "
                     f"{centroids.shape=} need the same D and Hq a multiple of Hkv")
  if counts.shape[-2:] != (num_kv_heads, num_clusters):
    raise ValueError(f"{counts.shape=} must end with (Hkv, K) = {(num_kv_heads, num_clusters)}")
  group = num_heads // num_kv_heads
  q = queries.astype(jnp.float32).reshape(*queries.shape[:-2], num_kv_heads, group, head_dim)
  logits = jnp.einsum("...TKGD,...KCD->...KGTC", q, centroids.astype(jnp.float32),
                      precision=lax.Precision.HIGHEST) / math.sqrt(head_dim)
  non_empty = (counts > 0)[..., :, None, None, :]  # [..., Hkv, 1, 1, K]
  log_counts = jnp.log(jnp.maximum(counts, 1).astype(jnp.float32))[..., :, None, None, :]
  log_normalizer = jax.nn.logsumexp(jnp.where(non_empty, logits + log_counts, -jnp.inf),
                                    axis=-1, keepdims=True)
  scores = jnp.where(non_empty, jnp.exp(logits - log_normalizer), 0.0)  # [..., Hkv, G, Tq, K]
  return jnp.max(jnp.mean(scores, axis=-2), axis=-2)


def weighted_quantiles(values: jax.Array, weights: jax.Array,
                       fractions: tuple[float, ...]) -> jax.Array:
  """Quantiles of a multiset in which values[i] occurs weights[i] times.

  q_p = the smallest value v (of positive weight) such that (total weight of values <= v) /
  (total weight) >= p, the fractions compared in float32. Zero weights are excluded.

  Args:
    values: [...] float scores.
    weights: [...] non-negative integer multiplicities (same shape).
    fractions: p values in [0, 1].

  Returns:
    [P] float32 (inf if every weight is 0).
  """
  flat_values = jnp.where(weights > 0, values, jnp.inf).reshape(-1).astype(jnp.float32)
  order = jnp.argsort(flat_values)
  cumulative = jnp.cumsum(weights.reshape(-1)[order], dtype=jnp.int32).astype(jnp.float32)
  fraction_at_most = cumulative / jnp.maximum(cumulative[-1], 1.0)
  index = jnp.searchsorted(fraction_at_most, jnp.asarray(fractions, jnp.float32), side="left")
  return flat_values[order][jnp.minimum(index, flat_values.shape[0] - 1)]


@functools.partial(jax.jit, static_argnames=("percentiles",))
def calibrate_thresholds(window_queries: jax.Array, centroids: jax.Array, counts: jax.Array,
                         percentiles: tuple[float, ...] = DEFAULT_PERCENTILES) -> Thresholds:
  """Thresholds tau_p pooled over all layers and KV heads, and the per-head budgets they imply.

  Args:
    window_queries: [L, W, Hq, D] queries of the observation window.
    centroids: [L, Hkv, K, D] centroids (the fine ones, or the coarse ones: see
      `calibrate_coarse_thresholds`).
    counts: [L, Hkv, K] keys per cluster.
    percentiles: fractions p of keys pruned, each in [0, 1].

  Returns:
    Thresholds: tau_p = the p-quantile (as in `weighted_quantiles`) of the per-key scores, i.e.
    of the cluster scores `centroid_scores(window_queries[l], centroids[l], counts[l])` weighted
    by `counts`; a fraction >= p of the keys has score <= tau_p and is pruned.
  """
  if window_queries.ndim != 4 or centroids.ndim != 4 or counts.ndim != 3:
    raise ValueError(f"expected window_queries [L, W, Hq, D], centroids [L, Hkv, K, D], counts "
                     f"[L, Hkv, K]: {window_queries.shape=}, {centroids.shape=}, "
                     f"{counts.shape=}")
  if not window_queries.shape[0] == centroids.shape[0] == counts.shape[0]:
    raise ValueError(f"layer counts differ: {window_queries.shape=}, {centroids.shape=}, "
                     f"{counts.shape=}")
  if not all(0.0 <= p <= 1.0 for p in percentiles):
    raise ValueError(f"{percentiles=} must lie in [0, 1]")
  scores = lax.map(lambda layer: centroid_scores(*layer), (window_queries, centroids, counts))
  thresholds = weighted_quantiles(scores, counts, percentiles)
  kept = scores[None] > thresholds[:, None, None, None]  # [P, L, Hkv, K]
  kept_keys = jnp.sum(jnp.where(kept, counts[None], 0), axis=-1)
  total_keys = jnp.maximum(jnp.sum(counts, axis=-1), 1)
  return Thresholds(jnp.asarray(percentiles, jnp.float32), thresholds,
                    (kept_keys / total_keys).astype(jnp.float32))


def calibrate_coarse_thresholds(window_queries: jax.Array, coarse_centroids: jax.Array,
                                coarse_counts: jax.Array,
                                percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
                                ) -> Thresholds:
  """Thresholds for the coarse level of the hierarchical lookup.

  The same calibration one level up: a coarse centroid stands for all coarse_counts keys of its
  coarse cluster (in the normaliser and in the quantile), and every key gets its coarse
  cluster's score. window_queries: [L, W, Hq, D]; coarse_centroids: [L, Hkv, Kc, D];
  coarse_counts: [L, Hkv, Kc].
  """
  return calibrate_thresholds(window_queries, coarse_centroids, coarse_counts, percentiles)
