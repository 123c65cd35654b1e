"""Dense attention partials (out, log-sum-exp) over a masked key set, for exact merging.

A partial over a key set is the softmax-weighted mean of its values plus the log of its softmax
denominator; `pallas_kernels.merge_partials` combines partials over disjoint key sets exactly.
Used for the dense causal part over a question's own tokens and for the XLA baselines over the
fixed context.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_partial(q: jax.Array, keys: jax.Array, values: jax.Array,
                      mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """Softmax attention over the visible keys, with GQA, in float32.

  q: [B, T, Hq, D]; keys, values: [Hkv, S, D] (shared by the batch) or [B, S, Hkv, D] (one
  set per sequence); mask: broadcastable to [B, Hkv, T, S] bool (True = visible) or None.
  Returns (out [B, T, Hq, D] float32, 0 where nothing is visible;
  lse [B, T, Hq] float32, -inf where nothing is visible).
  """
  batch, length, num_heads, head_dim = q.shape
  shared = keys.ndim == 3
  num_kv_heads = keys.shape[0] if shared else keys.shape[2]
  grouped = q.astype(jnp.float32).reshape(batch, length, num_kv_heads,
                                          num_heads // num_kv_heads, head_dim)
  logits_spec, out_spec = (("BTKGD,KSD->BKGTS", "BKGTS,KSD->BKGTD") if shared
                           else ("BTKGD,BSKD->BKGTS", "BKGTS,BSKD->BKGTD"))
  logits = jnp.einsum(logits_spec, grouped, keys.astype(jnp.float32)) * head_dim ** -0.5
  if mask is not None:
    logits = jnp.where(jnp.expand_dims(mask, 2), logits, -jnp.inf)
  top = jnp.max(logits, axis=-1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  weights = jnp.exp(logits - top)
  total = weights.sum(axis=-1)
  out = jnp.einsum(out_spec, weights, values.astype(jnp.float32))
  out = out / jnp.where(total > 0, total, 1.0)[..., None]
  lse = top[..., 0] + jnp.log(total)
  out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(batch, length, num_heads, head_dim)
  lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(batch, length, num_heads)
  return out, lse
