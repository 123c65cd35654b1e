"""Tests for squeezed_jax.baselines.masked_attention: the exact attention of dense and baselines."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import references
from squeezed_jax import baselines


def _inputs(batch=2, tokens=7, heads=8, kv_heads=2, keys=50, dim=16, dtype=jnp.float32):
  kq, kk, kv, km = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(kq, (batch, tokens, heads, dim), dtype)
  k = jax.random.normal(kk, (kv_heads, keys, dim), dtype)
  v = jax.random.normal(kv, (kv_heads, keys, dim), dtype)
  mask = jax.random.bernoulli(km, 0.4, (batch, kv_heads, keys)).at[0, 1].set(False)
  return q, k, v, mask


@pytest.mark.parametrize("block_bytes", [1 << 30, 3 * 4 * 2 * 8 * 50])  # one block; blocks of 3
@pytest.mark.parametrize("use_mask", [True, False])
def test_matches_the_float32_reference(monkeypatch, block_bytes, use_mask):
  monkeypatch.setattr(baselines, "LOGITS_BLOCK_BYTES", block_bytes)
  q, k, v, mask = _inputs()
  mask = mask if use_mask else None
  out, lse = baselines.masked_attention(q, k, v, mask)
  want_out, want_lse = references.attention(q, k, v, mask)
  assert out.dtype == lse.dtype == jnp.float32 and out.shape == q.shape
  np.testing.assert_allclose(out, want_out, atol=1e-5)
  np.testing.assert_allclose(lse, want_lse, atol=1e-5)
  if use_mask:  # (sequence 0, KV head 1) attends to nothing: out 0, lse -inf
    assert np.all(np.asarray(lse[0, :, 4:]) == -np.inf)
    assert np.all(np.asarray(out[0, :, 4:]) == 0)


def test_bf16_operands_stay_close_to_float32():
  q, k, v, mask = _inputs(dtype=jnp.bfloat16)
  out, lse = baselines.masked_attention(q, k, v, mask)
  want_out, want_lse = references.attention(q.astype(jnp.float32), k, v, mask)
  finite = np.isfinite(np.asarray(want_lse))
  np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(want_lse)[finite], atol=3e-2)
  np.testing.assert_allclose(out, want_out, atol=3e-2)
