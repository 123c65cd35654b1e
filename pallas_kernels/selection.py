"""From centroid scores to a static-shape description of the K/V rows to read.

Keys and values are stored cluster-contiguously (cluster c of a KV head holds
rows offsets[c]:offsets[c + 1]), so a set of kept clusters is a set of row
ranges. A `Selection` lists, per (sequence, KV head), the kept rows compacted
into a padded index list plus a count. Kernels gather those rows: one row of
D = 128 bf16 values is 256 contiguous bytes, so gathering rows reads exactly the
selected keys (no read amplification, unlike blocks of 64-128 rows that would
be fetched whole for a ~20-key cluster).

The list is built without sorting and without touching the S' rows: one
scatter-add of K per-cluster shifts into the R-slot list and a cumulative sum
over it (R = max_rows, the budget).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Selection:
  """Rows of the clustered fixed context to attend, per (sequence, KV head).

  Attributes:
    rows: [B, Hkv, R] int32 row indices into keys/values [Hkv, S', D], in
      cluster order; slots >= num_rows hold 0 and must not be read.
    num_rows: [B, Hkv] int32 number of valid slots (<= R; rows beyond R are
      dropped, last clusters first).
    clusters: [B, Hkv, K] bool clusters kept (before any truncation to R).
  """

  rows: jax.Array
  num_rows: jax.Array
  clusters: jax.Array

  @property
  def max_rows(self) -> int:
    return self.rows.shape[-1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KeptClusters:
  """What a fused decode step selected (no row list, no row cap).

  Attributes:
    clusters: [B, Hkv, K] bool fine clusters kept (non-empty, sbar > tau).
    num_rows: [B, Hkv] int32 keys of the kept clusters (all of them read).
    coarse_clusters: [B, Hkv, Kc] bool coarse clusters kept by the
      hierarchical lookup, or None for the flat lookup.
  """

  clusters: jax.Array
  num_rows: jax.Array
  coarse_clusters: jax.Array | None = None


def compact_ranges(keep: jax.Array, starts: jax.Array, sizes: jax.Array,
                   capacity: int) -> tuple[jax.Array, jax.Array]:
  """Concatenates the kept index ranges into a padded list.

  Range c covers indices starts[c] : starts[c] + sizes[c]. Slot r of the output
  lies in kept range c iff slot_start[c] <= r < slot_start[c] + sizes[c] with
  slot_start the exclusive cumsum of kept sizes; its index is r + shift_c with
  shift_c = starts[c] - slot_start[c]. Scatter-adding shift_c - shift_{c-1} at
  slot_start[c] for every c (kept or not) and taking a cumulative sum gives the
  shift of every slot.

  Args:
    keep: [N, C] bool ranges to keep (N = any number of independent lists).
    starts: [N, C] int first index of each range.
    sizes: [N, C] int length of each range.
    capacity: static length R of the output list.

  Returns:
    (indices [N, R] int32, 0 in unused slots; count [N] int32, <= R).
  """
  kept_sizes = jnp.where(keep, sizes, 0).astype(jnp.int32)
  slot_start = jnp.cumsum(kept_sizes, axis=-1) - kept_sizes
  shift = starts.astype(jnp.int32) - slot_start
  jumps = jnp.diff(shift, axis=-1, prepend=0)

  def scatter(slots, values):
    return jnp.zeros(capacity, jnp.int32).at[slots].add(values, mode="drop")

  shifts = jnp.cumsum(jax.vmap(scatter)(slot_start, jumps), axis=-1)
  slots = jnp.arange(capacity, dtype=jnp.int32)
  count = jnp.minimum(kept_sizes.sum(axis=-1), capacity)
  indices = jnp.where(slots < count[:, None], slots + shifts, 0)
  return indices, count


def rows_from_clusters(clusters: jax.Array, counts: jax.Array,
                       offsets: jax.Array, max_rows: int) -> Selection:
  """The rows of the kept clusters.

  Args:
    clusters: [B, Hkv, K] bool kept clusters (empty ones are ignored).
    counts: [Hkv, K] int keys per cluster.
    offsets: [Hkv, K + 1] int first row of each cluster.
    max_rows: static row budget R of the list.

  Returns:
    The `Selection`.
  """
  batch, num_kv_heads, num_clusters = clusters.shape
  if counts.shape != (num_kv_heads, num_clusters):
    raise ValueError(f"{counts.shape=} must be {(num_kv_heads, num_clusters)=}")
  if offsets.shape != (num_kv_heads, num_clusters + 1):
    raise ValueError(f"{offsets.shape=} must be [Hkv, K + 1] with "
                     f"{(num_kv_heads, num_clusters)=}")
  clusters = clusters & (counts[None] > 0)
  flat = lambda x: jnp.broadcast_to(x, clusters.shape).reshape(
      batch * num_kv_heads, num_clusters)
  rows, num_rows = compact_ranges(flat(clusters), flat(offsets[None, :, :-1]),
                                  flat(counts[None]), max_rows)
  return Selection(rows=rows.reshape(batch, num_kv_heads, max_rows),
                   num_rows=num_rows.reshape(batch, num_kv_heads),
                   clusters=clusters)


def budget_thresholds(scores: jax.Array, counts: jax.Array,
                      key_budget: int | jax.Array) -> jax.Array:
  """Per-list thresholds that keep the top clusters within a key budget.

  Clusters are taken by decreasing score while the running key count stays
  <= key_budget (the first cluster that would overflow, and all after it, are
  left out). The threshold lies halfway between the last score taken and the
  first score left out (twice the top score if none fits), so `scores > tau`
  keeps exactly those clusters even when a kernel recomputes the scores with
  other rounding; ties at the cut are both left out (the budget is never
  exceeded). Empty clusters and clusters
  scoring 0 (pruned by a coarse level) are never kept: tau >= 0.

  Args:
    scores: [B, Hkv, K] float sbar (>= 0).
    counts: [Hkv, K] int.
    key_budget: keys per (sequence, KV head): an int, or [B, Hkv] int.

  Returns:
    tau [B, Hkv] float32.
  """
  scores = jnp.where(counts[None] > 0, scores.astype(jnp.float32), 0.0)
  descending, sorted_counts = jax.lax.sort(
      (-scores, jnp.broadcast_to(counts[None], scores.shape).astype(jnp.int32)),
      dimension=-1, num_keys=1)
  descending = -descending
  budget = jnp.asarray(key_budget, jnp.int32)[..., None]
  taken = jnp.sum(jnp.cumsum(sorted_counts, axis=-1) <= budget, axis=-1)
  at = lambda index: jnp.take_along_axis(
      descending, jnp.clip(index, 0, scores.shape[-1] - 1)[..., None],
      axis=-1)[..., 0]
  last_taken, first_left = at(taken - 1), at(taken)
  tau = jnp.where(taken == 0, 2 * first_left, (last_taken + first_left) / 2)
  tau = jnp.where(taken == scores.shape[-1], 0.0, tau)
  return jnp.maximum(tau, 0.0)


def clusters_within_budget(scores: jax.Array, counts: jax.Array,
                           key_budget: int | jax.Array) -> jax.Array:
  """The highest-scoring clusters whose keys fit in `key_budget`.

  Args:
    scores: [B, Hkv, K] float sbar.
    counts: [Hkv, K] int.
    key_budget: keys per (sequence, KV head): an int, or [B, Hkv] int.

  Returns:
    [B, Hkv, K] bool: non-empty clusters with scores above
    `budget_thresholds`.
  """
  tau = budget_thresholds(scores, counts, key_budget)
  return (scores > tau[..., None]) & (counts[None] > 0)


def check_one_mode(threshold: float | jax.Array | None,
                   key_budget: int | jax.Array | None) -> None:
  """Raises unless exactly one of the two selection modes is given."""
  if (threshold is None) == (key_budget is None):
    raise ValueError(f"exactly one of {threshold=} and {key_budget=} is needed")


def kept_clusters(scores: jax.Array, counts: jax.Array, *,
                  threshold: float | jax.Array | None = None,
                  key_budget: int | jax.Array | None = None) -> jax.Array:
  """Clusters kept by a threshold (sbar > threshold) or by a key budget.

  Args:
    scores: [B, Hkv, K] sbar from `centroid_scores`.
    counts: [Hkv, K] int keys per cluster.
    threshold: keep clusters with sbar > threshold (scalar, may be traced).
    key_budget: keep the top clusters up to this many keys: an int, or [B,
      Hkv] int per (sequence, KV head) (may be traced).

  Returns:
    [B, Hkv, K] bool.
  """
  check_one_mode(threshold, key_budget)
  if threshold is not None:
    return scores > threshold
  return clusters_within_budget(scores, counts, key_budget)


def select_clusters(scores: jax.Array, counts: jax.Array, offsets: jax.Array,
                    *, max_rows: int,
                    threshold: float | jax.Array | None = None,
                    key_budget: int | jax.Array | None = None) -> Selection:
  """Selects clusters by threshold or by a key budget (`kept_clusters`).

  Args:
    scores: [B, Hkv, K] sbar from `centroid_scores`.
    counts: [Hkv, K] int keys per cluster.
    offsets: [Hkv, K + 1] int first row of each cluster.
    max_rows: static length of the row list (threshold mode: rows beyond it
      are dropped; size it from the calibrated budget with a margin).
    threshold: keep clusters with sbar > threshold (scalar, may be traced).
    key_budget: keep the top clusters up to this many keys: an int <=
      max_rows, or [B, Hkv] int (each <= max_rows).

  Returns:
    The `Selection`.
  """
  if isinstance(key_budget, int) and key_budget > max_rows:
    raise ValueError(f"{key_budget=} must be <= {max_rows=}")
  clusters = kept_clusters(scores, counts, threshold=threshold,
                           key_budget=key_budget)
  return rows_from_clusters(clusters, counts, offsets, max_rows)


def key_mask(selection: Selection, num_keys: int) -> jax.Array:
  """The selected rows as a dense mask (for references and tests).

  Args:
    selection: a `Selection` with B sequences and Hkv heads.
    num_keys: S', rows of the clustered context.

  Returns:
    [B, Hkv, S'] bool.
  """
  valid = (jnp.arange(selection.max_rows)
           < selection.num_rows[..., None])

  def scatter(rows, valid_slots):
    return jnp.zeros(num_keys, bool).at[rows].max(valid_slots)

  return jax.vmap(jax.vmap(scatter))(selection.rows, valid)
