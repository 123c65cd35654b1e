"""Tests for squeezed_jax.inspection against float64 numpy references on the stories260K context."""

from __future__ import annotations

import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest

from models.llama import dense_attention
from squeezed_jax import inspection

matplotlib.use("Agg")

QUESTION = " Where was the dog?"
LAYER = 2
BUDGETS = (0.05, 0.2, 0.5, 1.0)


@pytest.fixture(scope="module")
def question(stories):
  return stories[1].encode(QUESTION, bos=False)


@pytest.fixture(scope="module")
def queries(stories, stories_context, question):
  return inspection.question_queries(stories[0], stories_context, question)


@pytest.fixture(scope="module")
def curves(stories_context, queries):
  return inspection.mass_vs_budget(stories_context, queries, layer=LAYER, budgets=BUDGETS,
                                   methods=inspection.CURVE_METHODS)


def _record_queries(q, k, v, positions, cache, layer):
  out, _ = dense_attention(q, k, v, positions, None, layer)
  return out, q


def _unit_scores(ctx, queries, layer):
  """float64 s_j(q) per (KV head, query head of the group, token, cluster): [Hkv, G, T, K]."""
  centroids = np.asarray(ctx.clusters.centroids[layer], np.float64)
  counts = np.asarray(ctx.clusters.counts[layer])
  num_kv_heads, _, head_dim = centroids.shape
  q = np.asarray(queries[layer], np.float64)  # [T, Hq, D]
  q = q.reshape(q.shape[0], num_kv_heads, -1, head_dim)
  logits = np.einsum("TKGD,KCD->KGTC", q, centroids) / np.sqrt(head_dim)
  logits = np.where(counts[:, None, None] > 0, logits, -np.inf)
  top = logits.max(-1, keepdims=True)
  weights = np.exp(logits - top)
  return weights / (weights * counts[:, None, None]).sum(-1, keepdims=True)


def _true_weights(ctx, queries, layer):
  """float64 attention weights over the clustered keys (reordered rows): [Hkv, G, T, S']."""
  keys = np.asarray(ctx.keys[layer], np.float64)
  num_kv_heads, _, head_dim = keys.shape
  q = np.asarray(queries[layer], np.float64)
  q = q.reshape(q.shape[0], num_kv_heads, -1, head_dim)
  logits = np.einsum("TKGD,KSD->KGTS", q, keys) / np.sqrt(head_dim)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  return weights / weights.sum(-1, keepdims=True)


def test_question_queries_are_the_models_queries(stories, stories_context, question, queries):
  model = stories[0]
  ids = np.asarray(stories_context.token_ids).tolist() + question
  _, recorded = model(jnp.asarray([ids]), jnp.arange(len(ids))[None], None, _record_queries)
  expected = np.stack([np.asarray(q[0, -len(question):]) for q in recorded])
  config = model.config
  assert queries.shape == (config.num_layers, len(question), config.num_heads, config.head_dim)
  np.testing.assert_allclose(queries, expected, rtol=1e-5, atol=1e-5)  # float32, other chunks


@pytest.mark.parametrize("percentile", [0.5, 0.9])
def test_threshold_selection_matches_the_score_definition(stories_context, queries, percentile):
  ctx = stories_context
  selection = inspection.select_for_question(ctx, queries, percentile=percentile)
  tau = float(ctx.threshold(percentile))
  labels = np.asarray(ctx.clusters.labels)
  for layer in range(ctx.num_layers):
    sbar = _unit_scores(ctx, queries, layer).mean(axis=2).max(axis=1)  # [Hkv, K]
    np.testing.assert_allclose(selection.scores[layer], sbar, rtol=1e-4, atol=1e-7)
    decided = np.abs(sbar - tau) > 1e-4 * tau  # leave out scores within rounding of tau
    np.testing.assert_array_equal(selection.clusters[layer][decided], (sbar > tau)[decided])
    np.testing.assert_array_equal(
        selection.keys[layer], np.take_along_axis(selection.clusters[layer], labels[layer], -1))
  assert 0.0 < selection.keys.mean() < 1.0


def test_budget_selection_keeps_the_top_clusters_within_the_budget(stories_context, queries):
  ctx = stories_context
  # 20% of the KV bytes, of which the centroids (keys only) take K / 2 rows' worth.
  budget = int(0.2 * ctx.num_clustered - ctx.clusters.centroids.shape[2] / 2)
  selection = inspection.select_for_question(ctx, queries, kv_budget=0.2)
  counts = np.asarray(ctx.clusters.counts)
  kept_keys = np.where(selection.clusters, counts, 0).sum(-1)
  assert (kept_keys <= budget).all()
  for layer, head in np.ndindex(counts.shape[:2]):
    scores = selection.scores[layer, head]
    kept = selection.clusters[layer, head]
    # Every cluster left out that would still fit scores below every kept one.
    room = budget - kept_keys[layer, head]
    fits = ~kept & (counts[layer, head] > 0) & (counts[layer, head] <= room)
    if kept.any() and fits.any():
      assert scores[fits].max() <= scores[kept].min()
  np.testing.assert_array_equal(selection.keys.sum(-1), kept_keys)


