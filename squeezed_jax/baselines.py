"""Baseline key selections over the clustered fixed context, for comparison at equal KV budget.

* Quest (Tang et al. 2024): pages of `page_size` keys in original order, summarised by their
  elementwise key min / max; a page's score upper-bounds q.k: sum_d max(q_d min_d, q_d max_d);
  the top pages are read.
* Oracle top-k: the true attention weights over every clustered key; the top keys are read (an
  upper bound on what any selection at that budget can capture; its scoring pass is not counted).
* Streaming (attention sinks + recent window): the first `sinks` keys and the most recent ones,
  in original order; the observation window (always attended) is the most recent part.

For a block of queries, as in the squeezed lookup, a score is the mean over the block's real
queries, then the max over the GQA group (`pallas_kernels.references.block_scores`). Every
selection is a dense key mask in the reordered row order of `ContextLayer.keys` (rows map to
original positions through `permutation`). These run on XLA (pure jnp), and so does their
attention over the masked keys (`masked_attention`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import queries, references
from squeezed_jax.context_layers import ContextLayer


# The largest float32 [B, Hq, T_block, S'] logits block `masked_attention` builds.
LOGITS_BLOCK_BYTES = 1 << 30


def masked_attention(q: jax.Array, keys: jax.Array, values: jax.Array,
                     mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """Exact attention of a query block over the keys of `mask`, computed as dense attention is:
  operands in their dtype (bf16 for a bf16 model), float32 accumulation and softmax.

  q: [B, T, Hq, D]; keys, values: [Hkv, S', D]; mask: [B, Hkv, S'] bool or None (all keys).
  Returns (out [B, T, Hq, D] float32, lse [B, T, Hq] float32; -inf where no key is attended).
  The queries are processed in blocks whose logits stay under LOGITS_BLOCK_BYTES, so a long
  question against a long context does not materialise [B, Hq, T, S'] at once.
  """
  batch, tokens, num_heads, head_dim = q.shape
  num_kv_heads, num_keys, _ = keys.shape
  scale = head_dim ** -0.5
  if jax.default_backend() == "cpu":
    # XLA:CPU has no bf16 x bf16 -> f32 dot; f32 operands give the same exact products there.
    keys, values = keys.astype(jnp.float32), values.astype(jnp.float32)

  def attend(q_block):
    grouped = queries.group_heads(q_block.astype(keys.dtype), num_kv_heads)
    logits = jnp.einsum("BTKGD,KSD->BKGTS", grouped, keys,
                        preferred_element_type=jnp.float32) * scale
    if mask is not None:
      logits = jnp.where(mask[:, :, None, None, :], logits, -jnp.inf)
    weights, lse = references.softmax_with_lse(logits)
    out = jnp.einsum("BKGTS,KSD->BKGTD", weights.astype(values.dtype), values,
                     preferred_element_type=jnp.float32)
    return queries.ungroup(out, lse, False, jnp.float32)

  block = max(1, min(tokens, LOGITS_BLOCK_BYTES // (4 * batch * num_heads * num_keys)))
  if block == tokens:
    return attend(q)
  num_blocks = -(-tokens // block)
  padded = jnp.pad(q, ((0, 0), (0, num_blocks * block - tokens), (0, 0), (0, 0)))
  blocks = padded.reshape(batch, num_blocks, block, num_heads, head_dim).swapaxes(0, 1)
  out, lse = jax.lax.map(attend, blocks)
  unblock = lambda x: x.swapaxes(0, 1).reshape(batch, num_blocks * block, *x.shape[3:])[:, :tokens]
  return unblock(out), unblock(lse)


def top_mask(scores: jax.Array, count: int) -> jax.Array:
  """[B, Hkv, X] -> [B, Hkv, X] bool, True at the `count` (static) highest scores."""
  _, indices = jax.lax.top_k(scores, count)
  mark = lambda idx: jnp.zeros(scores.shape[-1], bool).at[idx].set(True)
  return jax.vmap(jax.vmap(mark))(indices)


def quest_mask(q: jax.Array, layer: ContextLayer, weights: jax.Array, *, page_size: int,
               key_budget: int) -> jax.Array:
  """Keys of the top pages by Quest's bound: as many whole pages as fit in `key_budget` (every
  page when it covers all S' keys; at least one).

  q: [B, T, Hq, D]; weights: [B, T]. Returns [B, Hkv, S'] bool in reordered row order.
  """
  grouped = queries.group_heads(q.astype(jnp.float32), layer.keys.shape[0])
  # max(q_d min_d, q_d max_d) = relu(q_d) max_d + min(q_d, 0) min_d.
  bounds = (jnp.einsum("BTKGD,KPD->BKGTP", jnp.maximum(grouped, 0.0), layer.page_max)
            + jnp.einsum("BTKGD,KPD->BKGTP", jnp.minimum(grouped, 0.0), layer.page_min))
  num_pages = layer.page_max.shape[1]
  fitting = num_pages if key_budget >= layer.num_clustered else max(1, key_budget // page_size)
  pages = top_mask(references.block_scores(bounds, weights), min(num_pages, fitting))
  row_pages = layer.permutation // page_size
  return jnp.take_along_axis(pages, jnp.broadcast_to(row_pages, pages.shape[:2]
                                                     + row_pages.shape[-1:]), axis=-1)


def attention_weights(q: jax.Array, keys: jax.Array) -> jax.Array:
  """Softmax weights of every query over the keys [Hkv, S', D]: [B, Hkv, G, T, S'] float32."""
  grouped = queries.group_heads(q.astype(jnp.float32), keys.shape[0])
  logits = jnp.einsum("BTKGD,KSD->BKGTS", grouped, keys.astype(jnp.float32))
  return jax.nn.softmax(logits * q.shape[-1] ** -0.5, axis=-1)


def oracle_topk_mask(q: jax.Array, layer: ContextLayer, weights: jax.Array, *,
                     key_budget: int) -> jax.Array:
  """The `key_budget` keys with the highest true attention weight.

  q: [B, T, Hq, D]; weights: [B, T]. Returns [B, Hkv, S'] bool.
  """
  scores = references.block_scores(attention_weights(q, layer.keys), weights)
  return top_mask(scores, min(key_budget, layer.num_clustered))


def streaming_mask(layer: ContextLayer, batch: int, *, sinks: int, key_budget: int) -> jax.Array:
  """The first min(sinks, key_budget) keys and the most recent rest of the budget.

  Returns [B, Hkv, S'] bool (the same for every query).
  """
  sinks = min(sinks, key_budget)
  recent = key_budget - sinks
  position = layer.permutation
  mask = (position < sinks) | (position >= layer.num_clustered - recent)
  return jnp.broadcast_to(mask, (batch, *mask.shape))
