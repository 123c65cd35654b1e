"""Tests of pallas_kernels.xla_fallback.sparse_attention vs the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import references
from pallas_kernels import selection
from pallas_kernels import synthetic
from pallas_kernels import xla_fallback


@pytest.mark.parametrize("shape,threshold", [
    ((3, 8, 32), "median"),        # decode, GQA group 4, ragged counts
    ((1, 5, 2, 32), "median"),     # prefill, group 1
    ((2, 8, 32), "none"),          # empty selection
    ((2, 3, 8, 32), "all"),        # everything selected = dense attention
])
def test_matches_reference(shape, threshold):
  ctx = synthetic.clustered_context(jax.random.key(0), num_kv_heads=2,
                                    num_keys=150, num_clusters=10,
                                    head_dim=32, dtype=jnp.float32)
  q = jax.random.normal(jax.random.key(1), shape)
  scores = references.centroid_scores(q, ctx.centroids, ctx.counts)
  tau = {"median": float(jnp.median(scores)), "none": 1.0, "all": -1.0}
  sel = selection.select_clusters(scores, ctx.counts, ctx.offsets,
                                  max_rows=150, threshold=tau[threshold])
  out, lse = xla_fallback.sparse_attention(q, ctx.keys, ctx.values, sel,
                                           block_rows=64)
  mask = selection.key_mask(sel, 150)
  want_out, want_lse = references.attention(q, ctx.keys, ctx.values, mask)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5)
  if threshold == "all":
    dense_out, _ = references.attention(q, ctx.keys, ctx.values)
    np.testing.assert_allclose(out, dense_out, rtol=1e-5, atol=1e-5)
  if threshold == "none":
    assert np.isneginf(np.asarray(lse)).all()
    np.testing.assert_array_equal(out, 0.0)
