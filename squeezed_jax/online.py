"""Online phase: answer a batch of questions against one shared `FixedContext`.

    answers = generate(model, ctx, questions, method="squeezed", percentile=0.9,
                       max_new_tokens=64)

Questions (token ids, without the context) are prefilled in chunks at positions S, S + 1, ...
(S = context tokens), then decoded in a jitted `lax.while_loop`, re-selecting the fixed-context
rows at every step and layer (`squeezed_jax.attention_methods`). The fixed context is split into
per-layer views once per call (`context_layers.split_layers`, sharing its per-layer K/V buffers);
inside the jitted steps those views
are bound to each layer's cache as loop constants, so neither the loop state nor any output holds
a copy of the context, and a batch of questions shares one copy.

Static capacities (shapes under jit):
  * threshold mode (`percentile`): max_rows = min(S', ceil(headroom * kappa * S')) with kappa the
    largest calibrated kept fraction of any (layer, KV head) at that percentile; rows beyond are
    dropped and reported as overflows.
  * budget mode (`kv_budget`, a fraction of the clustered fixed context's KV bytes, summaries
    included): key_budget = floor(kv_budget * S' - summary vectors / 2) keys per (sequence,
    layer, KV head) (`resolve_method`), max_rows = key_budget (never overflows). The
    hierarchical lookup's summaries are its coarse centroids, and each lookup also pays half a
    key per fine centroid it scores, so its keys are fewer by that much.
  * hierarchical: max_fine_clusters = min(K, ceil(headroom * (1 - coarse_percentile) * K)).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.llama import KVCache, Llama
from squeezed_jax import sharding
from squeezed_jax.attention_methods import (METHODS, SQUEEZED_METHODS, MethodConfig,
                                            OnlineAttention, OnlineCache)
from squeezed_jax.context_layers import ContextLayer, split_layers
from squeezed_jax.fixed_context import FixedContext
from squeezed_jax.generation import decode_loop, pad_prompts, prefill_step
from squeezed_jax.kv_budget import (ROWS_PER_SUMMARY_VECTOR, BudgetStats, budget_fractions,
                                     rows_within_budget)
from squeezed_jax.sampling import SamplingParams


# The question KV cache's length and the decode loop's output width are multiples of this, so
# that calls with similar question lengths and max_new_tokens share one compiled program.
CAPACITY_MULTIPLE = 64


def _round_up(size: int, cap: int) -> int:
  """`size` rounded up to a multiple of CAPACITY_MULTIPLE, at most `cap` (>= size)."""
  return min(-(-size // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE, cap)


@dataclasses.dataclass(frozen=True)
class MethodOptions:
  """Less common knobs of `generate`.

  threshold: an explicit fine tau, instead of the calibrated one of `percentile`.
  coarse_percentile / coarse_threshold: the hierarchical coarse tau (calibrated / explicit).
  max_rows, max_fine_clusters: explicit static capacities (see the module docstring).
  headroom: factor over the calibrated budget for the derived capacities.
  page_size: quest pages; sinks: streaming sink keys.
  measure_mass: also report the attention mass captured (costs a dense pass per lookup).
  backend: kernel backend of the squeezed methods (None = from the platform).
  centroid_dtype: dtype the lookups read the centroids in (None = the K/V dtype; see
    `context_layers.split_layers`).
  """

  threshold: float | None = None
  coarse_percentile: float = 0.5
  coarse_threshold: float | None = None
  max_rows: int | None = None
  max_fine_clusters: int | None = None
  headroom: float = 2.0
  page_size: int = 16
  sinks: int = 4
  measure_mass: bool = False
  backend: str | None = None
  centroid_dtype: str | None = None


@dataclasses.dataclass(frozen=True)
class Answers:
  """token_ids: per question, the generated ids without the stop token.

  stopped: per question, whether a stop token ended it.
  kv_budget: [B, L, Hkv] mean per lookup of (rows + summary vectors / 2) / S', the fraction of
    the clustered fixed context's KV bytes read (centroids / page bounds store keys only).
  rows_fraction: [B, L, Hkv] the same without the summaries.
  overflows: [B, L, Hkv] lookups whose selection was truncated to its static capacity.
  attention_mass: [B, L, Hkv] mean share of the clustered part's attention mass on the attended
    rows, or None unless measured.
  config: the resolved method settings.
  """

  token_ids: list[list[int]]
  stopped: list[bool]
  kv_budget: np.ndarray
  rows_fraction: np.ndarray
  overflows: np.ndarray
  attention_mass: np.ndarray | None
  config: MethodConfig

  @property
  def mean_kv_budget(self) -> float:
    """Mean of kv_budget over questions, layers and KV heads."""
    return float(self.kv_budget.mean())


def resolve_method(ctx: FixedContext, method: str, *, percentile: float | None = None,
                   kv_budget: float | None = None,
                   options: MethodOptions = MethodOptions()
                   ) -> tuple[MethodConfig, float | None, float | None]:
  """The static `MethodConfig` and the (fine, coarse) thresholds of a `generate` call.

  `kv_budget` is the fraction of the fixed context's KV bytes a lookup may read, summaries
  included (as `Answers.kv_budget` reports it): each method gets the rows that the budget leaves
  after its summary vectors (`summary_vectors`), so methods compared at one budget read the same
  bytes. At a `percentile`, a baseline gets the KV budget that flat `squeezed` spends there on
  average.
  """
  if method not in METHODS:
    raise ValueError(f"{method=} must be one of {METHODS}")
  num_keys = ctx.num_clustered
  choices = {"percentile": percentile, "kv_budget": kv_budget}
  if method in SQUEEZED_METHODS:
    choices["options.threshold"] = options.threshold
  given = [name for name, value in choices.items() if value is not None]
  if method != "dense" and len(given) != 1:
    raise ValueError(f"{method=} needs exactly one of {sorted(choices)}, got {given or 'none'}")
  if kv_budget is not None and not 0.0 < kv_budget <= 1.0:
    raise ValueError(f"{kv_budget=} must be in (0, 1]")
  if method == "dense":
    return MethodConfig("dense", measure_mass=options.measure_mass), None, None
  max_fine = None
  if method == "squeezed_hierarchical":
    num_fine = ctx.clusters.centroids.shape[2]
    max_fine = options.max_fine_clusters or max(1, min(num_fine, math.ceil(
        options.headroom * (1.0 - options.coarse_percentile) * num_fine)))
  if kv_budget is None and percentile is not None and method not in SQUEEZED_METHODS:
    kept = float(ctx.kept_fraction[ctx.percentile_index(percentile)].mean())
    kv_budget = kept + (summary_vectors(ctx, "squeezed", options) * ROWS_PER_SUMMARY_VECTOR
                        / num_keys)
  key_budget = None
  if kv_budget is not None:
    key_budget = rows_within_budget(kv_budget, num_keys, summary_vectors(ctx, method, options),
                                    method)
  if method not in SQUEEZED_METHODS:
    return MethodConfig(method, key_budget=key_budget, page_size=options.page_size,
                        sinks=options.sinks, measure_mass=options.measure_mass), None, None
  threshold = options.threshold
  if percentile is not None:
    threshold = float(ctx.threshold(percentile))
  max_rows = options.max_rows or key_budget
  if max_rows is None:
    kept = (1.0 if percentile is None
            else float(ctx.kept_fraction[ctx.percentile_index(percentile)].max()))
    max_rows = max(1, min(num_keys, math.ceil(options.headroom * kept * num_keys)))
  coarse_threshold = None
  if method == "squeezed_hierarchical":
    if ctx.coarse_thresholds is None:
      raise ValueError("squeezed_hierarchical needs a context built with "
                       "ContextConfig(hierarchical=True)")
    coarse_threshold = options.coarse_threshold
    if coarse_threshold is None:
      coarse_threshold = float(
          ctx.coarse_thresholds[ctx.percentile_index(options.coarse_percentile)])
  config = MethodConfig(method, max_rows=max_rows, key_budget=key_budget,
                        max_fine_clusters=max_fine, measure_mass=options.measure_mass,
                        backend=options.backend)
  return config, threshold, coarse_threshold


def summary_vectors(ctx: FixedContext, method: str, options: MethodOptions) -> int:
  """Summary vectors every lookup of `method` reads per (sequence, layer, KV head).

  squeezed: every centroid (K); squeezed_hierarchical: every coarse centroid (the fine ones it
  scores depend on the query, and each lookup pays for them from its key budget:
  `pallas_kernels.hierarchical.key_budget_after_fine_lookup`); quest: a min and a max vector
  per page; the others: none.
  """
  if method == "squeezed":
    return ctx.clusters.centroids.shape[2]
  if method == "squeezed_hierarchical":
    return ctx.clusters.coarse_centroids.shape[2]
  if method == "quest":
    return 2 * -(-ctx.num_clustered // options.page_size)
  return 0


def init_caches(layers: Sequence[ContextLayer], question_lengths: jax.Array, capacity: int,
                dtype: Any) -> tuple[OnlineCache, ...]:
  """Empty per-layer caches (context not bound) for B questions of `question_lengths` [B].

  Each holds a [B, capacity, Hkv, D] KV cache for question + generated tokens.
  """
  batch = question_lengths.shape[0]
  caches = []
  for layer in layers:
    num_kv_heads, _, head_dim = layer.keys.shape
    shape = (batch, capacity, num_kv_heads, head_dim)
    caches.append(OnlineCache(kv=KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)),
                              stats=BudgetStats.zeros(batch, num_kv_heads),
                              real_until=jnp.asarray(question_lengths, jnp.int32)))
  return tuple(caches)


def bind(attention: OnlineAttention, layers: Sequence[ContextLayer]):
  """An attention function over caches without context: binds `layers[layer]` per call."""

  def attend(q, k, v, positions, cache, layer):
    out, cache = attention(q, k, v, positions, cache.replace(context=layers[layer]), layer)
    return out, cache.replace(context=None)

  return attend


@functools.partial(jax.jit, static_argnames=("graphdef", "attention"))
def forward(graphdef, state, layers, tokens, positions, caches, attention: OnlineAttention):
  """One model call on question tokens [B, T] at positions [B, T] (>= S).

  The model is nnx.split(model); layers: `split_layers` output; caches: from `init_caches`.
  Returns (logits [B, T, V] float32, caches).
  """
  return nnx.merge(graphdef, state)(tokens, positions, caches, bind(attention, layers))


@functools.partial(jax.jit, static_argnames=("graphdef", "attention"))
def _prefill_chunk(graphdef, state, layers, tokens, start, last_index, last_logits, caches,
                   attention):
  return prefill_step(nnx.merge(graphdef, state), tokens, start, last_index, last_logits, caches,
                      bind(attention, layers))


def _mark_stopped(capacity: int):
  """on_step hook of the decode loop: a stopped sequence's queries stop counting."""

  def mark(caches, done):
    real_until = jnp.where(done, 0, capacity).astype(jnp.int32)
    return tuple(cache.replace(real_until=real_until) for cache in caches)

  return mark


