"""Tests of `squeezed_jax.training.train_step`: the loss, initialisation and the train step."""

from __future__ import annotations

import concurrent.futures

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.llama import LlamaConfig
from squeezed_jax.training import train_step
from squeezed_jax.training.causal_attention import causal_attention
from squeezed_jax.training.optimizer import (OptimizerConfig, learning_rate_schedule,
                                             make_optimizer)

CONFIG = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=2, num_kv_heads=1, head_dim=16, tie_word_embeddings=True,
                     dtype=jnp.bfloat16)
OPTIMIZER = OptimizerConfig(peak_learning_rate=3e-3, warmup_steps=0, total_steps=10)


def _batch(batch=2, length=32, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CONFIG.vocab_size, (batch, length + 1)).astype(np.int32)
  answer = rng.random((batch, length)) < 0.2
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "text_mask": ~answer,
          "answer_mask": answer}


def test_token_nll_is_cross_entropy():
  logits = jax.random.normal(jax.random.key(0), (2, 3, 7))
  targets = jnp.array([[0, 6, 3], [1, 1, 2]])
  expected = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(train_step.token_nll(logits, targets), expected, rtol=1e-6)


@pytest.fixture(scope="module")
def stepper():
  """(initial state, jitted train step) of CONFIG."""
  optimizer = make_optimizer(OPTIMIZER)
  graphdef, state = train_step.init_train_state(CONFIG, optimizer, seed=0)
  step = train_step.make_train_step(graphdef, optimizer, learning_rate_schedule(OPTIMIZER),
                                    causal_attention("xla"), answer_weight=1.0)
  return state, step


def test_loss_is_text_mean_plus_weighted_answer_mean():
  config = CONFIG.replace(dtype=jnp.float32)  # float32 compute: jit and eager agree closely.
  graphdef, state = train_step.init_train_state(config, make_optimizer(OPTIMIZER), seed=0)
  batch = _batch()
  loss, metrics = jax.jit(train_step.loss_and_metrics, static_argnums=(1, 3, 4))(
      state.params, graphdef, batch, causal_attention("xla"), 3.0)
  model = nnx.merge(graphdef, state.params)
  logits, _ = model(jnp.asarray(batch["inputs"]), train_step.row_positions(batch["inputs"]),
                    None, causal_attention("xla"))
  nll = np.asarray(train_step.token_nll(logits, batch["targets"]))
  text, answer = nll[batch["text_mask"]].mean(), nll[batch["answer_mask"]].mean()
  np.testing.assert_allclose(metrics["text_loss"], text, rtol=1e-5)
  np.testing.assert_allclose(metrics["answer_loss"], answer, rtol=1e-5)
  np.testing.assert_allclose(loss, text + 3.0 * answer, rtol=1e-5)
  accuracy = (np.argmax(logits, -1) == batch["targets"])[batch["answer_mask"]].mean()
  np.testing.assert_allclose(metrics["answer_accuracy"], accuracy, rtol=1e-6)


def test_init_model_starts_near_uniform_predictions():
  model = train_step.init_model(CONFIG.replace(dtype=jnp.float32), seed=1)
  tokens = jnp.asarray(_batch()["inputs"])
  logits, _ = model(tokens, train_step.row_positions(tokens))
  assert 0.5 < float(jnp.std(logits)) < 2.0
  mean_nll = float(jnp.mean(train_step.token_nll(logits, tokens)))
  assert abs(mean_nll - np.log(CONFIG.vocab_size)) < 1.5


def test_two_steps_lower_the_loss_and_keep_float32_masters(stepper):
  state, step = stepper
  state = jax.tree.map(jnp.copy, state)  # The step donates its input.
  batch = jax.device_put(_batch())
  losses = []
  for _ in range(3):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[2] < losses[1] < losses[0]
  assert int(state.step) == 3
  np.testing.assert_allclose(metrics["learning_rate"], learning_rate_schedule(OPTIMIZER)(2),
                             rtol=1e-6)
  assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  assert float(metrics["grad_norm"]) > 0


def test_compile_ahead_gives_the_jitted_step(stepper):
  state, step = stepper
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    compiled = train_step.compile_ahead(step, state, [(2, 32), (2, 32)], pool)
    assert list(compiled) == [(2, 32)]
    compiled_step = compiled[(2, 32)].result()
  batch = _batch()
  _, expected = step(jax.tree.map(jnp.copy, state), batch)
  _, got = compiled_step(jax.tree.map(jnp.copy, state), jax.device_put(batch))
  for name in expected:
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-6)
  with pytest.raises(TypeError):
    compiled_step(jax.tree.map(jnp.copy, state), _batch(length=8))
