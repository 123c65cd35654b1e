"""The attention block: q/k/v projections, RoPE, a pluggable attention function, output projection."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models.llama.config import LlamaConfig
from models.llama.layers import _param
from models.llama.rope import apply_rope, inverse_frequencies

# (q, k, v, positions, cache, layer) -> (out, new_cache); see models/llama/dense_attention.py.
AttentionFn = Callable[..., tuple[jax.Array, Any]]


class Attention(nnx.Module):
  """Multi-head attention with grouped KV heads (MHA, GQA and MQA).

  q_proj: [M, Hq, D]; k_proj, v_proj: [M, Hkv, D]; o_proj: [Hq, D, M].
  """

  def __init__(self, config: LlamaConfig, layer: int, *, rngs: nnx.Rngs):
    m, d, dt = config.hidden_size, config.head_dim, config.param_dtype
    self.layer = layer
    # RoPE settings are kept as static Python values: a numpy array attribute would be nnx state
    # and turn abstract under nnx.eval_shape (which the checkpoint loaders build the model with).
    self.head_dim, self.rope_theta, self.rope_scaling = d, config.rope_theta, config.rope_scaling
    self.q_proj = _param(rngs, (m, config.num_heads, d), dt, m)
    self.k_proj = _param(rngs, (m, config.num_kv_heads, d), dt, m)
    self.v_proj = _param(rngs, (m, config.num_kv_heads, d), dt, m)
    self.o_proj = _param(rngs, (config.num_heads, d, m), dt, config.num_heads * d)

  def __call__(self, x: jax.Array, positions: jax.Array, cache: Any,
               attention_fn: AttentionFn) -> tuple[jax.Array, Any]:
    """x: [B, T, M], positions: [B, T] -> ([B, T, M], new cache)."""
    q = jnp.einsum("BTM,MND->BTND", x, self.q_proj[...].astype(x.dtype))
    k = jnp.einsum("BTM,MKD->BTKD", x, self.k_proj[...].astype(x.dtype))
    v = jnp.einsum("BTM,MKD->BTKD", x, self.v_proj[...].astype(x.dtype))
    inv_freq = inverse_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    out, cache = attention_fn(q, k, v, positions, cache, self.layer)
    return jnp.einsum("BTND,NDM->BTM", out, self.o_proj[...].astype(x.dtype)), cache
