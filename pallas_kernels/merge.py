"""Exact log-sum-exp merge of attention partials (split-K, sparse + dense).

An attention partial over a key set is (out, lse) with out the softmax-weighted
mean of the values of that set and lse the log of its softmax denominator. Two
partials over disjoint key sets combine exactly into attention over the union:
    m = max(lse_1, lse_2),  w_i = exp(lse_i - m),
    out = (w_1 out_1 + w_2 out_2) / (w_1 + w_2),  lse = m + log(w_1 + w_2).
An empty set has lse = -inf and a finite out; it then drops out exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def merge_stacked(
    outs: jax.Array, lses: jax.Array, axis: int = 0,
    dtype: jnp.dtype | None = None) -> tuple[jax.Array, jax.Array]:
  """Merges partials stacked along `axis` (the split-K reduce).

  Args:
    outs: [..., P, ..., D] partial outputs, P partials along `axis`.
    lses: outs.shape without D, float32 log-sum-exps (-inf = empty).
    axis: the partials axis (of `lses`; a non-negative index).
    dtype: output dtype, outs.dtype if None.

  Returns:
    (out with `axis` removed in `dtype`, lse with `axis` removed, float32).
  """
  if axis < 0:
    raise ValueError(f"{axis=} must be non-negative")
  lses = lses.astype(jnp.float32)
  top = jnp.max(lses, axis=axis, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  weights = jnp.exp(lses - top)
  total = weights.sum(axis=axis)
  out = (weights[..., None] * outs.astype(jnp.float32)).sum(axis=axis)
  out = out / jnp.where(total > 0, total, 1.0)[..., None]
  lse = jnp.squeeze(top, axis) + jnp.log(total)
  return out.astype(outs.dtype if dtype is None else dtype), lse


def merge_partials(out1: jax.Array, lse1: jax.Array, out2: jax.Array,
                   lse2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Merges attention over two disjoint key sets.

  Args:
    out1, out2: [B, (T,) Hq, D] partial outputs.
    lse1, lse2: [B, (T,) Hq] float32 log-sum-exps (-inf = empty set).

  Returns:
    (out [B, (T,) Hq, D] in out1.dtype, lse [B, (T,) Hq] float32).
  """
  return merge_stacked(jnp.stack([out1, out2.astype(out1.dtype)]),
                       jnp.stack([lse1, lse2]), axis=0)
