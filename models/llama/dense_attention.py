"""Dense causal attention: the default implementation of the model's pluggable attention function.

An attention function has the signature

    attention_fn(q, k, v, positions, cache, layer) -> (out, new_cache)

q: [B, T, Hq, D] post-RoPE queries; k, v: [B, T, Hkv, D] post-RoPE keys and values of the same
tokens; positions: [B, T] int32 token positions; cache: that layer's cache pytree (whatever the
implementation keeps, or None for a cache-less forward); layer: the static layer index.
out: [B, T, Hq, D]. The model never looks inside the cache, so another implementation (squeezed
attention over a fixed context) plugs in without editing the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.llama.kv_cache import KVCache


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                      mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Softmax attention with GQA and float32 logits, with its log-sum-exp (for exact merging).

  q: [B, T, Hq, D]; k, v: [B, S, Hkv, D]; mask: [B, T, S] bool (True = visible).
  Returns (out [B, T, Hq, D] float32, 0 where no key is visible;
  lse [B, T, Hq] float32, -inf where no key is visible).
  """
  batch, length, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  q = q.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
  logits = jnp.einsum("BTKGD,BSKD->BKGTS", q, k, preferred_element_type=jnp.float32)
  logits = jnp.where(mask[:, None, None], logits * (head_dim ** -0.5), -jnp.inf)
  top = jnp.max(logits, axis=-1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  weights = jnp.exp(logits - top)
  total = jnp.sum(weights, axis=-1)
  out = jnp.einsum("BKGTS,BSKD->BKGTD", weights.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  out = out / jnp.where(total > 0, total, 1.0)[..., None]
  lse = top[..., 0] + jnp.log(total)
  out = out.transpose(0, 3, 1, 2, 4).reshape(batch, length, num_heads, head_dim)
  return out, lse.transpose(0, 3, 1, 2).reshape(batch, length, num_heads)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                    cache: KVCache | None, layer: int) -> tuple[jax.Array, KVCache | None]:
  """Causal attention; with a cache, writes k/v at `positions` and attends to slots <= position."""
  del layer  # Dense attention treats every layer alike.
  if cache is None:
    key_positions = positions
  else:
    cache = cache.write(positions, k, v)
    k, v = cache.keys, cache.values
    key_positions = jnp.broadcast_to(jnp.arange(cache.capacity), (q.shape[0], cache.capacity))
  mask = key_positions[:, None, :] <= positions[:, :, None]
  out, _ = grouped_attention(q, k, v, mask)
  return out.astype(q.dtype), cache
