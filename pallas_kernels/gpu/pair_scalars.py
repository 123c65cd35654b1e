"""Per-(sequence x KV head) scalars of the decode kernels, without a broadcast.

A decode program works for one pair bh = b * Hkv + h (sequence b, KV head h)
and reads that pair's threshold or key budget, and its sequence's activity, as
scalar refs. A value shared by every pair stays a [1] array that every program
reads: broadcasting it to [B x Hkv] first would be an XLA kernel of its own at
every layer of every decode step.
"""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp


def per_pair(value: float | int | jax.Array, dtype: jnp.dtype, batch: int,
             num_kv_heads: int) -> tuple[jax.Array, pl.BlockSpec]:
  """(array, spec) reading `value` (a scalar, or broadcastable to [B, Hkv])
  as a scalar ref of pair bh = the grid's first index."""
  value = jnp.asarray(value, dtype)
  if value.ndim == 0:
    return value.reshape(1), pl.BlockSpec((None,), lambda bh, *_: (0,))
  value = jnp.broadcast_to(value, (batch, num_kv_heads))
  return value.reshape(-1), pl.BlockSpec((None,), lambda bh, *_: (bh,))


def per_sequence(value: jax.Array, dtype: jnp.dtype,
                 num_kv_heads: int) -> tuple[jax.Array, pl.BlockSpec]:
  """(array, spec) reading value[b] ([B]) as a scalar ref of pair
  bh = b * Hkv + h = the grid's first index."""
  return value.astype(dtype), pl.BlockSpec(
      (None,), lambda bh, *_: (bh // num_kv_heads,))
