"""Pure-jnp float32 references of the online phase: what every kernel computes.

Score semantics (docs: the fixed-context layout): for one query q of one query
head and the clusters of its KV head,
    s_j(q) = exp(q.C_j / sqrt(D)) / sum_m N_m exp(q.C_m / sqrt(D)),
computed with log-sum-exp, empty clusters (N_j = 0) excluded (score 0). For a
block of queries and a GQA group: sbar_j = max over the G heads of the mean
over the block's (real) queries.

The references favour clarity over memory: they materialise [.., T, K] logits
and dense [.., T, S] attention weights. They double as the XLA fallback of the
lookup (`centroid_scores`), which is one einsum and one log-sum-exp.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import queries


def log_counts(counts: jax.Array) -> jax.Array:
  """log N_j, -inf for empty clusters. counts: [..., K] int -> [..., K] f32."""
  counts = counts.astype(jnp.float32)
  return jnp.where(counts > 0, jnp.log(jnp.maximum(counts, 1.0)), -jnp.inf)


def _grouped_tokens(q: jax.Array, num_kv_heads: int) -> jax.Array:
  """[B, (T,) Hq, D] -> [B, T, Hkv, G, D] float32."""
  q_tokens = queries.to_tokens(q).astype(jnp.float32)
  return queries.group_heads(q_tokens, num_kv_heads)


def centroid_logits(q: jax.Array, centroids: jax.Array,
                    sm_scale: float | None = None) -> jax.Array:
  """q.C_j * scale for every query and centroid.

  Args:
    q: [B, Hq, D] (decode) or [B, T, Hq, D] (prefill).
    centroids: [Hkv, K, D].
    sm_scale: softmax scale, 1 / sqrt(D) if None.

  Returns:
    [B, Hkv, G, T, K] float32.
  """
  scale = queries.default_scale(q.shape[-1], sm_scale)
  grouped = _grouped_tokens(q, centroids.shape[0])
  return jnp.einsum("BTKGD,KCD->BKGTC", grouped,
                    centroids.astype(jnp.float32)) * scale


def block_scores(probs: jax.Array, weights: jax.Array) -> jax.Array:
  """sbar: mean over the query block, then max over the GQA group.

  Args:
    probs: [B, Hkv, G, T, K] per-query scores s_j(q).
    weights: [B, T] query weights (see `queries.query_weights`).

  Returns:
    [B, Hkv, K] float32.
  """
  mean = jnp.einsum("BKGTC,BT->BKGC", probs, weights)
  return mean.max(axis=2)


def centroid_scores(q: jax.Array, centroids: jax.Array, counts: jax.Array, *,
                    query_mask: jax.Array | None = None,
                    sm_scale: float | None = None) -> jax.Array:
  """Counts-weighted centroid scores of a query block (the lookup).

  Args:
    q: [B, Hq, D] (decode) or [B, T, Hq, D] (prefill), post-RoPE.
    centroids: [Hkv, K, D] (float32 in the layout; any float dtype works).
    counts: [Hkv, K] int, keys per cluster (0 = empty).
    query_mask: [B, T] bool, real prefill tokens; None = all real.
    sm_scale: softmax scale, 1 / sqrt(D) if None.

  Returns:
    sbar: [B, Hkv, K] float32; 0 for empty clusters.
  """
  logits = centroid_logits(q, centroids, sm_scale)
  batch, _, _, tokens, _ = logits.shape
  log_n = log_counts(counts)[None, :, None, None, :]
  probs = jnp.exp(logits - jax.nn.logsumexp(logits + log_n, axis=-1,
                                            keepdims=True))
  probs = jnp.where(jnp.isfinite(log_n), probs, 0.0)
  return block_scores(probs, queries.query_weights(query_mask, batch, tokens))


def hierarchical_centroid_scores(
    q: jax.Array, centroids: jax.Array, counts: jax.Array,
    coarse_centroids: jax.Array, coarse_counts: jax.Array,
    coarse_offsets: jax.Array, *, coarse_threshold: float,
    query_mask: jax.Array | None = None,
    sm_scale: float | None = None) -> tuple[jax.Array, jax.Array]:
  """Two-level lookup, computed densely over every fine centroid.

  The coarse clusters are scored like fine ones and kept iff their sbar exceeds
  `coarse_threshold`. Only the fine clusters of kept coarse clusters are scored;
  their normaliser sums N_m exp(q.C_m) over those fine clusters plus, for each
  pruned coarse cluster c, Nc_c exp(q.Cc_c), the coarse estimate of what its
  fine clusters would add. With every coarse cluster kept this is exactly
  `centroid_scores`.

  Args:
    q: [B, Hq, D] or [B, T, Hq, D].
    centroids, counts: fine level, [Hkv, K, D] and [Hkv, K].
    coarse_centroids, coarse_counts: [Hkv, Kc, D] and [Hkv, Kc].
    coarse_offsets: [Hkv, Kc + 1] int, fine-cluster range of each coarse one.
    coarse_threshold: keep coarse clusters with sbar > this.
    query_mask: [B, T] bool or None.
    sm_scale: softmax scale, 1 / sqrt(D) if None.

  Returns:
    (fine sbar [B, Hkv, K] f32, 0 outside kept coarse clusters;
     kept coarse clusters [B, Hkv, Kc] bool).
  """
  coarse_logits = centroid_logits(q, coarse_centroids, sm_scale)
  coarse_scores = centroid_scores(q, coarse_centroids, coarse_counts,
                                  query_mask=query_mask, sm_scale=sm_scale)
  keep_coarse = coarse_scores > coarse_threshold
  num_fine = centroids.shape[1]
  fine_to_coarse = jax.vmap(
      lambda off: jnp.searchsorted(off, jnp.arange(num_fine), side="right") - 1
  )(coarse_offsets)
  candidate = jnp.take_along_axis(keep_coarse, fine_to_coarse[None], axis=2)
  logits = centroid_logits(q, centroids, sm_scale)
  batch, _, _, tokens, _ = logits.shape
  fine_terms = jnp.where(candidate[:, :, None, None, :],
                         logits + log_counts(counts)[None, :, None, None, :],
                         -jnp.inf)
  pruned_terms = jnp.where(
      keep_coarse[:, :, None, None, :], -jnp.inf,
      coarse_logits + log_counts(coarse_counts)[None, :, None, None, :])
  lse = jnp.logaddexp(jax.nn.logsumexp(fine_terms, axis=-1, keepdims=True),
                      jax.nn.logsumexp(pruned_terms, axis=-1, keepdims=True))
  probs = jnp.where(
      candidate[:, :, None, None, :] & (counts[None, :, None, None, :] > 0),
      jnp.exp(logits - lse), 0.0)
  weights = queries.query_weights(query_mask, batch, tokens)
  return block_scores(probs, weights), keep_coarse


def softmax_with_lse(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Softmax over the last axis of float32 logits (-inf = masked), and its
  log-sum-exp: (weights like logits, 0 in a row with no finite logit; lse
  [...], -inf there)."""
  lse = jax.nn.logsumexp(logits, axis=-1)
  weights = jnp.where(jnp.isfinite(lse)[..., None],
                      jnp.exp(logits - lse[..., None]), 0.0)
  return weights, lse


