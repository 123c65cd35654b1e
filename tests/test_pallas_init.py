"""Tests of the public entry points of pallas_kernels (backend dispatch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import references
from pallas_kernels import selection
from pallas_kernels import synthetic


def test_backend_resolution():
  assert pk.resolve_backend(None) == "xla"  # CI runs on CPU
  assert pk.resolve_backend("gpu") == "gpu"
  assert pk.resolve_backend("tpu") == "tpu"
  with pytest.raises(ValueError, match="backend='cuda'"):
    pk.resolve_backend("cuda")


@pytest.mark.parametrize("backend", ["xla", "gpu", "tpu"])
def test_lookup_attention_with_window_is_exact(backend):
  ctx = synthetic.clustered_context(jax.random.key(0), num_kv_heads=2,
                                    num_keys=180, num_clusters=9, head_dim=32,
                                    dtype=jnp.float32)
  window_keys, window_values = jax.random.normal(jax.random.key(1),
                                                 (2, 2, 7, 32))
  q = jax.random.normal(jax.random.key(2), (2, 3, 4, 32))
  mask = jnp.array([[True, True, False], [True, True, True]])
  out, lse, sel = pk.squeezed_lookup_attention(
      q, ctx.keys, ctx.values, ctx.centroids, ctx.counts, ctx.offsets,
      max_rows=180, key_budget=60, window_keys=window_keys,
      window_values=window_values, query_mask=mask, backend=backend,
      interpret=True)
  scores = references.centroid_scores(q, ctx.centroids, ctx.counts,
                                      query_mask=mask)
  want_sel = selection.select_clusters(scores, ctx.counts, ctx.offsets,
                                       max_rows=180, key_budget=60)
  np.testing.assert_array_equal(sel.clusters, want_sel.clusters)
  keys = jnp.concatenate([ctx.keys, window_keys], axis=1)
  values = jnp.concatenate([ctx.values, window_values], axis=1)
  key_mask = jnp.concatenate([selection.key_mask(want_sel, 180),
                              jnp.ones((2, 2, 7), bool)], axis=-1)
  want_out, want_lse = references.attention(q, keys, values, key_mask)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5)