def test_oracle_curve_matches_float64_top_keys(stories_context, queries, curves):
  ctx = stories_context
  per_key = _true_weights(ctx, queries, LAYER).mean(axis=2)  # [Hkv, G, S'] mean over tokens
  order = np.argsort(-per_key.max(axis=1), axis=-1, kind="stable")
  for index, budget in enumerate(BUDGETS):
    count = round(budget * ctx.num_clustered)
    top = np.take_along_axis(per_key, order[:, None, :count], axis=-1)
    np.testing.assert_allclose(curves["oracle_topk"].mass[:, index], top.sum(-1).mean(-1),
                               atol=1e-4)
    np.testing.assert_allclose(curves["oracle_topk"].rows_fraction[:, index],
                               count / ctx.num_clustered)


def test_squeezed_curve_mass_is_that_of_its_clusters(stories_context, queries, curves):
  ctx = stories_context
  per_key = _true_weights(ctx, queries, LAYER).mean(axis=2)  # [Hkv, G, S']
  offsets = np.asarray(ctx.clusters.offsets[LAYER])
  counts = np.asarray(ctx.clusters.counts[LAYER])
  sbar = _unit_scores(ctx, queries, LAYER).mean(axis=2).max(axis=1)
  num_clusters = counts.shape[-1]
  for index, budget in enumerate(BUDGETS):
    count = round(budget * ctx.num_clustered)
    for head in range(counts.shape[0]):
      taken, mass = 0, 0.0
      for c in np.argsort(-sbar[head], kind="stable"):
        if counts[head, c] == 0 or taken + counts[head, c] > count:
          break
        taken += counts[head, c]
        mass += per_key[head, :, offsets[head, c]:offsets[head, c + 1]].sum(-1).mean()
      curve = curves["squeezed"]
      assert curve.rows_fraction[head, index] == pytest.approx(taken / ctx.num_clustered)
      assert curve.mass[head, index] == pytest.approx(mass, abs=1e-4)
      assert curve.kv_budget[head, index] == pytest.approx(
          (taken + num_clusters / 2) / ctx.num_clustered)


def test_every_curve_grows_with_the_budget_and_ends_at_all_the_mass(curves):
  for method, curve in curves.items():
    assert curve.mass.shape == curve.kv_budget.shape == (4, len(BUDGETS)), method
    assert (np.diff(curve.rows_fraction, axis=-1) >= 0).all(), method
    assert (np.diff(curve.mass, axis=-1) >= -1e-6).all(), method
    np.testing.assert_allclose(curve.mass[:, -1], 1.0, atol=1e-5, err_msg=method)
    assert (curve.kv_budget >= curve.rows_fraction).all(), method


def test_plots_draw_one_line_per_method_and_one_row_per_head(stories_context, queries, curves):
  ax = inspection.plot_mass_vs_budget(curves, kv_head=1)
  assert [line.get_label() for line in ax.get_lines()] == list(curves)
  np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), curves["squeezed"].mass[1])
  selection = inspection.select_for_question(stories_context, queries, percentile=0.7)
  ax = inspection.plot_selection(selection)
  config = stories_context.model_config
  assert len(ax.get_yticklabels()) == config.num_layers * config.num_kv_heads
  np.testing.assert_array_equal(ax.get_images()[0].get_array(),
                                selection.keys.reshape(-1, stories_context.num_clustered))


def test_bad_arguments_raise(stories_context, queries):
  with pytest.raises(ValueError, match="exactly one"):
    inspection.select_for_question(stories_context, queries)
  with pytest.raises(ValueError, match="queries must be"):
    inspection.select_for_question(stories_context, queries[:2], percentile=0.5)
  with pytest.raises(ValueError, match="layer"):
    inspection.mass_vs_budget(stories_context, queries, layer=99, budgets=[0.5])
  with pytest.raises(ValueError, match="methods"):
    inspection.mass_vs_budget(stories_context, queries, layer=0, budgets=[0.5],
                              methods=["dense"])
  with pytest.raises(ValueError, match="budget"):
    inspection.mass_vs_budget(stories_context, queries, layer=0, budgets=[1.5])