def attention(q: jax.Array, keys: jax.Array, values: jax.Array,
              key_mask: jax.Array | None = None, *,
              sm_scale: float | None = None) -> tuple[jax.Array, jax.Array]:
  """Softmax attention over a shared context, with its log-sum-exp.

  Args:
    q: [B, Hq, D] (decode) or [B, T, Hq, D] (prefill).
    keys, values: [Hkv, S, D], shared by the batch.
    key_mask: [B, Hkv, S] bool, keys each (sequence, KV head) attends to;
      None = all.
    sm_scale: softmax scale, 1 / sqrt(D) if None.

  Returns:
    out: like q, in q.dtype; 0 where no key is attended.
    lse: [B, (T,) Hq] float32; -inf where no key is attended.
  """
  scale = queries.default_scale(q.shape[-1], sm_scale)
  grouped = _grouped_tokens(q, keys.shape[0])
  logits = jnp.einsum("BTKGD,KSD->BKGTS", grouped,
                      keys.astype(jnp.float32)) * scale
  if key_mask is not None:
    logits = jnp.where(key_mask[:, :, None, None, :], logits, -jnp.inf)
  weights, lse = softmax_with_lse(logits)
  out = jnp.einsum("BKGTS,KSD->BKGTD", weights, values.astype(jnp.float32))
  return queries.ungroup(out, lse, queries.is_decode(q), q.dtype)


def own_rows_attention(q: jax.Array, keys: jax.Array, values: jax.Array,
                       lengths: jax.Array, *,
                       sm_scale: float | None = None
                       ) -> tuple[jax.Array, jax.Array]:
  """Decode attention of each sequence to its own first lengths[b] rows.

  Products in the rows' dtype with float32 accumulation (exact for float32
  inputs), the softmax in float32.

  Args:
    q: [B, Hq, D] one query per sequence.
    keys, values: [B, T, Hkv, D] each sequence's own rows.
    lengths: [B] int32 rows attended.
    sm_scale: softmax scale, 1 / sqrt(D) if None.

  Returns:
    out [B, Hq, D] float32 (0 where no row), lse [B, Hq] float32 (-inf there).
  """
  batch, num_heads, head_dim = q.shape
  num_kv_heads = keys.shape[2]
  scale = queries.default_scale(head_dim, sm_scale)
  grouped = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads,
                      head_dim).astype(keys.dtype)
  logits = jnp.einsum("BKGD,BTKD->BKGT", grouped, keys,
                      preferred_element_type=jnp.float32) * scale
  visible = jnp.arange(keys.shape[1])[None, :] < lengths[:, None]
  logits = jnp.where(visible[:, None, None, :], logits, -jnp.inf)
  weights, lse = softmax_with_lse(logits)
  out = jnp.einsum("BKGT,BTKD->BKGD", weights.astype(values.dtype), values,
                   preferred_element_type=jnp.float32)
  return (out.reshape(batch, num_heads, head_dim),
          lse.reshape(batch, num_heads))


def attention_with_window(
    q: jax.Array, keys: jax.Array, values: jax.Array, key_mask: jax.Array,
    window_keys: jax.Array | None = None,
    window_values: jax.Array | None = None, *,
    sm_scale: float | None = None) -> tuple[jax.Array, jax.Array]:
  """Attention over the selected clustered rows plus the whole window.

  Args:
    q: [B, Hq, D] or [B, T, Hq, D].
    keys, values: [Hkv, S', D] clustered part.
    key_mask: [B, Hkv, S'] bool selected rows.
    window_keys, window_values: [Hkv, W, D] always attended, or None.
    sm_scale: softmax scale, 1 / sqrt(D) if None.

  Returns:
    (out like q, lse [B, (T,) Hq] float32), as `attention`.
  """
  if window_keys is not None:
    keys = jnp.concatenate([keys, window_keys.astype(keys.dtype)], axis=1)
    values = jnp.concatenate([values, window_values.astype(values.dtype)],
                             axis=1)
    window_mask = jnp.ones((*key_mask.shape[:2], window_keys.shape[1]), bool)
    key_mask = jnp.concatenate([key_mask, window_mask], axis=-1)
  return attention(q, keys, values, key_mask, sm_scale=sm_scale)
