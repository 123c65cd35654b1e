"""Tests for squeezed_jax.sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from squeezed_jax.sampling import SamplingParams, sample_tokens


def _logits(seed=0, batch=4, vocab=16):
  return jax.random.normal(jax.random.key(seed), (batch, vocab)) * 2.0


def test_greedy_is_argmax():
  logits = _logits()
  got = sample_tokens(logits, jax.random.key(1), SamplingParams(temperature=0.0))
  np.testing.assert_array_equal(got, np.argmax(np.asarray(logits), axis=-1))


def test_tiny_top_p_keeps_only_the_most_likely_token():
  logits = _logits(seed=2)
  keys = jax.random.split(jax.random.key(3), 50)
  draws = jax.vmap(lambda k: sample_tokens(logits, k, SamplingParams(1.5, top_p=1e-6)))(keys)
  np.testing.assert_array_equal(draws, np.broadcast_to(np.argmax(logits, -1), draws.shape))


def test_top_p_draws_only_from_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(4), 2000)
  draws = np.asarray(jax.vmap(lambda k: sample_tokens(logits, k, SamplingParams(1.0, 0.7)))(keys))
  # Nucleus of mass 0.7: tokens 0 and 1 (0.5 + 0.3 >= 0.7); renormalised 0.625 / 0.375.
  assert set(np.unique(draws)) == {0, 1}
  assert abs((draws == 0).mean() - 0.625) < 0.04


def test_temperature_sampling_follows_softmax():
  logits = jnp.array([[1.0, 0.0, -1.0, 0.5]])
  keys = jax.random.split(jax.random.key(5), 4000)
  draws = np.asarray(jax.vmap(lambda k: sample_tokens(logits, k, SamplingParams(2.0)))(keys))
  expected = np.asarray(jax.nn.softmax(logits[0] / 2.0))
  freq = np.bincount(draws.ravel(), minlength=4) / draws.size
  np.testing.assert_allclose(freq, expected, atol=0.03)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_params_raise(kwargs):
  with pytest.raises(ValueError):
    SamplingParams(**kwargs)
