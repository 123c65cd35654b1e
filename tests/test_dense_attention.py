"""Tests for models.llama.dense_attention against a float64 numpy reference."""

import jax
import numpy as np
import pytest

from models.llama import KVCache, dense_attention


def _reference(q, k, v, q_pos, k_pos):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  mask = np.asarray(k_pos)[:, None, None, :] <= np.asarray(q_pos)[:, None, :, None]
  logits = np.where(mask, logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", probs, v)


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (4, 2), (8, 1)])
def test_causal_attention_without_cache(num_heads, num_kv_heads):
  kq, kk, kv = jax.random.split(jax.random.key(num_heads * 10 + num_kv_heads), 3)
  q = jax.random.normal(kq, (2, 7, num_heads, 16))
  k = jax.random.normal(kk, (2, 7, num_kv_heads, 16))
  v = jax.random.normal(kv, (2, 7, num_kv_heads, 16))
  pos = np.tile(np.arange(7), (2, 1))
  out, cache = dense_attention(q, k, v, pos, None, 0)
  assert cache is None
  np.testing.assert_allclose(out, _reference(q, k, v, pos, pos), atol=1e-5)


def test_cache_write_then_attend_to_earlier_slots():
  kq, kk, kv, kc = jax.random.split(jax.random.key(1), 4)
  cache = KVCache(*jax.random.normal(kc, (2, 2, 10, 2, 8)))  # stale data everywhere
  q = jax.random.normal(kq, (2, 1, 4, 8))
  k = jax.random.normal(kk, (2, 1, 2, 8))
  v = jax.random.normal(kv, (2, 1, 2, 8))
  pos = np.array([[3], [6]])
  out, new_cache = dense_attention(q, k, v, pos, cache, 0)
  np.testing.assert_array_equal(new_cache.keys[0, 3], k[0, 0])
  np.testing.assert_array_equal(new_cache.values[1, 6], v[1, 0])
  slots = np.tile(np.arange(10), (2, 1))
  expected = _reference(q, new_cache.keys, new_cache.values, pos, slots)
  np.testing.assert_allclose(out, expected, atol=1e-5)
