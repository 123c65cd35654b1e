"""Decode attention with each sequence's own rows (`pallas_kernels.OwnRows`):
the fused GPU decode (interpret mode) and the XLA path vs the float32
references of the context part and of the own rows, merged by log-sum-exp.

Tolerances: lse to 1e-4; outputs to 1e-5 with float32 inputs, 2e-2 with bf16
(the kernels round q and the softmax weights to bf16 for the products).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import block_sizes
from pallas_kernels import merge
from pallas_kernels import references
from pallas_kernels import selection
from pallas_kernels import synthetic

NUM_KV_HEADS, NUM_KEYS, NUM_CLUSTERS, WINDOW, OWN_LEN = 2, 300, 23, 37, 45
# Small tiles: several chunks, window and own-row steps of 16 rows, own rows
# in three splits (of 16, 16 and 13 rows) after the chunks.
TILES = block_sizes.DecodeBlockSizes(
    block_clusters=8, block_rows=16, reduce_rows=16, own_split_rows=16,
    lookup=block_sizes.LookupBlockSizes(block_k=16, single_pass_max_rows=16))


def _inputs(batch, group, dtype):
  keys = jax.random.split(jax.random.key(batch * 10 + group), 4)
  ctx = synthetic.clustered_context(
      keys[0], num_kv_heads=NUM_KV_HEADS, num_keys=NUM_KEYS,
      num_clusters=NUM_CLUSTERS, head_dim=64, dtype=dtype)
  q = jax.random.normal(keys[1], (batch, NUM_KV_HEADS * group, 64), dtype)
  window = tuple(jax.random.normal(keys[2], (2, NUM_KV_HEADS, WINDOW, 64),
                                   dtype))
  own = pallas_kernels.OwnRows(
      *jax.random.normal(keys[3], (2, batch, OWN_LEN, NUM_KV_HEADS, 64),
                         dtype),
      jnp.array([OWN_LEN, 1, 0, 17, 30][:batch], jnp.int32))  # all, one, none, some
  return ctx, q, window, own


def _with_own(q, own, out, lse):
  """The reference merge of a context result with the own rows' attention."""
  f32 = lambda x: x.astype(jnp.float32)
  own_out, own_lse = references.own_rows_attention(f32(q), f32(own.keys),
                                                   f32(own.values),
                                                   own.lengths)
  return merge.merge_partials(f32(out), lse, own_out, own_lse)


def _assert_close(got, want, dtype):
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(got[0], np.float32), want[0],
                             rtol=tol, atol=tol)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["gpu", "xla"])
@pytest.mark.parametrize("batch,group,dtype,with_window",
                         [(3, 4, jnp.bfloat16, True),
                          (2, 1, jnp.float32, True),
                          (2, 1, jnp.float32, False)])
def test_squeezed_decode_merges_the_own_rows(backend, batch, group, dtype,
                                             with_window):
  ctx, q, window, own = _inputs(batch, group, dtype)
  if not with_window:
    window = (None, None)
  f32 = lambda x: x.astype(jnp.float32)
  scores = references.centroid_scores(q, ctx.centroids, ctx.counts)
  tau = float(jnp.quantile(scores, 0.6))
  out, lse, kept = pallas_kernels.squeezed_decode_attention(
      q, ctx.keys, ctx.values, ctx.centroids, ctx.counts, ctx.offsets,
      threshold=tau, window_keys=window[0], window_values=window[1], own=own,
      backend=backend, block_sizes=TILES, interpret=True)
  want = selection.select_clusters(scores, ctx.counts, ctx.offsets,
                                   max_rows=NUM_KEYS, threshold=tau)
  np.testing.assert_array_equal(kept.clusters, want.clusters)
  np.testing.assert_array_equal(kept.num_rows, want.num_rows)  # context only
  context = references.attention_with_window(
      f32(q), f32(ctx.keys), f32(ctx.values),
      selection.key_mask(want, NUM_KEYS), *window)
  assert out.shape == q.shape and out.dtype == q.dtype
  _assert_close((out, lse), _with_own(q, own, *context), dtype)


@pytest.mark.parametrize("backend,tiles", [
    ("gpu", None), ("xla", None),
    # Several row-list splits of 16 rows and, at batch 5 and group 4, two
    # query tiles that each hold rows of several sequences.
    ("gpu", block_sizes.AttentionBlockSizes(block_m=16, block_rows=16,
                                            split_rows=16))])
@pytest.mark.parametrize("batch,group,dtype", [(3, 2, jnp.float32),
                                               (2, 4, jnp.bfloat16),
                                               (5, 4, jnp.float32)])
def test_shared_selection_reads_every_row_for_each_sequence(
    backend, tiles, batch, group, dtype):
  """Dense decode: every row selected once for the batch, each sequence
  still attending its own rows."""
  ctx, q, window, own = _inputs(batch, group, dtype)
  f32 = lambda x: x.astype(jnp.float32)
  every_row = selection.Selection(
      rows=jnp.broadcast_to(jnp.arange(NUM_KEYS, dtype=jnp.int32),
                            (1, NUM_KV_HEADS, NUM_KEYS)),
      num_rows=jnp.full((1, NUM_KV_HEADS), NUM_KEYS, jnp.int32),
      clusters=jnp.ones((1, NUM_KV_HEADS, NUM_CLUSTERS), bool))
  got = pallas_kernels.shared_selection_attention(
      q, ctx.keys, ctx.values, every_row, window_keys=window[0],
      window_values=window[1], own=own, backend=backend, block_sizes=tiles,
      interpret=True)
  context = references.attention(
      f32(q), jnp.concatenate([f32(ctx.keys), f32(window[0])], axis=1),
      jnp.concatenate([f32(ctx.values), f32(window[1])], axis=1))
  assert got[0].shape == q.shape and got[0].dtype == q.dtype
  _assert_close(got, _with_own(q, own, *context), dtype)


def test_bad_own_rows_are_refused():
  ctx, q, window, own = _inputs(2, 1, jnp.float32)
  every_row = selection.Selection(
      rows=jnp.zeros((2, NUM_KV_HEADS, 4), jnp.int32),
      num_rows=jnp.zeros((2, NUM_KV_HEADS), jnp.int32),
      clusters=jnp.zeros((2, NUM_KV_HEADS, NUM_CLUSTERS), bool))
  with pytest.raises(ValueError, match="must have batch 1"):
    pallas_kernels.shared_selection_attention(q, ctx.keys, ctx.values,
                                              every_row, backend="xla")
  wrong_heads = own._replace(keys=own.keys[:, :, :1], values=own.values[:, :, :1])
  with pytest.raises(ValueError, match=r"must be \[B=2, T, Hkv=2, D=64\]"):
    pallas_kernels.squeezed_decode_attention(
        q, ctx.keys, ctx.values, ctx.centroids, ctx.counts, ctx.offsets,
        threshold=0.1, own=wrong_heads, backend="xla")
  with pytest.raises(ValueError, match=r"own.lengths.shape=\(3,\) must be"):
    pallas_kernels.squeezed_decode_attention(
        q, ctx.keys, ctx.values, ctx.centroids, ctx.counts, ctx.offsets,
        threshold=0.1, own=own._replace(lengths=jnp.ones(3, jnp.int32)),
        backend="xla")
