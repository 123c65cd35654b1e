"""Block-sparse (row-gather) flash attention over a selection, Pallas GPU.

One program per (sequence x KV head, query tile, split of the row list). It
loads its query tile once, then walks its share of the selected rows in blocks
of `block_rows`: gathers the K rows (256 contiguous bytes each at D = 128,
bf16), an online softmax, gathers the V rows. The query tile holds the rows of
all G query heads of the KV head, so each K/V row is read once per GQA group.

Decode: few query rows, so the row list is cut into splits of `split_rows`
(split-K); every split is equally long, so heads that keep different counts
still give equal work units (an empty split returns at once) and the GPU's
block scheduler balances them. The observation window (W contiguous rows,
always attended) is attended by `decode_reduce.reduce_partials`, which also
merges the splits' partials (a window loop compiled into this kernel cost it
occupancy: benchmarks/RESULTS.md).
Prefill: a chunk of queries, one split, big query tiles; the window is read by
that split before its selected rows (occupancy is one program per SM there
anyway, and no partials need merging).
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels import block_sizes as block_sizes_lib
from pallas_kernels import own_rows
from pallas_kernels import queries
from pallas_kernels import selection as selection_lib
from pallas_kernels.gpu import decode_reduce
from pallas_kernels.gpu import flash_blocks


def _sparse_attention_kernel(num_rows_ref, rows_ref, q_ref, k_ref, v_ref,
                             *refs, sm_scale: float, block_rows: int,
                             split_rows: int, num_q_rows: int, window: int):
  """One (sequence x KV head, query tile, split) program.

  Refs: num_rows_ref [] int32; rows_ref [R] int32; q_ref [block_m, D];
  k_ref, v_ref [S', D]; if window: window_k_ref, window_v_ref [W, D], all
  attended before the selected rows (single-split prefill only);
  out_ref [block_m, D] f32; lse_ref [block_m] f32.
  Only the first num_q_rows query rows are real; padding rows are not stored.
  """
  *window_refs, out_ref, lse_ref = refs
  start = pl.program_id(2) * split_rows
  stop = jnp.minimum(num_rows_ref[()], start + split_rows)
  q = q_ref[...]
  block_m, head_dim = q.shape
  real = pl.program_id(1) * block_m + jnp.arange(block_m) < num_q_rows

  carry = flash_blocks.empty_carry(block_m, head_dim)
  if window:
    carry = flash_blocks.attend_contiguous(q, *window_refs, 0, window,
                                           block_rows, carry, sm_scale)
  carry = flash_blocks.attend_listed(q, rows_ref, k_ref, v_ref, start, stop,
                                     block_rows, carry, sm_scale)
  flash_blocks.store_partial(out_ref, lse_ref, carry, real)


@functools.partial(jax.jit,
                   static_argnames=("own_rows_per_sequence", "sm_scale",
                                    "block_sizes", "interpret"))
def sparse_attention(
    q: jax.Array, keys: jax.Array, values: jax.Array,
    selection: selection_lib.Selection, *,
    window_keys: jax.Array | None = None,
    window_values: jax.Array | None = None,
    own: own_rows.OwnRows | None = None,
    own_rows_per_sequence: int | None = None, sm_scale: float | None = None,
    block_sizes: block_sizes_lib.AttentionBlockSizes | None = None,
    interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """Exact attention over the selected rows and the observation window.

  See `pallas_kernels.sparse_attention`.

  Args:
    q: [B, Hq, D] (decode) or [B, T, Hq, D] (prefill).
    keys, values: [Hkv, S', D].
    selection: rows per (sequence, KV head), [B, Hkv, R].
    window_keys, window_values: [Hkv, W, D] always-attended rows, or None.
    own: each sequence's own rows, attended in the reduce (split-K decode
      only), or None.
    own_rows_per_sequence: consecutive query heads of a KV head that belong
      to one own-rows sequence (`decode_reduce.reduce_partials`; None = all
      of them: q's sequences are the own rows' sequences).
    sm_scale: softmax scale, 1 / sqrt(D) if None.
    block_sizes: tiles; decode / prefill defaults if None.
    interpret: run the kernel in the Pallas interpreter (CPU tests).

  Returns:
    (out like q in q.dtype, lse [B, (T,) Hq] f32, -inf for empty selections).
  """
  decode = queries.is_decode(q)
  if block_sizes is None:
    block_sizes = (block_sizes_lib.AttentionBlockSizes.for_decode() if decode
                   else block_sizes_lib.AttentionBlockSizes.for_prefill())
  scale = queries.default_scale(q.shape[-1], sm_scale)
  num_kv_heads, num_keys, head_dim = keys.shape
  if values.shape != keys.shape:
    raise ValueError(f"{values.shape=} must equal {keys.shape=}")
  grouped = queries.group_heads(queries.to_tokens(q), num_kv_heads)
  batch, tokens, _, group, _ = grouped.shape
  if selection.rows.shape[:2] != (batch, num_kv_heads):
    raise ValueError(
        f"{selection.rows.shape=} must start with {(batch, num_kv_heads)=}")
  num_q_rows = tokens * group
  q_rows = jnp.transpose(grouped, (0, 2, 1, 3, 4)).reshape(
      batch * num_kv_heads, num_q_rows, head_dim)
  q_rows_padded = block_sizes_lib.round_up(num_q_rows, block_sizes.block_m)
  q_rows = jnp.pad(q_rows, ((0, 0), (0, q_rows_padded - num_q_rows), (0, 0)))
  q_rows = q_rows.astype(keys.dtype)

  max_rows = block_sizes_lib.round_up(selection.max_rows,
                                      block_sizes.block_rows)
  split_rows = min(block_sizes.split_rows or max_rows, max_rows)
  max_rows = block_sizes_lib.round_up(max_rows, split_rows)
  rows = jnp.pad(selection.rows, ((0, 0), (0, 0),
                                  (0, max_rows - selection.max_rows)))
  rows = rows.reshape(batch * num_kv_heads, max_rows)
  num_rows = selection.num_rows.reshape(batch * num_kv_heads)
  num_splits = max_rows // split_rows
  grid = (batch * num_kv_heads, q_rows_padded // block_sizes.block_m,
          num_splits)
  window = 0 if window_keys is None else window_keys.shape[1]
  window_inputs = [] if window == 0 else [window_keys.astype(keys.dtype),
                                          window_values.astype(keys.dtype)]
  # Decode (split-K): the window in the reduce of the splits; prefill: in here.
  split_k = block_sizes.split_rows is not None
  if own is not None and not (split_k and decode):
    raise ValueError("own rows need decode queries and split-K tiles "
                     f"(block_sizes.split_rows set): {block_sizes=}")
  kernel_window_inputs = [] if split_k else window_inputs
  # The reduce reads a power-of-two split axis; splits past num_splits unwritten.
  num_parts = block_sizes_lib.next_power_of_two(num_splits) if split_k else 1

  kernel = functools.partial(
      _sparse_attention_kernel, sm_scale=scale,
      block_rows=block_sizes.block_rows, split_rows=split_rows,
      num_q_rows=num_q_rows, window=window if kernel_window_inputs else 0)
  head_spec = lambda rows: pl.BlockSpec(
      (None, rows, head_dim), lambda bh, i, s: (bh % num_kv_heads, 0, 0))
  out, lse = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[
          pl.BlockSpec((None,), lambda bh, i, s: (bh,)),
          pl.BlockSpec((None, max_rows), lambda bh, i, s: (bh, 0)),
          pl.BlockSpec((None, block_sizes.block_m, head_dim),
                       lambda bh, i, s: (bh, i, 0)),
          head_spec(num_keys),
          head_spec(num_keys),
      ] + [head_spec(window)] * len(kernel_window_inputs),
      out_specs=[
          pl.BlockSpec((None, None, block_sizes.block_m, head_dim),
                       lambda bh, i, s: (s, bh, i, 0)),
          pl.BlockSpec((None, None, block_sizes.block_m),
                       lambda bh, i, s: (s, bh, i)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct(
              (num_parts, batch * num_kv_heads, q_rows_padded, head_dim),
              jnp.float32),
          jax.ShapeDtypeStruct(
              (num_parts, batch * num_kv_heads, q_rows_padded), jnp.float32),
      ],
      compiler_params=plgpu.CompilerParams(
          num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
      interpret=interpret,
      name="squeezed_sparse_attention",
  )(num_rows, rows, q_rows, keys, values, *kernel_window_inputs)
  if split_k:
    out, lse, _ = decode_reduce.reduce_partials(
        q_rows, out, lse, num_splits, num_q_rows=num_q_rows,
        num_kv_heads=num_kv_heads,
        window_keys=window_inputs[0] if window_inputs else None,
        window_values=window_inputs[1] if window_inputs else None,
        own=own, rows_per_sequence=own_rows_per_sequence or num_q_rows,
        sm_scale=scale, block_rows=block_sizes.block_rows, out_dtype=q.dtype,
        interpret=interpret)
  else:
    out, lse = out[0, :, :num_q_rows], lse[0, :, :num_q_rows]
  out = out.reshape(batch, num_kv_heads, tokens, group, head_dim)
  lse = lse.reshape(batch, num_kv_heads, tokens, group)
  return queries.ungroup(jnp.swapaxes(out, 2, 3), jnp.swapaxes(lse, 2, 3),
                         decode, q.dtype)