@functools.partial(jax.jit, static_argnames=("graphdef", "attention", "max_new_tokens",
                                             "sampling"))
def _decode(graphdef, state, layers, logits, lengths, caches, key, stop_tokens, limit, *,
            attention, max_new_tokens, sampling):
  """Returns (tokens [B, max_new_tokens], num_generated [B], stopped [B], per-layer stats);
  generation stops after `limit` (traced) tokens."""
  capacity = caches[0].kv.capacity
  out, num, done, caches = decode_loop(
      nnx.merge(graphdef, state), logits, lengths, caches, key, stop_tokens,
      attention_fn=bind(attention, layers), max_new_tokens=max_new_tokens, sampling=sampling,
      on_step=_mark_stopped(capacity), limit=limit)
  return out, num, done, tuple(cache.stats for cache in caches)


def generate(model: Llama, ctx: FixedContext, questions: Sequence[Sequence[int]], *,
             method: str = "squeezed", percentile: float | None = None,
             kv_budget: float | None = None, max_new_tokens: int = 64,
             sampling: SamplingParams = SamplingParams(),
             stop_tokens: Sequence[int] | None = None, seed: int = 0, prefill_chunk: int = 512,
             options: MethodOptions = MethodOptions(),
             mesh: jax.sharding.Mesh | None = None) -> Answers:
  """Answers every question (token ids placed right after the context) against `ctx`.

  method: one of METHODS. The squeezed methods take exactly one of `percentile` (a calibrated
  pruned fraction: its threshold), `kv_budget` (fraction of the S' clustered keys per head) or
  options.threshold; the baselines take `percentile` (its mean calibrated budget) or
  `kv_budget`; dense takes neither. Generation stops at `stop_tokens` (default: EOS) or after
  `max_new_tokens`. mesh: run on several devices (`sharding.make_mesh`): the fixed-context
  attention context-parallel (methods dense and squeezed, flat contexts), the questions' caches
  sharded over data and heads; place the model first with `sharding.shard_model(model, mesh)`.
  """
  ctx.check_model(model)
  if max_new_tokens < 1:
    raise ValueError(f"{max_new_tokens=} must be >= 1")
  config, threshold, coarse_threshold = resolve_method(
      ctx, method, percentile=percentile, kv_budget=kv_budget, options=options)
  model_config = model.config
  stop_tokens = [model_config.eos_token_id] if stop_tokens is None else list(stop_tokens)
  longest = max((len(q) for q in questions), default=0)
  chunk = max(1, min(prefill_chunk, longest))
  tokens, lengths = pad_prompts(questions, chunk)
  context_length = ctx.num_tokens
  room = model_config.max_position_embeddings - context_length
  if longest + max_new_tokens > room:
    raise ValueError(f"context ({context_length} tokens) + longest question ({longest}) + "
                     f"{max_new_tokens=} exceeds the model's "
                     f"{model_config.max_position_embeddings=}")
  capacity = _round_up(longest + max_new_tokens, room)
  if mesh is None:
    layers = split_layers(ctx, threshold=threshold, coarse_threshold=coarse_threshold,
                          page_size=config.page_size if config.name == "quest" else None,
                          centroid_dtype=options.centroid_dtype)
    attention = OnlineAttention(config)
  else:
    layers = sharding.context_parallel_layers(ctx, mesh, threshold=threshold)
    attention = sharding.ShardedOnlineAttention(config, mesh)
  caches = init_caches(layers, jnp.asarray(lengths), capacity, model_config.dtype)
  if mesh is not None:
    caches = sharding.shard_caches(caches, mesh)
  graphdef, state = nnx.split(model)
  last_logits = jnp.zeros((len(questions), model_config.vocab_size), jnp.float32)
  last_index = jnp.asarray(context_length + lengths - 1)
  for start in range(0, tokens.shape[1], chunk):
    last_logits, caches = _prefill_chunk(
        graphdef, state, layers, jnp.asarray(tokens[:, start:start + chunk]),
        jnp.int32(context_length + start), last_index, last_logits, caches, attention)
  out, num, stopped, stats = _decode(
      graphdef, state, layers, last_logits, jnp.asarray(context_length + lengths), caches,
      jax.random.key(seed), jnp.asarray(stop_tokens, jnp.int32), jnp.int32(max_new_tokens),
      attention=attention, max_new_tokens=_round_up(max_new_tokens, room - longest),
      sampling=sampling)
  fractions = [budget_fractions(s, ctx.num_clustered) for s in stats]
  stack = lambda name: np.stack([np.asarray(f[name]) for f in fractions], axis=1)
  out, num, stopped = jax.device_get((out, num, stopped))
  return Answers(token_ids=[row[:n].tolist() for row, n in zip(out, num)],
                 stopped=[bool(s) for s in stopped],
                 kv_budget=stack("kv_budget"), rows_fraction=stack("rows_fraction"),
                 overflows=np.stack([np.asarray(s.overflows) for s in stats], axis=1),
                 attention_mass=stack("attention_mass") if config.measure_mass else None,
                 config=config)
