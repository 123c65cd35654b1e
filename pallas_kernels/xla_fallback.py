"""XLA (pure jnp) fallback of the sparse attention, for any platform.

Flash-style: a `lax.scan` over blocks of the selection's row list gathers the
rows of each block and updates an online softmax, so memory stays
O(T x block_rows) whatever the budget. The lookup's fallback is
`references.centroid_scores` itself (one einsum and one log-sum-exp).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import merge
from pallas_kernels import queries
from pallas_kernels import references
from pallas_kernels import selection as selection_lib


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_rows"))
def sparse_attention(q: jax.Array, keys: jax.Array, values: jax.Array,
                     selection: selection_lib.Selection, *,
                     window_keys: jax.Array | None = None,
                     window_values: jax.Array | None = None,
                     sm_scale: float | None = None,
                     block_rows: int = 512) -> tuple[jax.Array, jax.Array]:
  """Exact attention over the selected rows and the observation window.

  See `pallas_kernels.sparse_attention`.

  Args:
    q: [B, Hq, D] or [B, T, Hq, D].
    keys, values: [Hkv, S', D].
    selection: rows per (sequence, KV head).
    window_keys, window_values: [Hkv, W, D] always-attended rows, or None.
    sm_scale: softmax scale, 1 / sqrt(D) if None.
    block_rows: rows gathered per scan step.

  Returns:
    (out like q in q.dtype, lse [B, (T,) Hq] f32, -inf for empty selections).
  """
  scale = queries.default_scale(q.shape[-1], sm_scale)
  num_kv_heads = keys.shape[0]
  grouped = queries.group_heads(queries.to_tokens(q).astype(jnp.float32),
                                num_kv_heads)
  batch, tokens, _, group, head_dim = grouped.shape
  num_blocks = -(-selection.max_rows // block_rows)
  pad = num_blocks * block_rows - selection.max_rows
  rows = jnp.pad(selection.rows, ((0, 0), (0, 0), (0, pad)))
  rows = jnp.moveaxis(rows.reshape(batch, num_kv_heads, num_blocks,
                                   block_rows), 2, 0)
  heads = jnp.arange(num_kv_heads)[:, None]
  gather = jax.vmap(lambda table, idx: table[heads, idx], in_axes=(None, 0))

  def step(carry, inputs):
    out, top, total = carry
    block, row_block = inputs
    slots = block * block_rows + jnp.arange(block_rows)
    valid = slots < selection.num_rows[..., None]
    k = gather(keys, row_block).astype(jnp.float32)
    logits = jnp.einsum("BTKGD,BKRD->BKGTR", grouped, k) * scale
    logits = jnp.where(valid[:, :, None, None, :], logits, -jnp.inf)
    new_top = jnp.maximum(top, logits.max(axis=-1))
    safe_top = jnp.where(jnp.isfinite(new_top), new_top, 0.0)
    probs = jnp.exp(logits - safe_top[..., None])
    rescale = jnp.exp(top - safe_top)
    v = gather(values, row_block).astype(jnp.float32)
    out = out * rescale[..., None] + jnp.einsum("BKGTR,BKRD->BKGTD", probs, v)
    return (out, new_top, total * rescale + probs.sum(axis=-1)), None

  shape = (batch, num_kv_heads, group, tokens)
  init = (jnp.zeros((*shape, head_dim), jnp.float32),
          jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32))
  (out, top, total), _ = jax.lax.scan(step, init,
                                      (jnp.arange(num_blocks), rows))
  out = out / jnp.where(total > 0, total, 1.0)[..., None]
  lse = top + jnp.log(total)
  out, lse = queries.ungroup(out, lse, queries.is_decode(q), q.dtype)
  if window_keys is None:
    return out, lse
  window_out, window_lse = references.attention(q, window_keys, window_values,
                                                sm_scale=sm_scale)
  return merge.merge_partials(out, lse, window_out, window_lse)
