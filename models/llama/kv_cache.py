"""The dense per-layer KV cache: slot j holds the key/value of the token at position j."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from models.llama.config import LlamaConfig


@flax.struct.dataclass
class KVCache:
  """One layer's cache.

  keys, values: [B, S_max, Hkv, D] post-RoPE keys and values, slot j = position j.
  """

  keys: jax.Array
  values: jax.Array

  @property
  def capacity(self) -> int:
    return self.keys.shape[1]

  def write(self, positions: jax.Array, keys: jax.Array, values: jax.Array) -> "KVCache":
    """Stores `keys`/`values` [B, T, Hkv, D] at slots `positions` [B, T]."""
    batch = jnp.arange(positions.shape[0])[:, None]
    return KVCache(
        keys=self.keys.at[batch, positions].set(keys.astype(self.keys.dtype), mode="drop"),
        values=self.values.at[batch, positions].set(values.astype(self.values.dtype),
                                                    mode="drop"))


def init_kv_caches(config: LlamaConfig, batch_size: int, max_length: int,
                   dtype=None) -> tuple[KVCache, ...]:
  """An empty cache per layer, each [batch_size, max_length, num_kv_heads, head_dim]."""
  if max_length > config.max_position_embeddings:
    raise ValueError(f"{max_length=} exceeds the model's "
                     f"{config.max_position_embeddings=}")
  shape = (batch_size, max_length, config.num_kv_heads, config.head_dim)
  dtype = dtype or config.dtype
  return tuple(KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
               for _ in range(config.num_layers))
