"""Rotary position embeddings (RoPE): plain, linear scaling, and the llama3 scaling rule.

Uses the Hugging Face "rotate half" layout: dimension i is paired with i + head_dim/2.
(llama2.c checkpoints pair adjacent dimensions; their loader permutes q/k weights into this layout.)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from models.llama.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
  """Per-pair rotation frequencies, float64 numpy of shape [head_dim // 2]."""
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if scaling.rope_type == "linear":
    return inv_freq / scaling.factor
  if scaling.rope_type == "llama3":
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled)
  return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates `x` [B, T, H, D] by `positions` [B, T]; computed in float32, returned in x.dtype."""
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
  cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, D/2]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
