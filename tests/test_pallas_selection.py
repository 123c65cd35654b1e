"""Tests of pallas_kernels.selection against numpy constructions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import selection
from pallas_kernels import synthetic

NUM_KV_HEADS, NUM_KEYS, NUM_CLUSTERS = 3, 300, 20


@pytest.fixture(scope="module")
def counts():
  counts = synthetic.random_counts(jax.random.key(0), NUM_KV_HEADS, NUM_KEYS,
                                   NUM_CLUSTERS)
  assert (np.asarray(counts) == 0).any(), "want some empty clusters"
  return counts


def _numpy_rows(keep, counts, offsets):
  """Concatenated row ranges of the kept non-empty clusters."""
  return np.concatenate(
      [np.arange(offsets[c], offsets[c + 1]) for c in range(len(counts))
       if keep[c] and counts[c] > 0] + [np.zeros(0, int)])


def test_compact_ranges_arbitrary_ranges():
  rng = np.random.default_rng(1)
  starts = rng.integers(0, 1000, (4, 9))
  sizes = rng.integers(0, 7, (4, 9))
  keep = rng.random((4, 9)) < 0.5
  indices, count = selection.compact_ranges(
      jnp.asarray(keep), jnp.asarray(starts), jnp.asarray(sizes), 40)
  for n in range(4):
    want = np.concatenate([np.arange(s, s + z) for s, z, k in
                           zip(starts[n], sizes[n], keep[n]) if k]
                          + [np.zeros(0, int)])[:40]
    assert count[n] == len(want)
    np.testing.assert_array_equal(indices[n, :len(want)], want)
    np.testing.assert_array_equal(indices[n, len(want):], 0)


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_threshold_selection_rows(counts, threshold):
  offsets = synthetic.offsets_from_counts(counts)
  scores = jax.random.uniform(jax.random.key(2), (2, NUM_KV_HEADS,
                                                  NUM_CLUSTERS))
  tau = -1.0 if threshold is None else threshold
  sel = selection.select_clusters(scores, counts, offsets, max_rows=NUM_KEYS,
                                  threshold=tau)
  keep = np.asarray(scores > tau)
  for b in range(2):
    for h in range(NUM_KV_HEADS):
      want = _numpy_rows(keep[b, h], np.asarray(counts[h]),
                         np.asarray(offsets[h]))
      assert sel.num_rows[b, h] == len(want)
      np.testing.assert_array_equal(sel.rows[b, h, :len(want)], want)
  if threshold is None:
    np.testing.assert_array_equal(sel.num_rows, NUM_KEYS)
  np.testing.assert_array_equal(sel.clusters,
                                keep & (np.asarray(counts)[None] > 0))


def test_truncation_and_empty_selection(counts):
  offsets = synthetic.offsets_from_counts(counts)
  scores = jnp.zeros((1, NUM_KV_HEADS, NUM_CLUSTERS)).at[0, 0].set(1.0)
  sel = selection.select_clusters(scores, counts, offsets, max_rows=37,
                                  threshold=0.5)
  np.testing.assert_array_equal(sel.num_rows[0], [37, 0, 0])
  np.testing.assert_array_equal(sel.rows[0, 0], np.arange(37))
  np.testing.assert_array_equal(sel.rows[0, 1:], 0)


def test_key_budget_takes_top_clusters_greedily(counts):
  offsets = synthetic.offsets_from_counts(counts)
  scores = jax.random.uniform(jax.random.key(3), (2, NUM_KV_HEADS,
                                                  NUM_CLUSTERS))
  budget = 70
  sel = selection.select_clusters(scores, counts, offsets, max_rows=budget,
                                  key_budget=budget)
  counts_np = np.asarray(counts)
  for b in range(2):
    for h in range(NUM_KV_HEADS):
      order = np.argsort(-np.asarray(scores[b, h]), kind="stable")
      order = [c for c in order if counts_np[h, c] > 0]
      taken = np.cumsum(counts_np[h, order]) <= budget
      keep = np.zeros(NUM_CLUSTERS, bool)
      keep[np.asarray(order)[taken]] = True
      np.testing.assert_array_equal(sel.clusters[b, h], keep)
      assert sel.num_rows[b, h] == counts_np[h, keep].sum() <= budget


def test_key_mask_marks_selected_rows(counts):
  offsets = synthetic.offsets_from_counts(counts)
  scores = jax.random.uniform(jax.random.key(4), (2, NUM_KV_HEADS,
                                                  NUM_CLUSTERS))
  sel = selection.select_clusters(scores, counts, offsets, max_rows=NUM_KEYS,
                                  threshold=0.3)
  labels = np.stack([np.repeat(np.arange(NUM_CLUSTERS), c)
                     for c in np.asarray(counts)])
  want = np.take_along_axis(np.asarray(scores > 0.3),
                            np.broadcast_to(labels, (2, *labels.shape)), -1)
  np.testing.assert_array_equal(selection.key_mask(sel, NUM_KEYS), want)


def test_argument_errors(counts):
  offsets = synthetic.offsets_from_counts(counts)
  scores = jnp.ones((1, NUM_KV_HEADS, NUM_CLUSTERS))
  with pytest.raises(ValueError, match="exactly one"):
    selection.select_clusters(scores, counts, offsets, max_rows=8)
  with pytest.raises(ValueError, match="key_budget"):
    selection.select_clusters(scores, counts, offsets, max_rows=8,
                              key_budget=9)
  with pytest.raises(ValueError, match="offsets.shape"):
    selection.select_clusters(scores, counts, offsets[:, 1:], max_rows=8,
                              threshold=0.1)


def test_budget_thresholds_keep_the_greedy_prefix_robustly(counts):
  scores = jax.random.uniform(jax.random.key(5), (3, NUM_KV_HEADS,
                                                  NUM_CLUSTERS))
  for budget in (1, 40, 70, NUM_KEYS):
    tau = selection.budget_thresholds(scores, counts, budget)
    assert tau.shape == (3, NUM_KV_HEADS) and bool((tau >= 0).all())
    want = selection.clusters_within_budget(scores, counts, budget)
    for noise in (1 - 1e-6, 1 + 1e-6):  # a kernel's rounding of the scores
      got = (scores * noise > tau[..., None]) & (counts[None] > 0)
      np.testing.assert_array_equal(got, want)
    kept_keys = jnp.where(want, counts[None], 0).sum(-1)
    assert int(kept_keys.max()) <= budget
  everything = selection.budget_thresholds(scores, counts, NUM_KEYS)
  np.testing.assert_array_equal(everything, 0.0)


def test_budget_thresholds_leave_ties_at_the_cut_and_zero_scores_out():
  counts = jnp.array([[5, 5, 5, 5]])
  scores = jnp.array([[[0.9, 0.5, 0.5, 0.0]]])
  tau = selection.budget_thresholds(scores, counts, key_budget=10)
  np.testing.assert_array_equal(scores > tau[..., None], [[[1, 0, 0, 0]]])
  tau = selection.budget_thresholds(scores, counts, key_budget=20)
  np.testing.assert_array_equal(scores > tau[..., None], [[[1, 1, 1, 0]]])


def test_budget_thresholds_take_a_budget_per_sequence_and_head(counts):
  scores = jax.random.uniform(jax.random.key(4), (2,) + counts.shape)
  budgets = jnp.array([[3, 11, 25], [0, 40, 1000]])
  tau = selection.budget_thresholds(scores, counts, budgets)
  for b in range(2):
    for h in range(counts.shape[0]):
      want = selection.budget_thresholds(scores, counts, int(budgets[b, h]))
      np.testing.assert_allclose(tau[b, h], want[b, h])

