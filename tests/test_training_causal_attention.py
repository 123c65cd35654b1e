"""Tests of `squeezed_jax.training.causal_attention` against the model's dense attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.llama import dense_attention
from squeezed_jax.training import causal_attention


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_matches_dense_attention(num_heads, num_kv_heads):
  keys = jax.random.split(jax.random.key(0), 3)
  batch, length, head_dim = 2, 48, 16
  q = jax.random.normal(keys[0], (batch, length, num_heads, head_dim))
  k = jax.random.normal(keys[1], (batch, length, num_kv_heads, head_dim))
  v = jax.random.normal(keys[2], (batch, length, num_kv_heads, head_dim))
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  expected, _ = dense_attention(q, k, v, positions, None, 0)
  attention = causal_attention.causal_attention("xla")
  got, cache = attention(q, k, v, positions, None, 0)
  assert cache is None
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_default_and_errors():
  assert causal_attention.default_implementation() == (
      "cudnn" if jax.default_backend() == "gpu" else "xla")
  assert causal_attention.causal_attention() is causal_attention.causal_attention()
  with pytest.raises(ValueError, match="implementation='flash'"):
    causal_attention.causal_attention("flash")
  x = jnp.ones((1, 4, 2, 8))
  with pytest.raises(ValueError, match="keeps no KV cache"):
    causal_attention.causal_attention("xla")(x, x, x, None, object(), 0)
