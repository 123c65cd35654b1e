"""The LLaMA building blocks without attention: RMSNorm, the SwiGLU MLP and the token embedder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.llama.config import LlamaConfig


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, fan_in: int) -> nnx.Param:
  return nnx.Param(jax.random.normal(rngs.params(), shape, dtype) * fan_in ** -0.5)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in float32. scale: [M]."""

  def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(x @ gate) * (x @ up)).

  gate_proj, up_proj: [M, F]; down_proj: [F, M].
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    m, f, dt = config.hidden_size, config.intermediate_size, config.param_dtype
    self.gate_proj = _param(rngs, (m, f), dt, m)
    self.up_proj = _param(rngs, (m, f), dt, m)
    self.down_proj = _param(rngs, (f, m), dt, f)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate = jnp.einsum("BTM,MF->BTF", x, self.gate_proj[...].astype(x.dtype))
    up = jnp.einsum("BTM,MF->BTF", x, self.up_proj[...].astype(x.dtype))
    return jnp.einsum("BTF,FM->BTM", jax.nn.silu(gate) * up, self.down_proj[...].astype(x.dtype))


class Embedder(nnx.Module):
  """Token embedding table [V, M]; also the output projection when embeddings are tied."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.embedding = _param(rngs, (config.vocab_size, config.hidden_size), config.param_dtype, 1)

  def encode(self, tokens: jax.Array, dtype) -> jax.Array:
    """tokens [B, T] -> [B, T, M]."""
    return jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)

  def decode(self, x: jax.Array) -> jax.Array:
    """x [B, T, M] -> logits [B, T, V] (float32)."""
    return jnp.einsum("BTM,VM->BTV", x, self.embedding[...].astype(x.dtype),
                      preferred_element_type=jnp.float32)
