"""Query layouts shared by every backend: decode/prefill shapes and GQA groups.

Decode queries are [B, Hq, D] (one token per sequence), prefill queries are
[B, T, Hq, D]. Internally both are handled as prefill with T = 1 for decode.
Query head n belongs to KV head n // G with G = Hq // Hkv, as in the model's
`q.reshape(B, T, Hkv, G, D)`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def is_decode(q: jax.Array) -> bool:
  """True for decode queries [B, Hq, D], False for prefill [B, T, Hq, D]."""
  if q.ndim not in (3, 4):
    raise ValueError(f"{q.shape=} must be [B, Hq, D] or [B, T, Hq, D]")
  return q.ndim == 3


def to_tokens(q: jax.Array) -> jax.Array:
  """Returns queries as [B, T, Hq, D] (T = 1 for decode)."""
  return q[:, None] if is_decode(q) else q


def group_heads(q_tokens: jax.Array, num_kv_heads: int) -> jax.Array:
  """[B, T, Hq, D] -> [B, T, Hkv, G, D]."""
  batch, tokens, num_heads, head_dim = q_tokens.shape
  if num_heads % num_kv_heads:
    raise ValueError(f"{num_kv_heads=} must divide {num_heads=}")
  return q_tokens.reshape(batch, tokens, num_kv_heads,
                          num_heads // num_kv_heads, head_dim)


def default_scale(head_dim: int, sm_scale: float | None) -> float:
  """The softmax scale, 1 / sqrt(D) unless given."""
  return 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale


def query_weights(query_mask: jax.Array | None, batch: int,
                  tokens: int) -> jax.Array:
  """Weights of the mean over a query block.

  Args:
    query_mask: [B, T] bool (True = real token) or None (all real).
    batch: B.
    tokens: T.

  Returns:
    [B, T] float32: 1 / (number of real tokens) for real tokens, 0 otherwise
    (all zero for a sequence without real tokens, which then selects nothing).
  """
  if query_mask is None:
    return jnp.full((batch, tokens), 1.0 / tokens, jnp.float32)
  if query_mask.shape != (batch, tokens):
    raise ValueError(f"{query_mask.shape=} must be {(batch, tokens)=}")
  mask = query_mask.astype(jnp.float32)
  return mask / jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)


def ungroup(out: jax.Array, lse: jax.Array, decode: bool,
            dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
  """Per-KV-head attention results back to the query layout.

  Args:
    out: [B, Hkv, G, T, D].
    lse: [B, Hkv, G, T].
    decode: drop the T axis (decode queries were [B, Hq, D]).
    dtype: dtype of the returned out.

  Returns:
    (out [B, (T,) Hq, D] in dtype, lse [B, (T,) Hq] float32).
  """
  batch, num_kv_heads, group, tokens, head_dim = out.shape
  out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(
      batch, tokens, num_kv_heads * group, head_dim)
  lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(batch, tokens, -1)
  if decode:
    out, lse = out[:, 0], lse[:, 0]
  return out.astype(dtype), lse.astype(jnp.float32)
