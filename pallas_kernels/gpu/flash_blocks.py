"""Building blocks of the Pallas GPU kernels: log-sum-exps (online and of
split parts) and online-softmax attention over blocks of K/V rows, gathered
(the rows of a row list) or contiguous (observation window).

A partial is the running state (out [block_m, D] f32 unnormalised, top
[block_m] running max, total [block_m] running denominator) of one program;
`store_partial` writes it as (out normalised, lse), the form that
`merge.merge_stacked` combines exactly.
"""

from __future__ import annotations

from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

Carry = tuple  # (out [block_m, D] f32, top [block_m] f32, total [block_m] f32)


def masked_logsumexp(parts: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
  """Log-sum-exp over axis 0 of [P, M] parts, entries where ~valid ignored.

  Returns [M]; -inf for a column without a finite entry.
  """
  parts = jnp.where(valid, parts, -jnp.inf)
  top = parts.max(axis=0)
  safe_top = jnp.where(top > -jnp.inf, top, 0.0)
  return safe_top + jnp.log(jnp.exp(parts - safe_top[None, :]).sum(axis=0))


def empty_logsumexp(num_rows: int) -> tuple:
  """The (top, total) state of `online_logsumexp` over no terms."""
  return (jnp.full((num_rows,), -jnp.inf, jnp.float32),
          jnp.zeros((num_rows,), jnp.float32))


def online_logsumexp(carry: tuple, terms: jnp.ndarray) -> tuple:
  """Online log-sum-exp over axis 1 of [M, N] terms (-inf terms add 0).

  carry = (top [M] running max, total [M] sum of exp(term - top)); the
  log-sum-exp so far is top + log(total).
  """
  top, total = carry
  new_top = jnp.maximum(top, terms.max(axis=1))
  safe_top = jnp.where(new_top > -jnp.inf, new_top, 0.0)
  total = total * jnp.exp(top - safe_top) + jnp.exp(
      terms - safe_top[:, None]).sum(axis=1)
  return new_top, total


def empty_carry(block_m: int, head_dim: int) -> Carry:
  """The state of a softmax over no rows."""
  return (jnp.zeros((block_m, head_dim), jnp.float32),
          *empty_logsumexp(block_m))


def gather_rows(ref, rows: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
  """ref[rows] for a [N, D] ref and [R] row indices; invalid rows read 0."""
  columns = jnp.arange(ref.shape[-1])[None, :]
  return plgpu.load(ref.at[rows[:, None], columns], mask=valid[:, None],
                    other=0.0)


def online_update(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                  valid: jnp.ndarray, carry: Carry, sm_scale: float) -> Carry:
  """One online-softmax step over a block of K/V rows (invalid rows skipped).

  q [block_m, D]; k, v [block_rows, D]; valid [block_rows] bool.
  """
  out, top, total = carry
  logits = plgpu.dot(q, k, trans_b=True) * sm_scale
  logits = jnp.where(valid[None, :], logits, -jnp.inf)
  new_top = jnp.maximum(top, logits.max(axis=1))
  probs = jnp.exp(logits - new_top[:, None])
  rescale = jnp.exp(top - new_top)
  out = out * rescale[:, None] + plgpu.dot(probs.astype(v.dtype), v)
  return out, new_top, total * rescale + probs.sum(axis=1)


def attend_listed(q: jnp.ndarray, list_ref, k_ref, v_ref, start: jnp.ndarray,
                  stop: jnp.ndarray, block_rows: int, carry: Carry,
                  sm_scale: float, piece_rows: int = 1) -> Carry:
  """Online softmax over the K/V rows listed in list_ref[start:stop].

  q [block_m, D]; k_ref, v_ref [N, D]; start, stop: int32 scalars (stop <=
  len(list_ref)). An entry of the int32 list is a row index (piece_rows ==
  1) or a piece of n <= piece_rows consecutive rows first .. first + n - 1,
  packed as first * piece_rows + n - 1 (a power-of-two piece_rows dividing
  block_rows; the slots of a piece past its n rows are masked).
  """
  entries_per_block = block_rows // piece_rows
  slots = jnp.arange(block_rows)

  def body(block, carry):
    first = start + block * entries_per_block
    if piece_rows == 1:
      valid = first + slots < stop
      rows = plgpu.load(list_ref.at[pl.ds(first, block_rows)], mask=valid,
                        other=0)
    else:
      entries = first + slots // piece_rows
      listed = entries < stop
      packed = plgpu.load(list_ref.at[entries], mask=listed, other=0)
      rank = slots % piece_rows
      rows = packed // piece_rows + rank
      valid = listed & (rank <= packed % piece_rows)
    k = gather_rows(k_ref, rows, valid)
    v = gather_rows(v_ref, rows, valid)
    return online_update(q, k, v, valid, carry, sm_scale)

  num_blocks = pl.cdiv(jnp.maximum(stop - start, 0), entries_per_block)
  return lax.fori_loop(0, num_blocks, body, carry)


def attend_contiguous(q: jnp.ndarray, k_ref, v_ref, first: jnp.ndarray,
                      stop: jnp.ndarray, block_rows: int, carry: Carry,
                      sm_scale: float) -> Carry:
  """Online softmax over rows first:stop of [N, D] refs (the window).

  q [block_m, D]; first, stop: int32 scalars (stop <= N).
  """

  def body(block, carry):
    start = first + block * block_rows
    valid = start + jnp.arange(block_rows) < stop
    rows = pl.ds(start, block_rows)
    k = plgpu.load(k_ref.at[rows], mask=valid[:, None], other=0.0)
    v = plgpu.load(v_ref.at[rows], mask=valid[:, None], other=0.0)
    return online_update(q, k, v, valid, carry, sm_scale)

  num_blocks = pl.cdiv(jnp.maximum(stop - first, 0), block_rows)
  return lax.fori_loop(0, num_blocks, body, carry)


def store_partial(out_ref, lse_ref, carry: Carry, real: jnp.ndarray) -> None:
  """Writes (out / total, lse) for the real query rows ([block_m] bool).

  An empty partial stores out = 0 and lse = -inf.
  """
  out, top, total = carry
  plgpu.store(out_ref, out / jnp.where(total > 0, total, 1.0)[:, None],
              mask=real[:, None])
  plgpu.store(lse_ref, top + jnp.log(total), mask=real)
