"""Two-level (hierarchical) lookup that scores only the fine centroids of kept
coarse clusters (XLA; the gathers are proportional to the kept work).

Fine clusters of one coarse cluster are contiguous (docs: the fixed-context
layout), so the kept coarse clusters are ranges of fine-cluster indices and
`selection.compact_ranges` lists them. The semantics, including the
normaliser's coarse estimate for pruned clusters, are those of
`references.hierarchical_centroid_scores`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import queries
from pallas_kernels import references
from pallas_kernels import selection as selection_lib


def hierarchical_centroid_scores(
    q: jax.Array, centroids: jax.Array, counts: jax.Array,
    coarse_centroids: jax.Array, coarse_counts: jax.Array,
    coarse_offsets: jax.Array, *, coarse_threshold: float | jax.Array,
    max_fine_clusters: int, query_mask: jax.Array | None = None,
    sm_scale: float | None = None) -> tuple[jax.Array, jax.Array]:
  """Fine sbar for the fine clusters of kept coarse clusters.

  Args:
    q: [B, Hq, D] or [B, T, Hq, D].
    centroids, counts: [Hkv, K, D], [Hkv, K].
    coarse_centroids, coarse_counts: [Hkv, Kc, D], [Hkv, Kc].
    coarse_offsets: [Hkv, Kc + 1] fine-cluster range of each coarse cluster.
    coarse_threshold: keep coarse clusters with sbar > this.
    max_fine_clusters: static number F of fine centroids scored per
      (sequence, KV head); candidates beyond F (last coarse clusters first)
      are not scored.
    query_mask: [B, T] bool or None.
    sm_scale: softmax scale, 1 / sqrt(D) if None.

  Returns:
    (fine sbar [B, Hkv, K] f32, 0 for clusters not scored;
     kept coarse clusters [B, Hkv, Kc] bool).
  """
  num_kv_heads, num_coarse = coarse_counts.shape
  coarse_logits = references.centroid_logits(q, coarse_centroids, sm_scale)
  batch, _, _, tokens, _ = coarse_logits.shape
  weights = queries.query_weights(query_mask, batch, tokens)
  coarse_log_n = references.log_counts(coarse_counts)[None, :, None, None, :]
  coarse_lse = jax.nn.logsumexp(coarse_logits + coarse_log_n, axis=-1,
                                keepdims=True)
  coarse_probs = jnp.where(jnp.isfinite(coarse_log_n),
                           jnp.exp(coarse_logits - coarse_lse), 0.0)
  keep_coarse = references.block_scores(coarse_probs,
                                        weights) > coarse_threshold

  sizes = jnp.diff(coarse_offsets, axis=-1)
  flat = lambda x: jnp.broadcast_to(x, keep_coarse.shape).reshape(
      -1, num_coarse)
  fine, num_fine = selection_lib.compact_ranges(
      flat(keep_coarse), flat(coarse_offsets[None, :, :-1]), flat(sizes[None]),
      max_fine_clusters)
  fine = fine.reshape(batch, num_kv_heads, max_fine_clusters)
  scored = (jnp.arange(max_fine_clusters)
            < num_fine.reshape(batch, num_kv_heads, 1))
  heads = jnp.arange(num_kv_heads)[:, None]
  fine_centroids = jax.vmap(lambda idx: centroids[heads, idx])(fine)
  fine_counts = jnp.where(scored, counts[heads[None], fine], 0)

  scale = queries.default_scale(q.shape[-1], sm_scale)
  grouped = queries.group_heads(queries.to_tokens(q).astype(jnp.float32),
                                num_kv_heads)
  logits = jnp.einsum("BTKGD,BKFD->BKGTF", grouped,
                      fine_centroids.astype(jnp.float32)) * scale
  fine_log_n = references.log_counts(fine_counts)[:, :, None, None, :]
  pruned = jnp.where(keep_coarse[:, :, None, None, :], -jnp.inf,
                     coarse_logits + coarse_log_n)
  lse = jnp.logaddexp(
      jax.nn.logsumexp(logits + fine_log_n, axis=-1, keepdims=True),
      jax.nn.logsumexp(pruned, axis=-1, keepdims=True))
  probs = jnp.where(jnp.isfinite(fine_log_n), jnp.exp(logits - lse), 0.0)
  fine_scores = references.block_scores(probs, weights)

  def scatter(idx, values):
    return jnp.zeros(counts.shape[-1], jnp.float32).at[idx].max(values)

  scores = jax.vmap(jax.vmap(scatter))(fine, fine_scores)
  return scores, keep_coarse


def fine_candidates(kept_coarse: jax.Array,
                    coarse_offsets: jax.Array) -> jax.Array:
  """Fine clusters inside the kept coarse clusters, [B, Hkv] int32.

  kept_coarse: [B, Hkv, Kc] bool; coarse_offsets: [Hkv, Kc + 1].
  """
  sizes = jnp.diff(coarse_offsets, axis=-1)
  return jnp.where(kept_coarse, sizes[None], 0).sum(axis=-1).astype(jnp.int32)


def key_budget_after_fine_lookup(key_budget: int | jax.Array,
                                 kept_coarse: jax.Array,
                                 coarse_offsets: jax.Array,
                                 fine_centroid_cost: float,
                                 max_fine_clusters: int | None = None
                                 ) -> jax.Array:
  """The keys left of `key_budget` once the fine lookup is paid for.

  A hierarchical lookup scores a query-dependent number of fine centroids
  (`fine_candidates`, at most max_fine_clusters if given); charging
  fine_centroid_cost keys for each (0.5 in the paper's accounting: a
  centroid stores a key, not a value) keeps its bytes within the budget.

  Args:
    key_budget: an int or [B, Hkv] int.
    kept_coarse: [B, Hkv, Kc] bool; coarse_offsets: [Hkv, Kc + 1].
    fine_centroid_cost: keys per fine centroid scored.
    max_fine_clusters: the lookup's cap on the fine centroids scored, or None.

  Returns:
    [B, Hkv] int32 key_budget - ceil(fine_centroid_cost x scored), >= 0.
  """
  scored = fine_candidates(kept_coarse, coarse_offsets)
  if max_fine_clusters is not None:
    scored = jnp.minimum(scored, max_fine_clusters)
  charged = jnp.ceil(fine_centroid_cost * scored.astype(jnp.float32))
  return jnp.maximum(jnp.asarray(key_budget, jnp.int32)
                     - charged.astype(jnp.int32), 0)
