"""`SqueezedAttention`: a `flax.nnx` module to drop into one's own LLaMA-like model.

It is the attention function `(q, k, v, positions, cache, layer) -> (out, cache)` of
`models/llama/dense_attention.py` (post-RoPE q [B, T, Hq, D], k, v [B, T, Hkv, D], positions
[B, T] continuing after the fixed context), holding a fixed context's per-layer views and a
method. A model whose attention blocks call `attention(q, k, v, positions, cache, layer)` with the
caches of `init_caches` answers questions against the fixed context:

    attention = SqueezedAttention(ctx, method="squeezed", percentile=0.9)
    caches = attention.init_caches(question_lengths, capacity=256)
    logits, caches = my_model(tokens, ctx.num_tokens + offsets, caches, attention_fn=attention)

Each cache references its layer's shared context arrays (no copy per question). Inside a
`lax.while_loop`, prefer `squeezed_jax.online.bind` with context-free caches, as `generate` does,
so that the loop state does not carry the context.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from squeezed_jax.attention_methods import OnlineAttention, OnlineCache
from squeezed_jax.context_layers import split_layers
from squeezed_jax.fixed_context import FixedContext
from squeezed_jax.online import MethodOptions, init_caches, resolve_method


class SqueezedAttention(nnx.Module):
  """Attention of question tokens over a fixed context with one of `attention_methods.METHODS`.

  The per-layer context views are nnx data (so nnx.split / nnx.jit pass them as arrays); the
  method settings are static.
  """

  def __init__(self, ctx: FixedContext, *, method: str = "squeezed",
               percentile: float | None = None, kv_budget: float | None = None,
               options: MethodOptions = MethodOptions()):
    config, threshold, coarse_threshold = resolve_method(
        ctx, method, percentile=percentile, kv_budget=kv_budget, options=options)
    self.attention = nnx.static(OnlineAttention(config))
    self.context_layers = nnx.data(split_layers(
        ctx, threshold=threshold, coarse_threshold=coarse_threshold,
        page_size=config.page_size if method == "quest" else None))
    self.dtype = nnx.static(ctx.model_config.dtype)

  def init_caches(self, question_lengths: jax.Array, capacity: int,
                  dtype: Any = None) -> tuple[OnlineCache, ...]:
    """Per-layer caches for B questions of `question_lengths` [B] real tokens (the prefill's
    padding beyond them is left out of the lookup), each with room for `capacity` question and
    generated tokens; the layer's context is bound."""
    caches = init_caches(self.context_layers, jnp.asarray(question_lengths, jnp.int32), capacity,
                         dtype or self.dtype)
    return tuple(cache.replace(context=layer)
                 for cache, layer in zip(caches, self.context_layers))

  def start_decode(self, caches: tuple[OnlineCache, ...]) -> tuple[OnlineCache, ...]:
    """After the prefill: every later token is a real query of the lookup."""
    return tuple(c.replace(real_until=jnp.full_like(c.real_until, c.kv.capacity))
                 for c in caches)

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
               cache: OnlineCache, layer: int) -> tuple[jax.Array, OnlineCache]:
    """q: [B, T, Hq, D]; k, v: [B, T, Hkv, D]; positions: [B, T] -> (out [B, T, Hq, D], cache)."""
    return self.attention(q, k, v, positions, cache, layer)
