"""Prefill of a long fixed context in chunks, keeping every layer's K/V and the window's queries.

The observation window's queries are captured through the model's pluggable attention function
(a dense attention that also records the queries of the last W positions), so the model itself
needs no hook.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.llama import KVCache, Llama, dense_attention, init_kv_caches
from squeezed_jax.progress import progress


@flax.struct.dataclass
class _WindowCapture:
  """A dense KV cache plus the queries of positions window_start.. (window_queries: [1, W, Hq, D])."""

  kv: KVCache
  window_queries: jax.Array
  window_start: jax.Array


def _attend_and_capture(q, k, v, positions, cache: _WindowCapture, layer):
  out, kv = dense_attention(q, k, v, positions, cache.kv, layer)
  window = cache.window_queries.shape[1]
  slots = positions - cache.window_start
  slots = jnp.where(slots >= 0, slots, window)  # before the window: out of range, dropped
  batch = jnp.arange(q.shape[0])[:, None]
  queries = cache.window_queries.at[batch, slots].set(q.astype(cache.window_queries.dtype),
                                                      mode="drop")
  return out, _WindowCapture(kv, queries, cache.window_start)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("caches",))
def _prefill_chunk(graphdef, state, tokens, start, caches):
  model = nnx.merge(graphdef, state)
  positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
  _, caches = model(tokens, positions, caches, _attend_and_capture)
  return caches


@flax.struct.dataclass
class PrefilledContext:
  """The fixed context's cache, one buffer per layer (so that a layer's view costs nothing).

  keys, values: L-tuples of [Hkv, S, D] post-RoPE; window_queries: [L, W, Hq, D] float32.
  """

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  window_queries: jax.Array


def prefill_context(model: Llama, token_ids: Sequence[int], *, window: int,
                    chunk_size: int = 512, cache_dtype=None) -> PrefilledContext:
  """Runs the model over the fixed context in chunks of `chunk_size` tokens (a progress bar with
  an ETA is shown when there is more than one chunk: `squeezed_jax.progress`)."""
  config = model.config
  num_tokens = len(token_ids)
  if not 0 < window < num_tokens:
    raise ValueError(f"observation {window=} must be in (0, {num_tokens=})")
  if num_tokens > config.max_position_embeddings:
    raise ValueError(f"context of {num_tokens} tokens exceeds the model's "
                     f"{config.max_position_embeddings=}")
  chunk_size = min(chunk_size, num_tokens)
  num_chunks = -(-num_tokens // chunk_size)
  tokens = np.zeros((1, num_chunks * chunk_size), np.int32)
  tokens[0, :num_tokens] = token_ids
  query_shape = (1, window, config.num_heads, config.head_dim)
  caches = tuple(  # fresh buffers per layer: the chunk step donates them
      _WindowCapture(kv, jnp.zeros(query_shape, jnp.float32), jnp.int32(num_tokens - window))
      for kv in init_kv_caches(config, 1, num_tokens, cache_dtype))
  graphdef, state = nnx.split(model)
  for start in progress(range(0, tokens.shape[1], chunk_size), desc="context prefill",
                        unit="chunk"):
    caches = _prefill_chunk(graphdef, state, jnp.asarray(tokens[:, start:start + chunk_size]),
                            jnp.int32(start), caches)
    jax.block_until_ready(caches[0].kv.keys)  # so that the progress bar measures real work
  window_queries = jnp.stack([c.window_queries[0] for c in caches])
  keys, values = [], []
  pending = list(caches)
  del caches
  while pending:  # layer by layer, each [1, S, Hkv, D] cache dropped once transposed
    kv = pending.pop(0).kv
    keys.append(kv.keys[0].transpose(1, 0, 2))
    values.append(kv.values[0].transpose(1, 0, 2))
  return PrefilledContext(keys=tuple(keys), values=tuple(values), window_queries=window_queries)
