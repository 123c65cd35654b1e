"""Tests of pallas_kernels.merge: merging partials is exact attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import merge
from pallas_kernels import references


def _inputs(seed, batch=2, tokens=3, num_heads=4, num_keys=50, head_dim=8):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (batch, tokens, num_heads, head_dim))
  keys = jax.random.normal(kk, (2, num_keys, head_dim))
  values = jax.random.normal(kv, (2, num_keys, head_dim))
  return q, keys, values


def test_two_disjoint_parts_merge_to_full_attention():
  q, keys, values = _inputs(0)
  part = jax.random.bernoulli(jax.random.key(1), 0.4, (2, 2, 50))
  out1, lse1 = references.attention(q, keys, values, part)
  out2, lse2 = references.attention(q, keys, values, ~part)
  out, lse = merge.merge_partials(out1, lse1, out2, lse2)
  want_out, want_lse = references.attention(q, keys, values)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-6)


def test_empty_part_returns_the_other_exactly():
  q, keys, values = _inputs(2)
  out1, lse1 = references.attention(q, keys, values)
  empty = jnp.zeros((2, 2, 50), bool)
  out2, lse2 = references.attention(q, keys, values, empty)
  assert np.isneginf(np.asarray(lse2)).all()
  out, lse = merge.merge_partials(out1, lse1, out2, lse2)
  np.testing.assert_array_equal(out, out1)
  np.testing.assert_array_equal(lse, lse1)
  out, lse = merge.merge_partials(out2, lse2, out2, lse2)
  np.testing.assert_array_equal(out, 0.0)
  assert np.isneginf(np.asarray(lse)).all()


def test_stacked_reduce_of_splits():
  q, keys, values = _inputs(3)
  split = jax.random.randint(jax.random.key(4), (2, 2, 50), 0, 4)
  parts = [references.attention(q, keys, values, split == s) for s in range(4)]
  out, lse = merge.merge_stacked(jnp.stack([p[0] for p in parts]),
                                 jnp.stack([p[1] for p in parts]), axis=0)
  want_out, want_lse = references.attention(q, keys, values)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-6)
