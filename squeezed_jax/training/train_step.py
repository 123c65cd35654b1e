"""The training objective and the jitted train step (bf16 compute, float32 master parameters).

Loss = mean NLL over the language-modelling targets + answer_weight * mean NLL over the answer
targets: two separately normalised terms, so the few answer tokens of a batch weigh as much as
`answer_weight` times all its text, whatever their count.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models.llama import AttentionFn, Llama, LlamaConfig

Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """step: int32 scalar, steps taken; params: the model's float32 nnx.State; opt_state: optax."""

  step: jax.Array
  params: nnx.State
  opt_state: Any


def init_model(config: LlamaConfig, seed: int) -> Llama:
  """`Llama(config)` initialised for training from scratch.

  The model's own initialisation draws embeddings with unit variance, which suits loading but,
  with tied embeddings, starts the logits at a standard deviation of sqrt(hidden_size). Here the
  embedding is scaled by hidden_size**-0.5 (unit-scale initial logits) and the projections that
  write into the residual stream (o_proj, down_proj) by (2 * num_layers)**-0.5 (GPT-2's rule).
  """
  model = Llama(config, rngs=nnx.Rngs(seed))
  embedding = model.embedder.embedding
  embedding.set_value(embedding[...] * config.hidden_size ** -0.5)
  for block in model.layers:
    for weight in (block.attn.o_proj, block.mlp.down_proj):
      weight.set_value(weight[...] * (2 * config.num_layers) ** -0.5)
  return model


def init_train_state(config: LlamaConfig, optimizer: optax.GradientTransformation,
                     seed: int) -> tuple[nnx.GraphDef, TrainState]:
  """`init_model(config, seed)` split into (graphdef, TrainState at step 0)."""
  graphdef, params = nnx.split(init_model(config, seed))
  return graphdef, TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=optimizer.init(params))


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """logits: [B, T, V] float32, targets: [B, T] int32 -> negative log-likelihoods [B, T]."""
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - picked


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def global_norm(tree: Any) -> jax.Array:
  """The L2 norm of all leaves of `tree` together (float32 scalar)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32)))
                      for leaf in jax.tree.leaves(tree)))


def row_positions(tokens: jax.Array) -> jax.Array:
  """[B, T] positions 0..T-1 of every row of `tokens` [B, T]."""
  return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def loss_and_metrics(params: nnx.State, graphdef: nnx.GraphDef, batch: dict[str, jax.Array],
                     attention_fn: AttentionFn, answer_weight: float) -> tuple[jax.Array, Metrics]:
  """The loss of `batch` (inputs, targets, text_mask, answer_mask: [B, T]) and its parts.

  Metrics: loss, text_loss, answer_loss, answer_accuracy (greedy next-token accuracy on answers).
  """
  model = nnx.merge(graphdef, params)
  inputs = batch["inputs"]
  logits, _ = model(inputs, row_positions(inputs), None, attention_fn)
  nll = token_nll(logits, batch["targets"])
  text_loss = _masked_mean(nll, batch["text_mask"])
  answer_loss = _masked_mean(nll, batch["answer_mask"])
  correct = jnp.argmax(logits, axis=-1) == batch["targets"]
  loss = text_loss + answer_weight * answer_loss
  return loss, {"loss": loss, "text_loss": text_loss, "answer_loss": answer_loss,
                "answer_accuracy": _masked_mean(correct, batch["answer_mask"])}


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, attention_fn: AttentionFn, *,
                    answer_weight: float) -> Callable[..., tuple[TrainState, Metrics]]:
  """A jitted `step(state, batch) -> (state, metrics)`; `state` is donated.

  Metrics add grad_norm (before clipping) and learning_rate (of the step taken).
  """

  def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, Metrics]:
    grads, metrics = jax.grad(loss_and_metrics, has_aux=True)(
        state.params, graphdef, batch, attention_fn, answer_weight)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=global_norm(grads),
                   learning_rate=schedule(state.step))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(step, donate_argnums=0)


def batch_spec(batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract batch of the given shape, for ahead-of-time compilation."""
  tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
  mask = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.bool_)
  return {"inputs": tokens, "targets": tokens, "text_mask": mask, "answer_mask": mask}


def compile_ahead(step_fn, state: TrainState, shapes: Sequence[tuple[int, int]],
                  executor: concurrent.futures.Executor
                  ) -> dict[tuple[int, int], concurrent.futures.Future]:
  """Compiles `step_fn` for each (batch_size, seq_len) in `shapes` on `executor` threads.

  Returns futures of the compiled steps, keyed by shape; they are called like `step_fn`.
  """
  abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), state)
  return {shape: executor.submit(lambda s=shape: step_fn.lower(abstract_state,
                                                               batch_spec(*s)).compile())
          for shape in dict.fromkeys(shapes)}
