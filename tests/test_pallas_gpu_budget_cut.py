"""gpu/budget_cut.py (interpret mode) vs selection.budget_thresholds.

The kernel must keep exactly the clusters the sort-based reference keeps, on
the same scores (`centroid_scores.single_pass_probs`, max over the group);
tau must lie at the midpoint between the lowest kept and the highest
left-out score (to 1e-6 relative). Where every cluster left out scores 0, the
reference puts tau at 0 and the kernel anywhere below the lowest kept score:
the same set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import selection
from pallas_kernels.gpu import budget_cut
from pallas_kernels.gpu import centroid_scores

NUM_KV_HEADS, NUM_PARTS, PADDED_PARTS = 3, 3, 4


def _lookup(batch, group, num_clusters, seed, tie=False):
  """Random single-pass outputs: logits [Hkv, Mp, Kp], lse parts, counts."""
  keys = jax.random.split(jax.random.key(seed), 4)
  rows = max(16, batch * group)
  width = -(-num_clusters // 16) * 16 + 16  # unwritten padding columns
  logits = 3.0 * jax.random.normal(keys[0], (NUM_KV_HEADS, rows, width))
  logits = jnp.where(jax.random.uniform(keys[1], logits.shape) < 0.1,
                     -jnp.inf, logits)
  if tie:  # clusters 1..4 score alike
    logits = logits.at[:, :, 1:5].set(logits[:, :, :1])
  parts = 3.0 + jax.random.normal(keys[2], (NUM_KV_HEADS, PADDED_PARTS, rows))
  counts = jax.random.randint(keys[3], (NUM_KV_HEADS, num_clusters), 0, 40)
  return logits, parts, counts.astype(jnp.int32)


def _reference_scores(logits, parts, batch, group, num_clusters):
  probs = centroid_scores.single_pass_probs(logits, parts, NUM_PARTS,
                                            batch * group, num_clusters)
  return jnp.swapaxes(
      probs.reshape(NUM_KV_HEADS, batch, group, num_clusters).max(axis=2),
      0, 1)


def _check_halfway(tau, scores, kept, counts):
  """tau lies halfway between the lowest kept and the highest left-out score
  where a cluster of positive score is left out (robust to a kernel's
  rounding); otherwise in [0, lowest kept score)."""
  left_out = ~kept & (counts[None] > 0) & (scores > 0)
  lowest_kept = jnp.where(kept, scores, jnp.inf).min(-1)
  highest_left = jnp.where(left_out, scores, -jnp.inf).max(-1)
  cut = left_out.any(-1) & kept.any(-1)
  np.testing.assert_allclose(jnp.where(cut, tau, 0.0),
                             jnp.where(cut, (lowest_kept + highest_left) / 2, 0.0),
                             rtol=1e-6)
  assert bool(jnp.all(left_out.any(-1) | ((tau >= 0) & (tau < lowest_kept))))


@pytest.mark.parametrize("batch,group,num_clusters",
                         [(1, 1, 37), (3, 4, 64), (2, 8, 200)])
def test_keeps_the_sorted_prefix_that_fits(batch, group, num_clusters):
  logits, parts, counts = _lookup(batch, group, num_clusters, seed=num_clusters)
  scores = _reference_scores(logits, parts, batch, group, num_clusters)
  total = int(counts.sum(axis=1).min())
  for key_budget in (0, 1, 57, total // 3, total - 1, 10 * total):
    got = budget_cut.budget_thresholds(
        logits, parts, NUM_PARTS, counts, key_budget, batch=batch,
        group=group, interpret=True)
    want = selection.budget_thresholds(scores, counts, key_budget)
    keep = lambda tau: (scores > tau[..., None]) & (counts[None] > 0)
    np.testing.assert_array_equal(keep(got), keep(want), err_msg=f"{key_budget=}")
    _check_halfway(got, scores, keep(got), counts)
    kept_keys = jnp.where(keep(got), counts[None], 0).sum(axis=-1)
    assert int(kept_keys.max()) <= max(key_budget, 0)


def test_ties_at_the_cut_are_left_out_together():
  batch, group, num_clusters = 2, 1, 50
  logits, parts, counts = _lookup(batch, group, num_clusters, seed=1, tie=True)
  counts = counts.at[:, :5].set(10)
  scores = _reference_scores(logits, parts, batch, group, num_clusters)
  keep = lambda tau: (scores > tau[..., None]) & (counts[None] > 0)
  ties_cut = False
  for key_budget in range(0, 400, 7):
    got = budget_cut.budget_thresholds(
        logits, parts, NUM_PARTS, counts, key_budget, batch=batch,
        group=group, interpret=True)
    want = selection.budget_thresholds(scores, counts, key_budget)
    np.testing.assert_array_equal(keep(got), keep(want), err_msg=f"{key_budget=}")
    tied = keep(got)[..., :5]
    ties_cut |= bool(jnp.any(~tied.all(-1) & tied.any(-1)))
  assert not ties_cut  # the five tied clusters are kept or left out together


def test_a_nan_score_takes_no_budget():
  logits, parts, counts = _lookup(1, 1, 20, seed=4)
  logits = logits.at[0, 0, 3].set(jnp.nan)
  counts = counts.at[0, 3].set(30)
  scores = _reference_scores(logits, parts, 1, 1, 20)[0, 0]
  others = (jnp.arange(20) != 3) & (scores > 0) & (counts[0] > 0)
  key_budget = int(jnp.where(others, counts[0], 0).sum())
  tau = budget_cut.budget_thresholds(logits, parts, NUM_PARTS, counts,
                                     key_budget, batch=1, group=1,
                                     interpret=True)[0, 0]
  # Had the NaN cluster been taken first, its 30 keys would push others out.
  assert bool(jnp.all(jnp.where(others, scores > tau, True)))
  assert np.isfinite(float(tau))


def test_a_budget_per_sequence_and_head():
  """A [B, Hkv] key budget: each pair's cut is the one of its own budget."""
  batch, group, num_clusters = 2, 2, 50
  logits, parts, counts = _lookup(batch, group, num_clusters, seed=5)
  scores = _reference_scores(logits, parts, batch, group, num_clusters)
  budgets = jnp.array([[0, 40, 300], [7, 1000, 120]], jnp.int32)
  got = budget_cut.budget_thresholds(logits, parts, NUM_PARTS, counts, budgets,
                                     batch=batch, group=group, interpret=True)
  keep = lambda tau: (scores > tau[..., None]) & (counts[None] > 0)
  for b in range(batch):
    for h in range(NUM_KV_HEADS):
      want = selection.budget_thresholds(scores, counts, int(budgets[b, h]))
      np.testing.assert_array_equal(keep(got)[b, h], keep(want)[b, h],
                                    err_msg=f"{b=} {h=}")

