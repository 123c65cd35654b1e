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


@pytest.mark.parametrize("backend", ["xla", "gpu", "tpu"])
def test_decode_attention_matches_reference(backend):
  ctx = synthetic.clustered_context(jax.random.key(3), num_kv_heads=2,
                                    num_keys=180, num_clusters=9, head_dim=32,
                                    dtype=jnp.float32)
  coarse = synthetic.coarse_level(jax.random.key(4), ctx.centroids,
                                  ctx.counts, 3)
  window_keys, window_values = jax.random.normal(jax.random.key(5),
                                                 (2, 2, 7, 32))
  q = jax.random.normal(jax.random.key(6), (3, 4, 32))
  coarse_tau = float(jnp.quantile(
      references.centroid_scores(q, coarse[0], coarse[1]), 0.5))
  scores, want_coarse = references.hierarchical_centroid_scores(
      q, ctx.centroids, ctx.counts, *coarse, coarse_threshold=coarse_tau)
  tau = float(jnp.quantile(scores[scores > 0], 0.4))
  scored_fine = np.where(want_coarse, np.diff(coarse[2])[None], 0).sum(-1)
  for mode in (dict(threshold=tau), dict(key_budget=60),
               dict(key_budget=60, fine_centroid_cost=4.0)):
    out, lse, kept = pk.squeezed_decode_attention(
        q, ctx.keys, ctx.values, ctx.centroids, ctx.counts, ctx.offsets,
        window_keys=window_keys, window_values=window_values,
        coarse_centroids=coarse[0], coarse_counts=coarse[1],
        coarse_offsets=coarse[2], coarse_threshold=coarse_tau,
        backend=backend, interpret=True, **mode)
    want_mode = dict(mode)
    cost = want_mode.pop("fine_centroid_cost", 0.0)
    if cost:  # the fine centroids scored are paid from the key budget
      want_mode["key_budget"] = jnp.asarray(60 - np.ceil(cost * scored_fine),
                                            jnp.int32)
    want = selection.select_clusters(scores, ctx.counts, ctx.offsets,
                                     max_rows=180, **want_mode)
    np.testing.assert_array_equal(kept.clusters, want.clusters)
    np.testing.assert_array_equal(kept.num_rows, want.num_rows)
    np.testing.assert_array_equal(kept.coarse_clusters, want_coarse)
    want_out, want_lse = references.attention_with_window(
        q, ctx.keys, ctx.values, selection.key_mask(want, 180), window_keys,
        window_values)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5)


@pytest.mark.parametrize("backend", ["xla", "gpu"])
@pytest.mark.parametrize("mode", [dict(threshold=0.02), dict(key_budget=50)])
def test_decode_attention_inactive_sequences_keep_no_cluster(backend, mode):
  ctx = synthetic.clustered_context(jax.random.key(7), num_kv_heads=2,
                                    num_keys=120, num_clusters=8, head_dim=16,
                                    dtype=jnp.float32)
  window_keys, window_values = jax.random.normal(jax.random.key(8),
                                                 (2, 2, 5, 16))
  q = jax.random.normal(jax.random.key(9), (3, 4, 16))
  args = (q, ctx.keys, ctx.values, ctx.centroids, ctx.counts, ctx.offsets)
  kwargs = dict(window_keys=window_keys, window_values=window_values,
                backend=backend, interpret=True, **mode)
  every_out, every_lse, every_kept = pk.squeezed_decode_attention(*args,
                                                                  **kwargs)
  active = jnp.array([True, False, True])
  out, lse, kept = pk.squeezed_decode_attention(*args, active=active,
                                                **kwargs)
  assert int(every_kept.num_rows[1].min()) > 0
  np.testing.assert_array_equal(kept.num_rows[1], 0)
  assert not bool(kept.clusters[1].any())
  window_out, window_lse = references.attention(q, window_keys, window_values)
  np.testing.assert_allclose(out[1], window_out[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse[1], window_lse[1], rtol=1e-5)
  for b in (0, 2):
    np.testing.assert_array_equal(kept.clusters[b], every_kept.clusters[b])
    np.testing.assert_allclose(out[b], every_out[b], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(lse[b], every_lse[b], rtol=1e-6)


def test_decode_attention_argument_errors():
  ctx = synthetic.clustered_context(jax.random.key(3), num_kv_heads=2,
                                    num_keys=40, num_clusters=4, head_dim=8)
  args = (ctx.keys, ctx.values, ctx.centroids, ctx.counts, ctx.offsets)
  with pytest.raises(ValueError, match="decode queries"):
    pk.squeezed_decode_attention(jnp.ones((1, 2, 2, 8)), *args, threshold=0.1)
  with pytest.raises(ValueError, match="all or none"):
    pk.squeezed_decode_attention(jnp.ones((1, 2, 8)), *args, threshold=0.1,
                                 coarse_centroids=ctx.centroids)
  with pytest.raises(ValueError, match="needs a key_budget and the coarse"):
    pk.squeezed_decode_attention(jnp.ones((1, 2, 8)), *args, key_budget=10,
                                 fine_centroid_cost=0.5)
