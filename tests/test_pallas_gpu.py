"""Pallas GPU kernels (Triton lowering) vs the references, in interpret mode.

Tolerances: the references run in float32 on the kernels' (possibly bf16)
inputs. Logits and log-sum-exps accumulate in float32 in both, so lse agrees
to 1e-4; with bf16 K/V the kernel rounds the softmax weights to bf16 before the
P.V product, so outputs agree to 1e-2 (float32 inputs: 1e-5).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import block_sizes
from pallas_kernels import references
from pallas_kernels import selection
from pallas_kernels import synthetic
from pallas_kernels.gpu import centroid_scores as gpu_scores
from pallas_kernels.gpu import sparse_attention as gpu_attention

NUM_KEYS, NUM_CLUSTERS = 300, 23  # neither a multiple of any block size
ATTENTION_TILES = {
    "decode": block_sizes.AttentionBlockSizes(block_m=16, block_rows=16,
                                              split_rows=64),
    "prefill": block_sizes.AttentionBlockSizes(block_m=16, block_rows=32,
                                               split_rows=None),
}
LOOKUP_TILES = block_sizes.LookupBlockSizes(block_m=16, block_k=16,
                                            single_pass_max_rows=16)


def _context(num_kv_heads, head_dim, dtype):
  return synthetic.clustered_context(
      jax.random.key(head_dim + num_kv_heads), num_kv_heads=num_kv_heads,
      num_keys=NUM_KEYS, num_clusters=NUM_CLUSTERS, head_dim=head_dim,
      dtype=dtype)


def _queries(batch, tokens, num_heads, head_dim, dtype):
  shape = ((batch, num_heads, head_dim) if tokens is None
           else (batch, tokens, num_heads, head_dim))
  return jax.random.normal(jax.random.key(batch * 7 + num_heads), shape, dtype)


@pytest.mark.parametrize(
    "batch,tokens,group,head_dim,dtype,which,window",
    [
        (3, None, 4, 64, jnp.bfloat16, "ragged", 37),
        (1, None, 8, 128, jnp.bfloat16, "all", 0),
        (3, None, 1, 64, jnp.float32, "ragged", 0),
        (3, 5, 1, 128, jnp.bfloat16, "ragged", 37),
        (1, 20, 4, 64, jnp.bfloat16, "none", 0),
        (2, None, 1, 128, jnp.float32, "none", 37),
    ])
def test_sparse_attention(batch, tokens, group, head_dim, dtype, which,
                          window):
  num_kv_heads = 2
  ctx = _context(num_kv_heads, head_dim, dtype)
  window_kv = None
  if window:
    window_kv = jax.random.normal(jax.random.key(5), (2, num_kv_heads, window,
                                                      head_dim), dtype)
  q = _queries(batch, tokens, num_kv_heads * group, head_dim, dtype)
  scores = references.centroid_scores(q, ctx.centroids, ctx.counts)
  tau = {"ragged": float(jnp.quantile(scores, 0.6)), "all": -1.0,
         "none": 1.0}[which]
  sel = selection.select_clusters(scores, ctx.counts, ctx.offsets,
                                  max_rows=NUM_KEYS, threshold=tau)
  if which == "ragged":
    assert len(np.unique(np.asarray(sel.num_rows))) > 1
  tiles = ATTENTION_TILES["decode" if tokens is None else "prefill"]
  out, lse = gpu_attention.sparse_attention(
      q, ctx.keys, ctx.values, sel,
      window_keys=None if window_kv is None else window_kv[0],
      window_values=None if window_kv is None else window_kv[1],
      block_sizes=tiles, interpret=True)
  want_out, want_lse = references.attention_with_window(
      q, ctx.keys, ctx.values, selection.key_mask(sel, NUM_KEYS),
      *(window_kv if window_kv is not None else ()))
  assert out.shape == q.shape and out.dtype == q.dtype
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(want_out, np.float32), rtol=tol,
                             atol=tol)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-4)
  if which == "all":
    dense_out, dense_lse = references.attention(q, ctx.keys, ctx.values)
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               np.asarray(dense_out, np.float32), rtol=tol,
                               atol=tol)
    np.testing.assert_allclose(lse, dense_lse, rtol=1e-5, atol=1e-4)
  if which == "none" and not window:
    assert np.isneginf(np.asarray(lse)).all()
    np.testing.assert_array_equal(np.asarray(out, np.float32), 0.0)


@pytest.mark.parametrize(
    "batch,tokens,group,head_dim,masked,dot_dtype",
    [
        (3, None, 4, 64, False, None),        # decode, single pass (12 rows)
        (1, None, 8, 128, False, None),       # decode, single pass (8 rows)
        (3, 5, 1, 128, True, None),           # prefill, padded tokens
        (1, 20, 4, 64, False, "bfloat16"),    # prefill, GQA, bf16 products
    ])
def test_centroid_scores(batch, tokens, group, head_dim, masked, dot_dtype):
  """Float32 products match to 1e-4; bf16 products (centroids rounded to
  bf16) to 2% of each score or 0.5% of the largest one."""
  num_kv_heads = 2
  ctx = _context(num_kv_heads, head_dim, jnp.bfloat16)
  counts = ctx.counts.at[0, 5].set(0)  # an empty cluster, whatever the draw
  q = _queries(batch, tokens, num_kv_heads * group, head_dim, jnp.bfloat16)
  mask = None
  if masked:
    mask = jax.random.bernoulli(jax.random.key(1), 0.7, (batch, tokens))
    mask = mask.at[:, 0].set(True).at[0].set(False)  # sequence 0: no tokens
  tiles = dataclasses.replace(LOOKUP_TILES, two_pass_dot_dtype=dot_dtype)
  got = gpu_scores.centroid_scores(q, ctx.centroids, counts, query_mask=mask,
                                   block_sizes=tiles, interpret=True)
  want = references.centroid_scores(q, ctx.centroids, counts,
                                    query_mask=mask)
  if dot_dtype is None:
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
  else:
    np.testing.assert_allclose(got, want, rtol=2e-2,
                               atol=5e-3 * float(want.max()))
  np.testing.assert_array_equal(got[:, 0, 5], 0.0)
  if masked:
    np.testing.assert_array_equal(got[0], 0.0)
