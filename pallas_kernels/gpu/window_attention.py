"""Attention partials over the observation window, Pallas GPU (decode).

The window (W contiguous rows per KV head, attended by every query) gets a
kernel of its own: compiled into the sparse kernels as extra programs it cost
them occupancy (a second pipelined loop's buffers) and slowed decode by up to
50% (benchmarks/RESULTS.md, 2026-11-22). One program per (query tile, window
split of `window_rows` rows); the partials merge with the sparse ones by
`merge.merge_stacked`.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels.gpu import flash_blocks


def _window_kernel(q_ref, k_ref, v_ref, out_ref, lse_ref, *, sm_scale: float,
                   tiles_per_head: int, num_q_rows: int, block_rows: int,
                   window_rows: int):
  """One (query tile, window split) program.

  Refs: q_ref [block_m, D]; k_ref, v_ref [W, D]; out_ref [block_m, D] f32;
  lse_ref [block_m] f32. Tile n holds rows (n % tiles_per_head) * block_m
  onwards of its (sequence, KV head); rows >= num_q_rows are padding.
  """
  block_m = q_ref.shape[0]
  first_row = (pl.program_id(0) % tiles_per_head) * block_m
  real = first_row + jnp.arange(block_m) < num_q_rows
  q = q_ref[...].astype(k_ref.dtype)
  first = pl.program_id(1) * window_rows
  carry = flash_blocks.attend_contiguous(
      q, k_ref, v_ref, first, jnp.minimum(first + window_rows, k_ref.shape[0]),
      block_rows, flash_blocks.empty_carry(block_m, q_ref.shape[1]), sm_scale)
  flash_blocks.store_partial(out_ref, lse_ref, carry, real)


def window_partials(q_tiles: jax.Array, window_keys: jax.Array,
                    window_values: jax.Array, *, tiles_per_head: int,
                    num_q_rows: int, sm_scale: float, block_rows: int,
                    window_rows: int, num_warps: int = 4,
                    num_stages: int = 2,
                    interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """Partials of every query tile over the whole window.

  Args:
    q_tiles: [N, block_m, D] query tiles; tiles n of (sequence, KV head)
      n // tiles_per_head, that KV head being (n // tiles_per_head) % Hkv.
    window_keys, window_values: [Hkv, W, D].
    tiles_per_head: consecutive tiles per (sequence, KV head).
    num_q_rows: real query rows per (sequence, KV head).
    sm_scale: softmax scale.
    block_rows: window rows per inner step.
    window_rows: window rows per program.
    num_warps, num_stages: compiler parameters.
    interpret: run in the Pallas interpreter.

  Returns:
    (out [P, N, block_m, D] f32, lse [P, N, block_m] f32), P window splits;
    padding rows unwritten.
  """
  num_tiles, block_m, head_dim = q_tiles.shape
  num_kv_heads, window, _ = window_keys.shape
  num_splits = pl.cdiv(window, window_rows)
  kv_spec = pl.BlockSpec(
      (None, window, head_dim),
      lambda n, p: ((n // tiles_per_head) % num_kv_heads, 0, 0))
  kernel = functools.partial(_window_kernel, sm_scale=sm_scale,
                             tiles_per_head=tiles_per_head,
                             num_q_rows=num_q_rows, block_rows=block_rows,
                             window_rows=window_rows)
  return pl.pallas_call(
      kernel,
      grid=(num_tiles, num_splits),
      in_specs=[pl.BlockSpec((None, block_m, head_dim),
                             lambda n, p: (n, 0, 0)), kv_spec, kv_spec],
      out_specs=[
          pl.BlockSpec((None, None, block_m, head_dim),
                       lambda n, p: (p, n, 0, 0)),
          pl.BlockSpec((None, None, block_m), lambda n, p: (p, n, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((num_splits, num_tiles, block_m, head_dim),
                               jnp.float32),
          jax.ShapeDtypeStruct((num_splits, num_tiles, block_m), jnp.float32),
      ],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=num_stages),
      interpret=interpret,
      name="squeezed_window_attention",
  )(q_tiles, window_keys, window_values)
