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


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax attention with GQA, float32 logits.

  q: [B, T, Hq, D]; k, v: [B, S, Hkv, D]; mask: [B, T, S] bool (True = visible).
  Returns [B, T, Hq, D] in q.dtype.
  """
  batch, length, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  q = q.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
  logits = jnp.einsum("BTKGD,BSKD->BKGTS", q, k, preferred_element_type=jnp.float32)
  logits = logits * (head_dim ** -0.5)
  logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("BKGTS,BSKD->BTKGD", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(batch, length, num_heads, head_dim).astype(q.dtype)


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
  return grouped_attention(q, k, v, mask), cache
