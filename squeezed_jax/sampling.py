"""Next-token sampling: greedy, temperature, and nucleus (top-p)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """temperature 0 means greedy; top_p 1.0 disables nucleus filtering."""

  temperature: float = 0.0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"{self.temperature=} must be >= 0")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"{self.top_p=} must be in (0, 1]")


def sample_tokens(logits: jax.Array, key: jax.Array, params: SamplingParams) -> jax.Array:
  """Draws one token per row. logits: [B, V] -> [B] int32."""
  if params.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / params.temperature
  if params.top_p < 1.0:
    logits = _keep_top_p(logits, params.top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _keep_top_p(logits: jax.Array, top_p: float) -> jax.Array:
  """Masks to -inf every token outside the smallest set whose probability reaches top_p."""
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  sorted_logits = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)
  inverse = jnp.argsort(order, axis=-1)
  return jnp.take_along_axis(sorted_logits, inverse, axis=-1)
