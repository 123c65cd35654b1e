"""Batched autoregressive generation: chunked prefill, then a jitted `lax.while_loop` decode."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.llama import AttentionFn, Llama, dense_attention, init_kv_caches
from squeezed_jax.sampling import SamplingParams, sample_tokens


@dataclasses.dataclass(frozen=True)
class GenerationResult:
  """token_ids: per prompt, the generated ids without the stop token.

  stopped: per prompt, whether a stop token ended it (else max_new_tokens did).
  """

  token_ids: list[list[int]]
  stopped: list[bool]


def pad_prompts(prompts: Sequence[Sequence[int]], multiple: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads prompts with 0 to a length that is a multiple of `multiple`.

  Returns tokens [B, P] int32 and lengths [B] int32.
  """
  if not prompts:
    raise ValueError("no prompts given")
  lengths = np.array([len(p) for p in prompts], np.int32)
  if lengths.min() == 0:
    raise ValueError(f"empty prompt at index {int(lengths.argmin())}; prepend BOS at least")
  padded = -(-int(lengths.max()) // multiple) * multiple
  tokens = np.zeros((len(prompts), padded), np.int32)
  for row, prompt in zip(tokens, prompts):
    row[:len(prompt)] = prompt
  return tokens, lengths


def prefill_step(model: Llama, tokens: jax.Array, start: jax.Array, last_index: jax.Array,
                 last_logits: jax.Array, caches: Sequence[Any],
                 attention_fn: AttentionFn) -> tuple[jax.Array, tuple[Any, ...]]:
  """Runs one prefill chunk; keeps the logits of each prompt's last token when in this chunk.

  Traceable (call it inside `jax.jit`). tokens: [B, C] at positions start + 0..C-1; start: scalar;
  last_index: [B] position of each last prompt token; last_logits: [B, V].
  Returns (last_logits, caches).
  """
  batch, chunk = tokens.shape
  positions = start + jnp.broadcast_to(jnp.arange(chunk, dtype=jnp.int32), (batch, chunk))
  logits, caches = model(tokens, positions, caches, attention_fn)
  offset = last_index - start
  in_chunk = (offset >= 0) & (offset < chunk)
  picked = jnp.take_along_axis(logits, jnp.clip(offset, 0, chunk - 1)[:, None, None], axis=1)
  return jnp.where(in_chunk[:, None], picked[:, 0], last_logits), caches


@functools.partial(jax.jit, static_argnames=("graphdef", "attention_fn"))
def _prefill_chunk(graphdef, state, tokens, start, last_index, last_logits, caches,
                   attention_fn):
  """`prefill_step` of the model nnx.merge(graphdef, state), jitted."""
  return prefill_step(nnx.merge(graphdef, state), tokens, start, last_index, last_logits, caches,
                      attention_fn)


def decode_loop(model: Llama, logits: jax.Array, lengths: jax.Array, caches: Sequence[Any],
                key: jax.Array, stop_tokens: jax.Array, *, attention_fn: AttentionFn,
                max_new_tokens: int, sampling: SamplingParams,
                on_step: Callable[[Any, jax.Array], Any] | None = None,
                limit: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
  """Samples up to max_new_tokens per sequence in a `lax.while_loop` (traceable: call it in jit).

  logits: [B, V] of each prompt's last token; lengths: [B] position of the first generated
  token; stop_tokens: [N] int32. `on_step(caches, done)`, if given, updates the caches before
  every model step (done: [B] bool, sequences already stopped). limit: a traced scalar
  <= max_new_tokens that stops the loop earlier (so one compiled loop serves several lengths).
  Returns (tokens [B, max_new_tokens] int32, num_generated [B], stopped [B], final caches).
  """
  batch = lengths.shape[0]
  limit = max_new_tokens if limit is None else jnp.minimum(limit, max_new_tokens)

  def cond(carry):
    step, _, _, done, *_ = carry
    return (step < limit) & ~jnp.all(done)

  def body(carry):
    step, out, num, done, logits, caches, key = carry
    key, step_key = jax.random.split(key)
    token = sample_tokens(logits, step_key, sampling)
    hit_stop = jnp.isin(token, stop_tokens)
    out = out.at[:, step].set(jnp.where(done | hit_stop, 0, token))
    num = num + (~done & ~hit_stop)
    done = done | hit_stop
    if on_step is not None:
      caches = on_step(caches, done)
    positions = (lengths + step)[:, None]
    new_logits, caches = model(token[:, None], positions, caches, attention_fn)
    return step + 1, out, num, done, new_logits[:, 0], caches, key

  init = (jnp.int32(0), jnp.zeros((batch, max_new_tokens), jnp.int32),
          jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool), logits, caches, key)
  _, out, num, done, _, caches, _ = jax.lax.while_loop(cond, body, init)
  return out, num, done, caches


@functools.partial(jax.jit, static_argnames=("graphdef", "attention_fn", "max_new_tokens",
                                             "sampling"))
def _decode(graphdef, state, logits, lengths, caches, key, stop_tokens, *, attention_fn,
            max_new_tokens, sampling):
  """`decode_loop` of the model nnx.merge(graphdef, state), jitted; the caches are dropped.

  Returns (tokens [B, max_new_tokens] int32, num_generated [B], stopped [B]).
  """
  out, num, done, _ = decode_loop(nnx.merge(graphdef, state), logits, lengths, caches, key,
                                  stop_tokens, attention_fn=attention_fn,
                                  max_new_tokens=max_new_tokens, sampling=sampling)
  return out, num, done


def generate_tokens(model: Llama, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    sampling: SamplingParams = SamplingParams(),
                    stop_tokens: Sequence[int] | None = None, seed: int = 0,
                    prefill_chunk: int = 512, attention_fn: AttentionFn = dense_attention,
                    cache_dtype: Any = None) -> GenerationResult:
  """Generates a continuation for each prompt (lists of token ids, used as given).

  Prompts of different lengths are right-padded and prefilled in chunks of `prefill_chunk`
  tokens; every sequence then decodes from its own position. Generation of a sequence stops at
  any of `stop_tokens` (default: the model's EOS) or after `max_new_tokens`.
  """
  if max_new_tokens < 1:
    raise ValueError(f"{max_new_tokens=} must be >= 1")
  config = model.config
  stop_tokens = [config.eos_token_id] if stop_tokens is None else list(stop_tokens)
  longest = max(len(p) for p in prompts) if prompts else 0
  chunk = min(prefill_chunk, longest) if longest else prefill_chunk
  tokens, lengths = pad_prompts(prompts, chunk)
  capacity = longest + max_new_tokens
  if capacity > config.max_position_embeddings:
    raise ValueError(f"prompt ({longest} tokens) + {max_new_tokens=} exceeds the model's "
                     f"{config.max_position_embeddings=}")
  caches = init_kv_caches(config, len(prompts), capacity, cache_dtype)
  graphdef, state = nnx.split(model)
  last_logits = jnp.zeros((len(prompts), config.vocab_size), jnp.float32)
  last_index = jnp.asarray(lengths - 1)
  for start in range(0, tokens.shape[1], chunk):
    last_logits, caches = _prefill_chunk(graphdef, state, jnp.asarray(tokens[:, start:start + chunk]),
                                         jnp.int32(start), last_index, last_logits, caches,
                                         attention_fn)
  out, num, stopped = _decode(graphdef, state, last_logits, jnp.asarray(lengths), caches,
                              jax.random.key(seed), jnp.asarray(stop_tokens, jnp.int32),
                              attention_fn=attention_fn, max_new_tokens=max_new_tokens,
                              sampling=sampling)
  out, num, stopped = jax.device_get((out, num, stopped))
  return GenerationResult(token_ids=[row[:n].tolist() for row, n in zip(out, num)],
                          stopped=[bool(s) for s in stopped])
