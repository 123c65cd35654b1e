"""The split-K reduce with the observation window (gpu/decode_reduce.py) vs
`merge.merge_stacked` of the written partials and the reference window
attention, in interpret mode.

Tolerances: lse to 1e-4; outputs to 1e-5 with float32 window K/V, 1e-2 with
bf16 (q and the softmax weights rounded to bf16 for the products).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import merge
from pallas_kernels import own_rows
from pallas_kernels import references
from pallas_kernels.gpu import decode_reduce

NUM_KV_HEADS, WINDOW = 2, 37


def _partials(batch, group, head_dim, num_parts, padded_parts, empty):
  """Random partials of B x Hkv pairs; parts past num_parts hold NaN."""
  keys = jax.random.split(jax.random.key(num_parts + group), 4)
  shape = (padded_parts, batch * NUM_KV_HEADS, 16)
  out = jax.random.normal(keys[0], shape + (head_dim,))
  lse = 3.0 * jax.random.normal(keys[1], shape)
  lse = jnp.where(jax.random.bernoulli(keys[2], empty, shape), -jnp.inf, lse)
  written = (jnp.arange(padded_parts) < num_parts)[:, None, None]
  rows = jax.random.randint(keys[3], shape[:2], 0, 1000)
  return (jnp.where(written[..., None], out, jnp.nan),
          jnp.where(written, lse, jnp.nan),
          jnp.where(written[..., 0], rows, 10 ** 6))


def _pairs(x, batch, group):
  """[B, Hq, ...] -> [B x Hkv, G, ...]."""
  return x.reshape(batch * NUM_KV_HEADS, group, *x.shape[2:])


@pytest.mark.parametrize(
    "batch,group,head_dim,num_parts,padded_parts,window,dtype",
    [
        (2, 4, 64, 5, 8, True, jnp.bfloat16),
        (1, 1, 128, 8, 8, True, jnp.float32),
        (3, 2, 64, 3, 4, False, jnp.float32),
        (1, 2, 64, 100, 128, True, jnp.float32),  # two merge steps
    ])
def test_equals_merge_of_partials_and_window(batch, group, head_dim, num_parts,
                                             padded_parts, window, dtype):
  parts_out, parts_lse, parts_rows = _partials(batch, group, head_dim,
                                               num_parts, padded_parts, 0.3)
  q = jax.random.normal(jax.random.key(7),
                        (batch, NUM_KV_HEADS * group, head_dim), dtype)
  window_kv = tuple(jax.random.normal(
      jax.random.key(8), (2, NUM_KV_HEADS, WINDOW, head_dim), dtype))
  out, lse, rows = decode_reduce.reduce_partials(
      _pairs(q, batch, group), parts_out, parts_lse, num_parts,
      num_q_rows=group, num_kv_heads=NUM_KV_HEADS, parts_rows=parts_rows,
      window_keys=window_kv[0] if window else None,
      window_values=window_kv[1] if window else None,
      sm_scale=head_dim ** -0.5, block_rows=16, out_dtype=dtype,
      interpret=True)

  outs = [parts_out[:num_parts, :, :group]]
  lses = [parts_lse[:num_parts, :, :group]]
  if window:
    window_out, window_lse = references.attention(q, *window_kv)
    outs.append(_pairs(window_out.astype(jnp.float32), batch, group)[None])
    lses.append(_pairs(window_lse, batch, group)[None])
  want_out, want_lse = merge.merge_stacked(jnp.concatenate(outs),
                                           jnp.concatenate(lses), axis=0)
  assert out.shape == (batch * NUM_KV_HEADS, group, head_dim)
  assert out.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(out, np.float32), want_out, rtol=tol,
                             atol=tol)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(rows, parts_rows[:num_parts].sum(axis=0))


@pytest.mark.parametrize(
    "batch,group,folded,window,dtype",
    [
        (2, 4, False, True, jnp.float32),
        (3, 1, False, False, jnp.bfloat16),
        (3, 2, True, True, jnp.float32),  # the batch folded into the rows
    ])
def test_own_rows_merge_with_the_partials_and_window(batch, group, folded,
                                                     window, dtype):
  """Each row also attends its sequence's first lengths[b] own rows (0 and
  all T of them included)."""
  head_dim, own_len, num_parts = 64, 45, 3
  keys = jax.random.split(jax.random.key(batch + group), 6)
  q = jax.random.normal(keys[0], (batch, NUM_KV_HEADS * group, head_dim),
                        dtype)
  window_kv = tuple(jax.random.normal(
      keys[1], (2, NUM_KV_HEADS, WINDOW, head_dim), dtype))
  own = own_rows.OwnRows(
      *jax.random.normal(keys[2], (2, batch, own_len, NUM_KV_HEADS, head_dim),
                         dtype),
      jnp.array([own_len, 0, 17][:batch], jnp.int32))
  if folded:  # pair h holds rows r = b * G + g
    to_pairs = lambda x: jnp.swapaxes(x.reshape(
        batch, NUM_KV_HEADS, group, *x.shape[2:]), 0, 1).reshape(
            NUM_KV_HEADS, batch * group, *x.shape[2:])
  else:
    to_pairs = lambda x: _pairs(x, batch, group)
  pairs_q = to_pairs(q)
  num_pairs, num_rows = pairs_q.shape[:2]
  parts_out = jax.random.normal(keys[3], (4, num_pairs, 16, head_dim))
  parts_lse = 2.0 * jax.random.normal(keys[4], (4, num_pairs, 16))
  out, lse, _ = decode_reduce.reduce_partials(
      pairs_q, parts_out, parts_lse, num_parts, num_q_rows=num_rows,
      num_kv_heads=NUM_KV_HEADS,
      window_keys=window_kv[0] if window else None,
      window_values=window_kv[1] if window else None, own=own,
      rows_per_sequence=group, sm_scale=head_dim ** -0.5, block_rows=16,
      out_dtype=jnp.float32, interpret=True)

  f32 = lambda x: x.astype(jnp.float32)
  own_out, own_lse = references.own_rows_attention(f32(q), *map(f32, own[:2]),
                                                   own.lengths)
  outs = [parts_out[:num_parts, :, :num_rows], to_pairs(own_out)[None]]
  lses = [parts_lse[:num_parts, :, :num_rows], to_pairs(own_lse)[None]]
  if window:
    window_out, window_lse = references.attention(f32(q),
                                                  *map(f32, window_kv))
    outs.append(to_pairs(window_out)[None])
    lses.append(to_pairs(window_lse)[None])
  want_out, want_lse = merge.merge_stacked(jnp.concatenate(outs),
                                           jnp.concatenate(lses), axis=0)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(out, want_out, rtol=tol, atol=tol)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-4)


def test_nothing_attended_gives_zero_output_and_minus_infinite_lse():
  parts_out, parts_lse, _ = _partials(1, 2, 64, 3, 4, 1.0)
  assert np.isneginf(np.asarray(parts_lse[:3])).all()
  out, lse, rows = decode_reduce.reduce_partials(
      jnp.ones((NUM_KV_HEADS, 2, 64)), parts_out, parts_lse, 3, num_q_rows=2,
      num_kv_heads=NUM_KV_HEADS, sm_scale=0.125, block_rows=16,
      out_dtype=jnp.float32, interpret=True)
  assert rows is None
  np.testing.assert_array_equal(out, 0.0)
  assert np.isneginf(np.asarray(lse)).all()


def test_split_axis_must_be_a_power_of_two():
  parts_out, parts_lse, _ = _partials(1, 1, 64, 3, 3, 0.0)
  with pytest.raises(ValueError, match="must be a power of two"):
    decode_reduce.reduce_partials(
        jnp.ones((NUM_KV_HEADS, 1, 64)), parts_out, parts_lse, 3,
        num_q_rows=1, num_kv_heads=NUM_KV_HEADS, sm_scale=0.125,
        block_rows=16, out_dtype=jnp.float32, interpret=True)
