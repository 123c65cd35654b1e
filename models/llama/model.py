"""The LLaMA decoder as a Flax NNX module."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from models.llama.attention import Attention, AttentionFn
from models.llama.config import LlamaConfig
from models.llama.dense_attention import dense_attention
from models.llama.layers import MLP, Embedder, RMSNorm, _param


class DecoderBlock(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: LlamaConfig, layer: int, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps,
                             param_dtype=config.param_dtype)
    self.attn = Attention(config, layer, rngs=rngs)
    self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps,
                            param_dtype=config.param_dtype)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, positions, cache, attention_fn):
    attn_out, cache = self.attn(self.attn_norm(x), positions, cache, attention_fn)
    x = x + attn_out
    return x + self.mlp(self.mlp_norm(x)), cache


class Llama(nnx.Module):
  """LLaMA causal language model.

  Call with tokens [B, T] int32, positions [B, T] int32 and one cache per layer (or None);
  returns float32 logits [B, T, V] and the updated caches.
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embedder = Embedder(config, rngs=rngs)
    self.layers = nnx.List([DecoderBlock(config, i, rngs=rngs) for i in range(config.num_layers)])
    self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps,
                              param_dtype=config.param_dtype)
    if not config.tie_word_embeddings:
      self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size), config.param_dtype,
                            config.hidden_size)

  def __call__(self, tokens: jax.Array, positions: jax.Array,
               caches: Sequence[Any] | None = None,
               attention_fn: AttentionFn = dense_attention) -> tuple[jax.Array, tuple[Any, ...]]:
    if caches is None:
      caches = (None,) * len(self.layers)
    if len(caches) != len(self.layers):
      raise ValueError(f"got {len(caches)=} caches for {len(self.layers)} layers")
    x = self.embedder.encode(tokens, self.config.dtype)
    new_caches = []
    for block, cache in zip(self.layers, caches):
      x, cache = block(x, positions, cache, attention_fn)
      new_caches.append(cache)
    x = self.final_norm(x)
    if self.config.tie_word_embeddings:
      logits = self.embedder.decode(x)
    else:
      logits = jnp.einsum("BTM,MV->BTV", x, self.lm_head[...].astype(x.dtype),
                          preferred_element_type=jnp.float32)
    return logits, tuple(new_caches)
