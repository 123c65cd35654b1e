"""Threshold calibration from the observation window's queries.

The score of cluster j of one KV head for one query vector q (D = head_dim, N_m = cluster sizes),
defined once, in `pallas_kernels.references.centroid_scores`:

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
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import references as kernel_references

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
    of the cluster scores (`pallas_kernels.references.centroid_scores` of window_queries[l])
    weighted
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
  with jax.default_matmul_precision("highest"):  # thresholds are compared across all heads
    scores = lax.map(lambda layer: _window_scores(*layer), (window_queries, centroids, counts))
  thresholds = weighted_quantiles(scores, counts, percentiles)
  kept = scores[None] > thresholds[:, None, None, None]  # [P, L, Hkv, K]
  kept_keys = jnp.sum(jnp.where(kept, counts[None], 0), axis=-1)
  total_keys = jnp.maximum(jnp.sum(counts, axis=-1), 1)
  return Thresholds(jnp.asarray(percentiles, jnp.float32), thresholds,
                    (kept_keys / total_keys).astype(jnp.float32))


def _window_scores(queries: jax.Array, centroids: jax.Array, counts: jax.Array) -> jax.Array:
  """One layer: queries [W, Hq, D], centroids [Hkv, K, D], counts [Hkv, K] -> sbar [Hkv, K]."""
  return kernel_references.centroid_scores(queries[None], centroids, counts)[0]


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
