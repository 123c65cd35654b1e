"""Tests for squeezed_jax.attention_methods: keeping every key, each method equals dense.

A real stories260K fixed context (hierarchical, so one build serves every method); two questions of
different lengths are prefilled together, then 20 teacher-forced decode steps follow. Logits must
match one dense forward over context + question + continuation within 1e-4 (float32).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.llama.checkpoint import load_checkpoint
from models.llama.tokenizer import load_tokenizer
from pallas_kernels import references, selection
from squeezed_jax import online
from squeezed_jax.attention_methods import MethodConfig, OnlineAttention, context_attention
from squeezed_jax.context_layers import page_summaries, split_layers
from squeezed_jax.fixed_context import ContextConfig, FixedContext
from squeezed_jax.generation import pad_prompts

ASSETS = os.path.join(os.path.dirname(__file__), os.pardir, "assets", "stories260K")
STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
         "park with her big red ball. One day, Lily saw a small dog under a tree. The dog was sad "
         "because it was lost. Lily wanted to help the dog find its home. ") * 2
DECODE_STEPS = 20


@pytest.fixture(scope="module")
def setup():
  model, _ = load_checkpoint(os.path.join(ASSETS, "stories260K.bin"))
  tokenizer = load_tokenizer(os.path.join(ASSETS, "tok512.bin"))
  ids = tokenizer.encode(STORY, bos=True)
  config = ContextConfig(observation_window=24, prefill_chunk=128, hierarchical=True,
                         percent_clusters=10.0, percent_clusters_coarse=3.0)
  ctx = FixedContext.build(model, ids, config)
  rng = np.random.default_rng(0)
  questions = [tokenizer.encode(" Where did Lily find the dog?", bos=False),
               tokenizer.encode(" The ball", bos=False)]
  follow = rng.integers(3, model.config.vocab_size, (2, DECODE_STEPS))
  return model, ctx, questions, follow


def _dense_reference(model, ctx, question, follow):
  """Logits of a dense forward over context + question + follow, at the question's positions
  and after each follow token: [len(question) + DECODE_STEPS, V]."""
  tokens = np.concatenate([np.asarray(ctx.token_ids), question, follow])
  logits, _ = model(jnp.asarray(tokens)[None], jnp.arange(len(tokens))[None])
  return np.asarray(logits[0, ctx.num_tokens:ctx.num_tokens + len(question) + DECODE_STEPS])


def _online_logits(model, ctx, questions, follow, config, **thresholds):
  """Prefill of both questions, then DECODE_STEPS teacher-forced steps, with `config`."""
  layers = split_layers(ctx, page_size=config.page_size if config.name == "quest" else None,
                        **thresholds)
  tokens, lengths = pad_prompts(questions, 1)
  capacity = tokens.shape[1] + DECODE_STEPS
  caches = online.init_caches(layers, jnp.asarray(lengths), capacity, jnp.float32)
  graphdef, state = nnx.split(model)
  attention = OnlineAttention(config)
  start = ctx.num_tokens
  positions = start + jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  logits, caches = online.forward(graphdef, state, layers, jnp.asarray(tokens), positions,
                                  caches, attention)
  got = [[row[:n]] for row, n in zip(np.asarray(logits), lengths)]
  caches = tuple(c.replace(real_until=jnp.full_like(c.real_until, capacity)) for c in caches)
  for step in range(DECODE_STEPS):
    positions = jnp.asarray(start + lengths + step)[:, None]
    logits, caches = online.forward(graphdef, state, layers, jnp.asarray(follow[:, step:step + 1]),
                                    positions, caches, attention)
    for rows, row in zip(got, np.asarray(logits)):
      rows.append(row[0])
  return [np.concatenate([rows[0], np.stack(rows[1:])]) for rows in got], caches


def _keep_everything(ctx, name):
  num_keys = ctx.num_clustered
  num_fine = ctx.clusters.centroids.shape[2]
  return {
      "dense": (MethodConfig("dense"), {}),
      "squeezed": (MethodConfig("squeezed", max_rows=num_keys), {"threshold": -1.0}),
      "squeezed_hierarchical": (
          MethodConfig("squeezed_hierarchical", max_rows=num_keys, max_fine_clusters=num_fine),
          {"threshold": -1.0, "coarse_threshold": -1.0}),
      "quest": (MethodConfig("quest", key_budget=num_keys), {}),
      "oracle_topk": (MethodConfig("oracle_topk", key_budget=num_keys), {}),
      "streaming": (MethodConfig("streaming", key_budget=num_keys), {}),
  }[name]


@pytest.mark.parametrize("name", ["dense", "squeezed", "squeezed_hierarchical", "quest",
                                  "oracle_topk", "streaming"])
def test_keeping_every_key_equals_dense(setup, name):
  model, ctx, questions, follow = setup
  config, thresholds = _keep_everything(ctx, name)
  got, caches = _online_logits(model, ctx, questions, follow, config, **thresholds)
  for question, row_follow, row_logits in zip(questions, follow, got):
    want = _dense_reference(model, ctx, np.asarray(question), row_follow)
    np.testing.assert_allclose(row_logits, want, atol=1e-4, rtol=0)
  num_keys = ctx.num_clustered
  for cache in caches:  # 1 prefill lookup + 20 decode lookups, each reading all S' rows
    np.testing.assert_array_equal(np.asarray(cache.stats.lookups), 1 + DECODE_STEPS)
    np.testing.assert_allclose(np.asarray(cache.stats.rows), (1 + DECODE_STEPS) * num_keys)
    assert int(cache.stats.overflows.sum()) == 0


def test_pruning_changes_the_output(setup):
  """The equality above is not vacuous: a real threshold reads fewer rows and moves the logits."""
  model, ctx, questions, follow = setup
  config = MethodConfig("squeezed", max_rows=ctx.num_clustered)
  got, caches = _online_logits(model, ctx, questions, follow, config,
                               threshold=float(ctx.threshold(0.9)))
  want = _dense_reference(model, ctx, np.asarray(questions[0]), follow[0])
  assert np.abs(got[0] - want).max() > 1e-3
  rows = np.stack([np.asarray(c.stats.rows) for c in caches])
  assert rows.max() < (1 + DECODE_STEPS) * ctx.num_clustered


@pytest.mark.parametrize("tokens", [1, 3])  # decode, prefill
def test_hierarchical_lookup_pays_for_its_fine_centroids(setup, tokens):
  """At a KV budget, a hierarchical lookup's keys are its key budget (the budget less the coarse
  centroids) less half a key per fine centroid it scored: exactly the reference's top clusters
  within that, so (rows + centroids / 2) / S' stays within the budget."""
  model, ctx, _, _ = setup
  kv_budget = 0.4
  config, _, coarse_tau = online.resolve_method(ctx, "squeezed_hierarchical",
                                                kv_budget=kv_budget)
  num_coarse = ctx.clusters.coarse_centroids.shape[2]
  assert config.key_budget == int(kv_budget * ctx.num_clustered - num_coarse / 2)
  layer = split_layers(ctx, coarse_threshold=coarse_tau)[1]
  q = jax.random.normal(jax.random.key(tokens), (2, tokens, model.config.num_heads,
                                                 model.config.head_dim))
  _, _, usage = context_attention(config, q, layer, jnp.ones((2, tokens), bool))

  scores, kept_coarse = references.hierarchical_centroid_scores(
      q if tokens > 1 else q[:, 0], layer.centroids, layer.counts, layer.coarse_centroids,
      layer.coarse_counts, layer.coarse_offsets, coarse_threshold=coarse_tau)
  scored = np.where(kept_coarse, np.diff(layer.coarse_offsets)[None], 0).sum(-1)
  assert (scored > 0).all() and len(np.unique(scored)) > 1
  key_budgets = config.key_budget - np.ceil(scored / 2)
  want = selection.select_clusters(scores, layer.counts, layer.offsets,
                                   max_rows=config.max_rows,
                                   key_budget=jnp.asarray(key_budgets, jnp.int32))
  np.testing.assert_array_equal(usage.rows, want.num_rows)
  np.testing.assert_array_equal(usage.summary_vectors, num_coarse + scored)
  used = (np.asarray(usage.rows) + np.asarray(usage.summary_vectors) / 2) / ctx.num_clustered
  assert used.max() <= kv_budget + 1e-6


def test_page_summaries_bound_every_key():
  rng = np.random.default_rng(1)
  keys = rng.normal(size=(2, 37, 4)).astype(np.float32)
  permutation = np.stack([rng.permutation(37) for _ in range(2)]).astype(np.int32)
  low, high = page_summaries(jnp.asarray(keys), jnp.asarray(permutation), 16)
  original = np.zeros_like(keys)
  for head in range(2):
    original[head, permutation[head]] = keys[head]
  for page in range(3):
    block = original[:, page * 16:(page + 1) * 16]
    np.testing.assert_allclose(np.asarray(low[:, page]), block.min(axis=1))
    np.testing.assert_allclose(np.asarray(high[:, page]), block.max(axis=1))


def test_bad_method_configs():
  with pytest.raises(ValueError, match="must be one of"):
    MethodConfig("flash")
  with pytest.raises(ValueError, match="max_rows"):
    MethodConfig("squeezed")
  with pytest.raises(ValueError, match="key_budget"):
    MethodConfig("quest")
