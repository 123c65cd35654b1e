"""Tests of `squeezed_jax.training.optimizer`: schedule, decay mask, clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from squeezed_jax.training.optimizer import (OptimizerConfig, learning_rate_schedule,
                                             make_optimizer)
from squeezed_jax.training.train_step import global_norm


def test_schedule_warms_up_then_decays_to_the_final_fraction():
  config = OptimizerConfig(peak_learning_rate=1e-3, warmup_steps=10, total_steps=110,
                           final_learning_rate_fraction=0.1)
  schedule = learning_rate_schedule(config)
  rates = np.array([float(schedule(step)) for step in range(111)])
  assert rates[0] == 0.0
  np.testing.assert_allclose(rates[5], 5e-4, rtol=1e-6)
  np.testing.assert_allclose(rates[10], 1e-3, rtol=1e-6)
  np.testing.assert_allclose(rates[60], 1e-4 + 0.5 * 9e-4, rtol=1e-5)  # Cosine midpoint.
  np.testing.assert_allclose(rates[110], 1e-4, rtol=1e-5)
  assert np.all(np.diff(rates[10:]) <= 0) and np.all(np.diff(rates[:11]) > 0)


def test_weight_decay_only_on_matrices():
  config = OptimizerConfig(peak_learning_rate=0.1, warmup_steps=0, total_steps=10,
                           weight_decay=0.5)
  optimizer = make_optimizer(config)
  rng = np.random.default_rng(0)
  params = {"matrix": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            "scale": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  np.testing.assert_allclose(updates["matrix"], -0.1 * 0.5 * params["matrix"], rtol=1e-6)
  np.testing.assert_array_equal(updates["scale"], 0.0)


def test_gradients_are_clipped_before_adam():
  config = OptimizerConfig(warmup_steps=0, total_steps=10, clip_norm=1.0, b1=0.9)
  optimizer = make_optimizer(config)
  params = {"w": jnp.ones((5, 5))}
  grads = {"w": jnp.full((5, 5), 100.0)}
  _, state = optimizer.update(grads, optimizer.init(params), params)
  first_moment = state[1][0].mu["w"]  # chain(clip, adamw): adamw's scale_by_adam state.
  np.testing.assert_allclose(global_norm(first_moment), (1 - 0.9) * 1.0, rtol=1e-5)


def test_config_errors():
  with pytest.raises(ValueError, match="warmup_steps=10"):
    OptimizerConfig(warmup_steps=10, total_steps=10)
