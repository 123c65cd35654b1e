"""Quality of a trained model: greedy needle-retrieval accuracy at a context length, and held-out
essay perplexity.

Needle accuracy uses the text-level RULER tasks of `squeezed_jax.eval.ruler_tasks` (the prompt is
`encode(context, bos=True) + encode(question)`), answers them greedily with dense attention and a
KV cache, and scores with RULER's `ruler_score`. The KV cache has one fixed capacity per length
and batches a fixed size, so one compilation of prefill and decode serves a whole evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.llama import AttentionFn, Llama, dense_attention, init_kv_caches
from squeezed_jax.eval import ruler_tasks
from squeezed_jax.eval.haystack import TextTokenizer
from squeezed_jax.generation import decode_loop, pad_prompts, prefill_step
from squeezed_jax.sampling import SamplingParams
from squeezed_jax.training.essay_corpus import EssaySplit
from squeezed_jax.training.train_step import row_positions, token_nll

# Enough new tokens for each task's answer, its closing period and EOS.
MAX_NEW_TOKENS = {"single_needle": 16, "multi_key_needle": 16, "multi_value_needle": 48,
                  "kv_lookup": 40, "variable_tracking": 40, "common_words": 64}
PREFILL_CHUNK = 512
CAPACITY_MULTIPLE = 256


@dataclasses.dataclass(frozen=True)
class NeedleResult:
  """accuracy: mean `ruler_score` over the examples; predictions / answers: per example."""

  task: str
  num_tokens: int
  accuracy: float
  mean_prompt_tokens: float
  predictions: list[str]
  answers: list[list[str]]

  def summary(self) -> dict[str, float | int | str]:
    return {"task": self.task, "num_tokens": self.num_tokens, "accuracy": self.accuracy,
            "num_examples": len(self.predictions), "mean_prompt_tokens": self.mean_prompt_tokens}


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prefill(graphdef, state, tokens, start, last_index, last_logits, caches):
  return prefill_step(nnx.merge(graphdef, state), tokens, start, last_index, last_logits, caches,
                      dense_attention)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _greedy_decode(graphdef, state, logits, lengths, caches, stop_tokens, *, max_new_tokens):
  out, num, _, _ = decode_loop(nnx.merge(graphdef, state), logits, lengths, caches,
                               jax.random.key(0), stop_tokens, attention_fn=dense_attention,
                               max_new_tokens=max_new_tokens, sampling=SamplingParams())
  return out, num


def greedy_generate(model: Llama, prompts: Sequence[Sequence[int]], *, capacity: int,
                    max_new_tokens: int) -> list[list[int]]:
  """Greedy continuations (up to EOS, without it) of `prompts` with KV caches of `capacity` slots.

  Unlike `generate_tokens`, whose cache fits each batch, the fixed capacity lets every batch of
  the same size reuse one compilation.
  """
  tokens, lengths = pad_prompts(prompts, PREFILL_CHUNK)
  if int(lengths.max()) + max_new_tokens > capacity:
    raise ValueError(f"a prompt of {int(lengths.max())} tokens + {max_new_tokens=} exceeds "
                     f"{capacity=}")
  config = model.config
  batch = len(prompts)
  caches = init_kv_caches(config, batch, capacity)
  graphdef, state = nnx.split(model)
  last_logits = jnp.zeros((batch, config.vocab_size), jnp.float32)
  last_index = jnp.asarray(lengths - 1)
  for start in range(0, tokens.shape[1], PREFILL_CHUNK):
    last_logits, caches = _prefill(graphdef, state,
                                   jnp.asarray(tokens[:, start:start + PREFILL_CHUNK]),
                                   jnp.int32(start), last_index, last_logits, caches)
  out, num = _greedy_decode(graphdef, state, last_logits, jnp.asarray(lengths), caches,
                            jnp.asarray([config.eos_token_id], jnp.int32),
                            max_new_tokens=max_new_tokens)
  out, num = jax.device_get((out, num))
  return [row[:n].tolist() for row, n in zip(out, num)]


def needle_accuracy(model: Llama, tokenizer: TextTokenizer, *, num_tokens: int,
                    num_examples: int, task: str = "single_needle", seed: int = 0,
                    batch_size: int = 8) -> NeedleResult:
  """Greedy accuracy on `num_examples` `task` examples of at most `num_tokens` prompt tokens.

  Example i is `make_example(task, seed=seed + i)`; the last batch is padded with repeats.
  """
  if num_examples < 1 or batch_size < 1:
    raise ValueError(f"{num_examples=} and {batch_size=} must be positive")
  max_new_tokens = MAX_NEW_TOKENS[task]
  examples = [ruler_tasks.make_example(task, num_tokens=num_tokens, tokenizer=tokenizer,
                                       seed=seed + i) for i in range(num_examples)]
  prompts = [tokenizer.encode(e.context, bos=True) + tokenizer.encode(e.question, bos=False)
             for e in examples]
  capacity = -(-(num_tokens + max_new_tokens) // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE
  predictions = []
  for first in range(0, num_examples, batch_size):
    batch = prompts[first:first + batch_size]
    padded = batch + [batch[-1]] * (batch_size - len(batch))
    outputs = greedy_generate(model, padded, capacity=capacity, max_new_tokens=max_new_tokens)
    predictions += [tokenizer.decode(ids) for ids in outputs[:len(batch)]]
  scores = [ruler_tasks.ruler_score(p, e.answers) for p, e in zip(predictions, examples)]
  return NeedleResult(task=task, num_tokens=num_tokens, accuracy=float(np.mean(scores)),
                      mean_prompt_tokens=float(np.mean([len(p) for p in prompts])),
                      predictions=predictions, answers=[e.answers for e in examples])


def heldout_windows(split: EssaySplit, *, seq_len: int, bos_id: int) -> np.ndarray:
  """[N, seq_len + 1] int32: BOS and then consecutive, non-overlapping seq_len-token windows."""
  count = split.num_tokens // seq_len
  if count < 1:
    raise ValueError(f"the held-out split's {split.num_tokens} tokens are fewer than {seq_len=}")
  windows = split.tokens[:count * seq_len].reshape(count, seq_len)
  return np.concatenate([np.full((count, 1), bos_id, np.int32), windows], axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "attention_fn"))
def _nll_sum(graphdef, state, windows, weights, attention_fn):
  """Sum over rows of weights[row] * the NLL of windows[row, 1:] given what precedes it."""
  inputs = windows[:, :-1]
  logits, _ = nnx.merge(graphdef, state)(inputs, row_positions(inputs), None, attention_fn)
  return jnp.sum(token_nll(logits, windows[:, 1:]) * weights[:, None])


def heldout_loss(model: Llama, windows: np.ndarray, *, batch_size: int,
                 attention_fn: AttentionFn) -> float:
  """Mean NLL (nats/token) of every window's tokens after BOS; windows: [N, T + 1] int32.

  Batches have `batch_size` rows (the last one padded with weight-0 rows): one compilation.
  """
  graphdef, state = nnx.split(model)
  total = 0.0
  for first in range(0, len(windows), batch_size):
    batch = windows[first:first + batch_size]
    weights = np.zeros(batch_size, np.float32)
    weights[:len(batch)] = 1.0
    batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(batch), axis=0)])
    total += float(_nll_sum(graphdef, state, jnp.asarray(batch), jnp.asarray(weights),
                            attention_fn))
  return total / (windows.shape[0] * (windows.shape[1] - 1))
