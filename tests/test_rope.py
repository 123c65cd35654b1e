"""Tests for models.llama.rope."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.llama import RopeScaling
from models.llama.rope import apply_rope, inverse_frequencies


def test_linear_scaling_divides_frequencies():
  plain = inverse_frequencies(64, 10000.0, RopeScaling())
  linear = inverse_frequencies(64, 10000.0, RopeScaling("linear", factor=4.0))
  np.testing.assert_allclose(linear, plain / 4.0)


def test_llama3_keeps_high_and_scales_low_frequencies():
  scaling = RopeScaling("llama3", factor=8.0, original_max_position_embeddings=8192)
  plain = inverse_frequencies(128, 500000.0, RopeScaling())
  scaled = inverse_frequencies(128, 500000.0, scaling)
  wavelen = 2 * np.pi / plain
  high = wavelen < 8192 / 4.0
  low = wavelen > 8192 / 1.0
  np.testing.assert_allclose(scaled[high], plain[high])
  np.testing.assert_allclose(scaled[low], plain[low] / 8.0)
  middle = ~high & ~low
  assert middle.any()
  assert np.all((scaled[middle] < plain[middle]) & (scaled[middle] > plain[middle] / 8.0))


@pytest.mark.parametrize("scaling", [RopeScaling(), RopeScaling("linear", factor=2.0)])
def test_scores_depend_only_on_relative_position(scaling):
  inv_freq = inverse_frequencies(32, 10000.0, scaling)
  q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 32))

  def score(m, n):
    qm = apply_rope(q, jnp.array([[m]]), inv_freq)
    kn = apply_rope(k, jnp.array([[n]]), inv_freq)
    return float(jnp.sum(qm * kn))

  assert score(5, 2) == pytest.approx(score(105, 102), rel=1e-4)
  assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)
  rotated = apply_rope(q, jnp.array([[77]]), inv_freq)
  assert float(jnp.linalg.norm(rotated)) == pytest.approx(float(jnp.linalg.norm(q)), rel=1e-5)
