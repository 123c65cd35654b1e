"""Tests for squeezed_jax.online.generate on stories260K: answers against a ~400-token context."""

import numpy as np
import pytest
from flax import nnx

from models.llama import PRESETS, Llama
from squeezed_jax import online
from squeezed_jax.online import MethodOptions, generate

QUESTIONS = [" Lily and the dog", " Then her mom said that they",
             " One day, the little dog ran to the big"]
NEW_TOKENS = 24
WITH_MASS = MethodOptions(measure_mass=True)


@pytest.fixture(scope="module")
def setup(stories, stories_context):
  model, tokenizer, _ = stories
  return model, stories_context, [tokenizer.encode(q, bos=False) for q in QUESTIONS]


@pytest.fixture(scope="module")
def dense_answer(setup):
  model, ctx, questions = setup
  return generate(model, ctx, questions[:1], method="dense", max_new_tokens=NEW_TOKENS,
                  stop_tokens=[], options=WITH_MASS)


def test_context_is_about_400_tokens(setup):
  _, ctx, questions = setup
  assert 380 <= ctx.num_tokens <= 450
  assert ctx.num_tokens + max(map(len, questions)) + NEW_TOKENS <= 512


def test_dense_reads_everything(dense_answer):
  np.testing.assert_allclose(dense_answer.kv_budget, 1.0)
  np.testing.assert_allclose(dense_answer.attention_mass, 1.0, atol=1e-5)


def test_squeezed_at_half_matches_dense_greedy(setup, dense_answer):
  model, ctx, questions = setup
  answer = generate(model, ctx, questions[:1], method="squeezed", percentile=0.5,
                    max_new_tokens=NEW_TOKENS, stop_tokens=[], options=WITH_MASS)
  assert answer.token_ids[0][:20] == dense_answer.token_ids[0][:20]
  mass = answer.attention_mass
  print(f"squeezed p=0.5: mean KV budget {answer.mean_kv_budget:.3f}, rows "
        f"{answer.rows_fraction.mean():.3f}, attention mass captured {mass.mean():.3f} "
        f"(min over layers/heads {mass.min():.3f})")
  assert answer.kv_budget.shape == (1, model.config.num_layers, model.config.num_kv_heads)
  assert 0.0 < answer.rows_fraction.mean() < 0.9  # something was pruned
  assert 0.5 < mass.mean() < 1.0
  # Centroids (K = 5% of S' vectors, keys only) add K / (2 S') to the rows read.
  num_clusters = ctx.clusters.centroids.shape[2]
  np.testing.assert_allclose(answer.kv_budget - answer.rows_fraction,
                             num_clusters / (2 * ctx.num_clustered), rtol=1e-5)
  assert answer.overflows.sum() == 0


def test_batch_of_three_equals_single_runs(setup):
  model, ctx, questions = setup
  assert len(set(map(len, questions))) == 3
  # Chunks of 4 tokens: a multi-chunk prefill whose padding must not reach the lookup.
  batch = generate(model, ctx, questions, method="squeezed", percentile=0.5,
                   max_new_tokens=NEW_TOKENS, stop_tokens=[], prefill_chunk=4,
                   options=WITH_MASS)
  for index, question in enumerate(questions):
    single = generate(model, ctx, [question], method="squeezed", percentile=0.5,
                      max_new_tokens=NEW_TOKENS, stop_tokens=[], prefill_chunk=4,
                      options=WITH_MASS)
    assert batch.token_ids[index] == single.token_ids[0]
    np.testing.assert_allclose(batch.kv_budget[index], single.kv_budget[0], rtol=1e-5)
    np.testing.assert_allclose(batch.attention_mass[index], single.attention_mass[0], atol=1e-4)


def test_key_budget_mode_stays_within_budget(setup):
  model, ctx, questions = setup
  answer = generate(model, ctx, questions[:1], method="squeezed", kv_budget=0.3,
                    max_new_tokens=4, stop_tokens=[])
  num_clusters = ctx.clusters.centroids.shape[2]
  assert answer.config.key_budget == int(0.3 * ctx.num_clustered - num_clusters / 2)
  assert answer.kv_budget.max() <= 0.3 + 1e-6  # rows + centroids
  assert answer.overflows.sum() == 0


@pytest.mark.parametrize("method, summary_vectors", [
    ("squeezed", lambda ctx: ctx.clusters.centroids.shape[2]),
    ("quest", lambda ctx: 2 * -(-ctx.num_clustered // 16)),
    ("oracle_topk", lambda ctx: 0),
])
def test_methods_at_one_kv_budget_read_the_same_bytes(setup, method, summary_vectors):
  model, ctx, questions = setup
  answer = generate(model, ctx, questions[:1], method=method, kv_budget=0.25, max_new_tokens=3,
                    stop_tokens=[])
  summary = summary_vectors(ctx) / (2 * ctx.num_clustered)
  np.testing.assert_allclose(answer.kv_budget - answer.rows_fraction, summary, rtol=1e-5)
  assert answer.config.key_budget == int(0.25 * ctx.num_clustered - summary_vectors(ctx) / 2)
  assert answer.kv_budget.max() <= 0.25 + 1e-6
  if method == "oracle_topk":  # keeps exactly its key budget
    np.testing.assert_allclose(answer.kv_budget, answer.config.key_budget / ctx.num_clustered)


def test_a_budget_the_summaries_alone_exceed_is_refused(setup):
  model, ctx, questions = setup
  with pytest.raises(ValueError, match="leaves no rows for quest"):
    generate(model, ctx, questions[:1], method="quest", kv_budget=0.06, max_new_tokens=2)


def test_context_of_another_model_is_refused(setup):
  _, ctx, questions = setup
  other = Llama(PRESETS["tiny"], rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="built for another model"):
    generate(other, ctx, questions, method="dense", max_new_tokens=2)


def test_bad_arguments(setup):
  model, ctx, questions = setup
  with pytest.raises(ValueError, match="must be one of"):
    generate(model, ctx, questions, method="flash", max_new_tokens=2)
  with pytest.raises(ValueError, match="exactly one of"):
    generate(model, ctx, questions, method="squeezed", percentile=0.5, kv_budget=0.5,
             max_new_tokens=2)
  with pytest.raises(ValueError, match="not calibrated"):
    generate(model, ctx, questions, method="squeezed", percentile=0.33, max_new_tokens=2)
  with pytest.raises(ValueError, match="hierarchical=True"):
    generate(model, ctx, questions, method="squeezed_hierarchical", percentile=0.5,
             max_new_tokens=2)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    generate(model, ctx, questions, method="dense", max_new_tokens=200)


def test_max_new_tokens_shares_one_compiled_decode_loop(setup, dense_answer):
  model, ctx, questions = setup
  short = generate(model, ctx, questions[:1], method="dense", max_new_tokens=NEW_TOKENS - 10,
                   stop_tokens=[])
  compiled = online._decode._cache_size()
  longer = generate(model, ctx, questions[:1], method="dense", max_new_tokens=NEW_TOKENS - 3,
                    stop_tokens=[])
  assert online._decode._cache_size() == compiled
  assert len(short.token_ids[0]) == NEW_TOKENS - 10 and len(longer.token_ids[0]) == NEW_TOKENS - 3
  assert longer.token_ids[0] == dense_answer.token_ids[0][:NEW_TOKENS - 3]
  assert short.token_ids[0] == dense_answer.token_ids[0][:NEW_TOKENS - 10]
