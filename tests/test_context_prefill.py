"""Tests for squeezed_jax.context_prefill: chunked prefill equals one full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.llama import PRESETS, Llama, dense_attention
from squeezed_jax.context_prefill import prefill_context


def _record_everything(q, k, v, positions, cache, layer):
  """A cache-less attention that returns (q, k, v) as its 'cache', to observe the model."""
  out, _ = dense_attention(q, k, v, positions, None, layer)
  return out, (q, k, v)


@pytest.mark.parametrize("chunk_size", [4, 7, 64])
def test_chunked_prefill_matches_full_forward(chunk_size):
  model = Llama(PRESETS["tiny"], rngs=nnx.Rngs(3))
  ids = jax.random.randint(jax.random.key(0), (23,), 0, 256).tolist()
  window = 5
  got = prefill_context(model, ids, window=window, chunk_size=chunk_size)
  _, recorded = model(jnp.array([ids]), jnp.arange(23)[None], None, _record_everything)
  q = jnp.stack([r[0][0] for r in recorded])  # [L, S, Hq, D]
  k = jnp.stack([r[1][0] for r in recorded]).transpose(0, 2, 1, 3)
  v = jnp.stack([r[2][0] for r in recorded]).transpose(0, 2, 1, 3)
  assert len(got.keys) == len(got.values) == model.config.num_layers
  np.testing.assert_allclose(jnp.stack(got.keys), k, atol=1e-5)
  np.testing.assert_allclose(jnp.stack(got.values), v, atol=1e-5)
  np.testing.assert_allclose(got.window_queries, q[:, -window:], atol=1e-5)


def test_bad_window_raises():
  model = Llama(PRESETS["tiny"], rngs=nnx.Rngs(3))
  with pytest.raises(ValueError, match="window"):
    prefill_context(model, [1, 2, 3], window=3)
