"""Pallas TPU kernels vs the references, under `pltpu.InterpretParams()`.

The TPU kernel reads whole blocks and masks unselected rows, so it must give
exactly the reference attention over the selected rows (bf16 tolerance as in
test_pallas_gpu.py: outputs 1e-2, lse 1e-4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import references
from pallas_kernels import selection
from pallas_kernels import synthetic
from pallas_kernels.tpu import block_selection
from pallas_kernels.tpu import sparse_attention

NUM_KEYS, NUM_CLUSTERS, BLOCK_ROWS = 300, 23, 128  # S' not a block multiple


@pytest.mark.parametrize("batch,tokens,group,head_dim,which", [
    (3, None, 4, 128, "ragged"),
    (1, 20, 1, 64, "all"),
    (2, None, 8, 128, "none"),
])
def test_sparse_attention(batch, tokens, group, head_dim, which):
  num_kv_heads = 2
  ctx = synthetic.clustered_context(jax.random.key(head_dim),
                                    num_kv_heads=num_kv_heads,
                                    num_keys=NUM_KEYS,
                                    num_clusters=NUM_CLUSTERS,
                                    head_dim=head_dim)
  shape = ((batch, num_kv_heads * group, head_dim) if tokens is None
           else (batch, tokens, num_kv_heads * group, head_dim))
  q = jax.random.normal(jax.random.key(1), shape, jnp.bfloat16)
  scores = references.centroid_scores(q, ctx.centroids, ctx.counts)
  tau = {"ragged": float(jnp.quantile(scores, 0.7)), "all": -1.0,
         "none": 1.0}[which]
  sel = selection.select_clusters(scores, ctx.counts, ctx.offsets,
                                  max_rows=NUM_KEYS, threshold=tau)
  blocks = block_selection.block_selection(
      selection.key_mask(sel, NUM_KEYS), block_rows=BLOCK_ROWS)
  out, lse = sparse_attention.sparse_attention(q, ctx.keys, ctx.values,
                                               blocks, block_m=16,
                                               interpret=True)
  want_out, want_lse = references.attention(
      q, ctx.keys, ctx.values, selection.key_mask(sel, NUM_KEYS))
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(want_out, np.float32), rtol=1e-2,
                             atol=1e-2)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-4)
  if which == "none":
    assert np.isneginf(np.asarray(lse)).all()
    np.testing.assert_array_equal(np.asarray(out, np.float32), 0.0)


def test_block_selection_lists_blocks_with_selected_rows():
  ctx = synthetic.clustered_context(jax.random.key(0), num_kv_heads=2,
                                    num_keys=NUM_KEYS,
                                    num_clusters=NUM_CLUSTERS, head_dim=8)
  clusters = jax.random.bernoulli(jax.random.key(1), 0.2,
                                  (2, 2, NUM_CLUSTERS))
  mask = np.asarray(selection.key_mask(
      selection.rows_from_clusters(clusters, ctx.counts, ctx.offsets,
                                   NUM_KEYS), NUM_KEYS))
  blocks = block_selection.block_selection(jnp.asarray(mask), block_rows=32,
                                           max_blocks=10)
  padded = np.pad(mask, ((0, 0), (0, 0), (0, 320 - NUM_KEYS)))
  np.testing.assert_array_equal(blocks.row_mask,
                                padded.reshape(2, 2, 10, 32))
  for b in range(2):
    for h in range(2):
      want = np.flatnonzero(padded[b, h].reshape(10, 32).any(-1))
      n = int(blocks.num_blocks[b, h])
      np.testing.assert_array_equal(blocks.blocks[b, h, :n], want)
      if n:
        np.testing.assert_array_equal(blocks.blocks[b, h, n:], want[-1])
  amplification = np.asarray(block_selection.read_amplification(blocks))
  assert (amplification[np.isfinite(amplification)] >= 1).all()
