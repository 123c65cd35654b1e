"""The split-K reduce of decode attention, with the observation window, Pallas GPU.

The split-K decode kernels leave one attention partial per (sequence x KV
head, split): a cluster chunk of the fused decode (`decode_attention.py`), a
share of the row list (`sparse_attention.py`). Here one program per
(sequence x KV head, query row) finishes the step for that row:
  * attends the row to the W observation-window rows and, given them, to its
    sequence's own rows (`own_rows.OwnRows`: the first lengths[b] rows of
    the question + generated tokens; contiguous both, a query tile whose
    first row is the real one, as the tensor cores want >= 16);
  * merges that partial with the splits' partials by log-sum-exp (the
    formula of `merge.merge_stacked`, `_PARTS_PER_STEP` partials a step);
  * writes the output in its final dtype, the lse, and (fused decode) the
    rows the chunks read.
One kernel, where the window kernel and XLA's concatenation and merge of the
partials took six (16 us per layer at S = 128K, batch 1:
benchmarks/RESULTS.md), and XLA's attention over the own rows and its merge
about ten more.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels import own_rows
from pallas_kernels.gpu import flash_blocks

# Query-tile rows of the window's products: the one real row comes first.
_Q_TILE = 16
# Partials merged per step ([P, D] float32 in registers: 32 KB at D = 128).
_PARTS_PER_STEP = 64


def _merge_parts(carry: tuple, outs: jnp.ndarray,
                 lses: jnp.ndarray) -> tuple:
  """Adds [P, D] normalised partials with [P] lses to a softmax state.

  carry = (acc [D] sum of exp(logit - top) v, top, total sum of
  exp(logit - top)), the state `flash_blocks.online_update` keeps per row.
  """
  acc, top, total = carry
  new_top = jnp.maximum(top, lses.max())
  safe_top = jnp.where(new_top > -jnp.inf, new_top, 0.0)
  rescale = jnp.exp(top - safe_top)
  weights = jnp.exp(lses - safe_top)
  return (acc * rescale + (weights[:, None] * outs).sum(axis=0), new_top,
          total * rescale + weights.sum())


def _reduce_kernel(q_ref, parts_out_ref, parts_lse_ref, *refs, sm_scale: float,
                   num_parts: int, parts_per_step: int, block_rows: int,
                   num_row_parts: int, has_rows: bool, has_window: bool,
                   has_own: bool, num_kv_heads: int, q_rows_per_pair: int):
  """One (pair n, query row r) program.

  Refs: q_ref [Rp, D] query rows: the pair's (q_rows_per_pair = 0), or its
  KV head's, of which pair n's start at (n // num_kv_heads) x
  q_rows_per_pair;
  parts_out_ref [Pp, D], parts_lse_ref [Pp] (row r of each partial, the
  first num_parts written); if has_rows, parts_rows_ref [Pp] (the first
  num_row_parts written); if has_window,
  window keys and values [W, D]; if has_own, the row's sequence's own-row
  count [] and own keys and values [T, D]; then out_ref [D], lse_ref [] and,
  if has_rows, rows_ref [].
  """
  refs = list(refs)
  parts_rows_ref = refs.pop(0) if has_rows else None
  contiguous = []  # (keys, values, rows attended) read whole by every row
  if has_window:
    window_k_ref = refs.pop(0)
    contiguous.append((window_k_ref, refs.pop(0), window_k_ref.shape[0]))
  if has_own:
    own_length_ref, own_k_ref, own_v_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    contiguous.append((own_k_ref, own_v_ref, own_length_ref[()]))
  out_ref, lse_ref, *rows_ref = refs
  head_dim = out_ref.shape[0]
  state = (jnp.zeros((head_dim,), jnp.float32), jnp.float32(-jnp.inf),
           jnp.float32(0.0))
  if contiguous:
    first = jnp.arange(_Q_TILE) == 0
    row = ((pl.program_id(0) // num_kv_heads) * q_rows_per_pair
           + pl.program_id(1))
    q = plgpu.load(q_ref.at[pl.ds(row, _Q_TILE)], mask=first[:, None],
                   other=0.0)
    carry = flash_blocks.empty_carry(_Q_TILE, head_dim)
    for k_ref, v_ref, stop in contiguous:
      carry = flash_blocks.attend_contiguous(
          q.astype(k_ref.dtype), k_ref, v_ref, 0, stop, block_rows, carry,
          sm_scale)
    acc, top, total = carry
    state = (jnp.where(first[:, None], acc, 0.0).sum(axis=0),
             jnp.where(first, top, -jnp.inf).max(),
             jnp.where(first, total, 0.0).sum())

  def step(index, carry):
    state, rows = carry
    ids = index * parts_per_step + jnp.arange(parts_per_step)
    written = ids < num_parts
    window = pl.ds(index * parts_per_step, parts_per_step)
    outs = plgpu.load(parts_out_ref.at[window], mask=written[:, None],
                      other=0.0)
    lses = plgpu.load(parts_lse_ref.at[window], mask=written, other=-jnp.inf)
    if has_rows:
      rows += plgpu.load(parts_rows_ref.at[window],
                         mask=ids < num_row_parts, other=0).sum()
    return _merge_parts(state, outs, lses), rows

  num_steps = parts_lse_ref.shape[0] // parts_per_step
  (acc, top, total), rows = lax.fori_loop(0, num_steps, step,
                                          (state, jnp.int32(0)))
  safe_top = jnp.where(top > -jnp.inf, top, 0.0)
  out_ref[...] = (acc / jnp.where(total > 0, total, 1.0)).astype(
      out_ref.dtype)
  lse_ref[...] = safe_top + jnp.log(total)
  if has_rows:
    rows_ref[0][...] = rows


def reduce_partials(
    q_rows: jax.Array, parts_out: jax.Array, parts_lse: jax.Array,
    num_parts: int, *, num_q_rows: int, num_kv_heads: int,
    parts_rows: jax.Array | None = None, num_row_parts: int | None = None,
    window_keys: jax.Array | None = None,
    window_values: jax.Array | None = None,
    own: own_rows.OwnRows | None = None, rows_per_sequence: int = 1,
    q_rows_of_kv_heads: bool = False,
    sm_scale: float, block_rows: int, out_dtype: jnp.dtype,
    interpret: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """Window (and own-row) attention + the log-sum-exp merge of every split
  partial.

  N = P x Hkv pairs (n = p * Hkv + h), R = num_q_rows query rows each. A pair
  holds one sequence's rows (p = b, R = G) or, when a decode batch is folded
  into the query heads so that the context is read once, every sequence's (P
  = 1, r = b * G + g): row r of pair n belongs to sequence
  n // Hkv + r // rows_per_sequence.

  Args:
    q_rows: [N, Rp >= R, D] query rows of each pair (only read with a
      window or own rows); or, with q_rows_of_kv_heads, [Hkv, Mp, D] the rows
      of each KV head, rows p x R .. p x R + R - 1 of KV head h being those
      of pair n = p x Hkv + h (the decode lookup's layout: no copy).
    parts_out: [Pp, N, Rq >= R, D] float32 split partials (normalised), the
      first num_parts written along the first axis.
    parts_lse: [Pp, N, Rq] float32 (-inf: the split attended nothing).
    num_parts: written partials.
    num_q_rows: R.
    num_kv_heads: Hkv (the window of pair n is KV head n % Hkv).
    parts_rows: [Pp, N] int32 rows each split read, or None.
    num_row_parts: the first splits whose parts_rows are written (None:
      num_parts; the fused decode's own-row splits come after its chunks).
    window_keys, window_values: [Hkv, W, D] (one dtype) or None.
    own: each sequence's own rows (keys, values [B, T, Hkv, D]; lengths
      [B]), or None.
    rows_per_sequence: consecutive query rows of a pair with one sequence
      (G; only read with `own`).
    sm_scale: softmax scale.
    block_rows: window rows per inner step.
    out_dtype: dtype of the output.
    interpret: run in the Pallas interpreter.

  Returns:
    out [N, R, D] in out_dtype, lse [N, R] float32 (-inf: nothing
    attended), rows read [N] int32 (None without parts_rows).
  """
  num_padded_parts, num_pairs = parts_lse.shape[:2]
  head_dim = parts_out.shape[-1]
  if num_padded_parts & (num_padded_parts - 1):
    raise ValueError(f"{parts_lse.shape[0]=} must be a power of two")
  has_rows, has_window = parts_rows is not None, window_keys is not None
  has_own = own is not None
  window_spec = lambda shape: pl.BlockSpec(
      (None, *shape), lambda n, r: (n % num_kv_heads, 0, 0))
  q_rows_of = ((lambda n, r: (n % num_kv_heads, 0, 0)) if q_rows_of_kv_heads
               else (lambda n, r: (n, 0, 0)))
  in_specs = [
      pl.BlockSpec((None, *q_rows.shape[1:]), q_rows_of),
      pl.BlockSpec((num_padded_parts, None, None, head_dim),
                   lambda n, r: (0, n, r, 0)),
      pl.BlockSpec((num_padded_parts, None, None), lambda n, r: (0, n, r)),
  ]
  inputs = [q_rows, parts_out, parts_lse]
  if has_rows:
    in_specs.append(pl.BlockSpec((num_padded_parts, None),
                                 lambda n, r: (0, n)))
    inputs.append(parts_rows)
  if has_window:
    in_specs += [window_spec(window_keys.shape[1:])] * 2
    inputs += [window_keys, window_values]
  if has_own:
    sequence = lambda n, r: n // num_kv_heads + r // rows_per_sequence
    own_spec = pl.BlockSpec(
        (None, own.keys.shape[1], None, head_dim),
        lambda n, r: (sequence(n, r), 0, n % num_kv_heads, 0))
    in_specs += [pl.BlockSpec((None,), lambda n, r: (sequence(n, r),)),
                 own_spec, own_spec]
    inputs += [own.lengths.astype(jnp.int32), own.keys, own.values]
  out_specs = [pl.BlockSpec((None, None, head_dim), lambda n, r: (n, r, 0)),
               pl.BlockSpec((None, None), lambda n, r: (n, r))]
  out_shape = [
      jax.ShapeDtypeStruct((num_pairs, num_q_rows, head_dim), out_dtype),
      jax.ShapeDtypeStruct((num_pairs, num_q_rows), jnp.float32)]
  if has_rows:  # every row of a pair writes the pair's total
    out_specs.append(pl.BlockSpec((None, None), lambda n, r: (n, r)))
    out_shape.append(jax.ShapeDtypeStruct((num_pairs, num_q_rows),
                                          jnp.int32))
  kernel = functools.partial(
      _reduce_kernel, sm_scale=sm_scale, num_parts=num_parts,
      num_row_parts=num_parts if num_row_parts is None else num_row_parts,
      parts_per_step=min(num_padded_parts, _PARTS_PER_STEP),
      block_rows=block_rows, has_rows=has_rows, has_window=has_window,
      has_own=has_own, num_kv_heads=num_kv_heads,
      q_rows_per_pair=num_q_rows if q_rows_of_kv_heads else 0)
  out, lse, *rows = pl.pallas_call(
      kernel,
      grid=(num_pairs, num_q_rows),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name="squeezed_decode_reduce",
  )(*inputs)
  return out, lse, rows[0][:, 0] if has_rows else None
