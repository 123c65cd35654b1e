"""Block-sparse flash attention over listed K/V blocks, Pallas TPU (Mosaic).

Grid (sequence x KV head, query tile, block slot). The block list and counts
are scalar-prefetched; the K/V index maps read `blocks[slot]`, so the pipeline
DMAs only listed blocks (slots past the count repeat the last block: no copy,
no compute). The query tile holds all G heads of the KV head, so each block
is read once per GQA group. Rows of a block that are not selected are masked
with the selection's row mask.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from pallas_kernels import queries
from pallas_kernels.tpu import block_selection as block_selection_lib

_LANES = 128


def _sparse_attention_kernel(blocks_ref, num_blocks_ref, q_ref, k_ref, v_ref,
                             mask_ref, out_ref, lse_ref, acc_ref, top_ref,
                             total_ref, *, sm_scale: float, max_blocks: int,
                             num_keys: int):
  """One (sequence x KV head, query tile, block slot) step.

  Refs: blocks_ref [N * max_blocks], num_blocks_ref [N] (SMEM);
  q_ref [block_m, D]; k_ref, v_ref [block_rows, D]; mask_ref [1, block_rows];
  out_ref [block_m, D] f32; lse_ref [block_m, 128] f32; scratch acc_ref
  [block_m, D], top_ref and total_ref [block_m, 128] f32.
  """
  seq_head, slot = pl.program_id(0), pl.program_id(2)

  @pl.when(slot == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)
    top_ref[...] = jnp.full_like(top_ref, -jnp.inf)
    total_ref[...] = jnp.zeros_like(total_ref)

  @pl.when(slot < num_blocks_ref[seq_head])
  def _step():
    block_rows = k_ref.shape[0]
    first_row = blocks_ref[seq_head * max_blocks + slot] * block_rows
    in_bounds = (first_row + jax.lax.broadcasted_iota(
        jnp.int32, (block_rows, 1), 0)) < num_keys
    logits = jax.lax.dot_general(
        q_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.float32) * sm_scale
    logits = jnp.where(mask_ref[...] > 0, logits, -jnp.inf)
    top = top_ref[...][:, :1]
    new_top = jnp.maximum(top, logits.max(axis=1, keepdims=True))
    safe_top = jnp.where(new_top > -jnp.inf, new_top, 0.0)
    probs = jnp.exp(logits - safe_top)
    rescale = jnp.exp(top - safe_top)
    values = jnp.where(in_bounds, v_ref[...], 0)
    acc_ref[...] = acc_ref[...] * rescale + jnp.dot(
        probs.astype(values.dtype), values,
        preferred_element_type=jnp.float32)
    total = total_ref[...][:, :1] * rescale + probs.sum(axis=1, keepdims=True)
    top_ref[...] = jnp.broadcast_to(new_top, top_ref.shape)
    total_ref[...] = jnp.broadcast_to(total, total_ref.shape)

  @pl.when(slot == max_blocks - 1)
  def _finish():
    total = total_ref[...][:, :1]
    out_ref[...] = acc_ref[...] / jnp.where(total > 0, total, 1.0)
    lse_ref[...] = top_ref[...] + jnp.log(total_ref[...])


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_m",
                                             "interpret"))
def sparse_attention(q: jax.Array, keys: jax.Array, values: jax.Array,
                     block_sel: block_selection_lib.BlockSelection, *,
                     sm_scale: float | None = None, block_m: int = 128,
                     interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """Exact attention over the selected rows of the listed blocks.

  Args:
    q: [B, Hq, D] (decode) or [B, T, Hq, D] (prefill).
    keys, values: [Hkv, S', D].
    block_sel: from `block_selection.block_selection`.
    sm_scale: softmax scale, 1 / sqrt(D) if None.
    block_m: query rows per tile (multiple of 16).
    interpret: run under `pltpu.InterpretParams()` (CPU tests).

  Returns:
    (out like q in q.dtype, lse [B, (T,) Hq] f32, -inf for empty selections).
  """
  if block_m % 16:
    raise ValueError(f"{block_m=} must be a multiple of 16")
  scale = queries.default_scale(q.shape[-1], sm_scale)
  num_kv_heads, num_keys, head_dim = keys.shape
  grouped = queries.group_heads(queries.to_tokens(q), num_kv_heads)
  batch, tokens, _, group, _ = grouped.shape
  num_q_rows = tokens * group
  block_m = min(block_m, -(-num_q_rows // 16) * 16)
  padded_rows = -(-num_q_rows // block_m) * block_m
  q_rows = jnp.transpose(grouped, (0, 2, 1, 3, 4)).reshape(
      batch * num_kv_heads, num_q_rows, head_dim)
  q_rows = jnp.pad(q_rows, ((0, 0), (0, padded_rows - num_q_rows), (0, 0)))
  q_rows = q_rows.astype(keys.dtype)
  max_blocks = block_sel.blocks.shape[-1]
  _, _, num_row_blocks, block_rows = block_sel.row_mask.shape
  blocks = block_sel.blocks.reshape(-1)
  mask = block_sel.row_mask.astype(jnp.float32).reshape(-1, 1, block_rows)

  def kv_map(seq_head, i, slot, blocks_ref, _):
    return (seq_head % num_kv_heads, blocks_ref[seq_head * max_blocks + slot],
            0)

  def mask_map(seq_head, i, slot, blocks_ref, _):
    return (seq_head * num_row_blocks
            + blocks_ref[seq_head * max_blocks + slot], 0, 0)

  kv_spec = pl.BlockSpec((None, block_rows, head_dim), kv_map)
  row_spec = pl.BlockSpec((None, block_m, head_dim),
                          lambda seq_head, i, slot, *_: (seq_head, i, 0))
  kernel = functools.partial(_sparse_attention_kernel, sm_scale=scale,
                             max_blocks=max_blocks, num_keys=num_keys)
  out, lse = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(batch * num_kv_heads, padded_rows // block_m, max_blocks),
          in_specs=[row_spec, kv_spec, kv_spec,
                    pl.BlockSpec((None, 1, block_rows), mask_map)],
          out_specs=[
              row_spec,
              pl.BlockSpec((None, block_m, _LANES),
                           lambda seq_head, i, slot, *_: (seq_head, i, 0)),
          ],
          scratch_shapes=[pltpu.VMEM((block_m, head_dim), jnp.float32),
                          pltpu.VMEM((block_m, _LANES), jnp.float32),
                          pltpu.VMEM((block_m, _LANES), jnp.float32)]),
      out_shape=[
          jax.ShapeDtypeStruct((batch * num_kv_heads, padded_rows, head_dim),
                               jnp.float32),
          jax.ShapeDtypeStruct((batch * num_kv_heads, padded_rows, _LANES),
                               jnp.float32),
      ],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=pltpu.InterpretParams() if interpret else False,
      name="squeezed_sparse_attention_tpu",
  )(blocks, block_sel.num_blocks.reshape(-1), q_rows, keys, values, mask)
  out = out[:, :num_q_rows].reshape(batch, num_kv_heads, tokens, group,
                                    head_dim)
  lse = lse[:, :num_q_rows, 0].reshape(batch, num_kv_heads, tokens, group)
  return queries.ungroup(jnp.swapaxes(out, 2, 3), jnp.swapaxes(lse, 2, 3),
                         queries.is_decode(q), q.dtype)
