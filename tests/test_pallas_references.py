"""Tests of pallas_kernels.references against float64 numpy loops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import references
from pallas_kernels import synthetic

NUM_KV_HEADS, NUM_KEYS, NUM_CLUSTERS, HEAD_DIM = 2, 200, 12, 16


@pytest.fixture(scope="module")
def context():
  return synthetic.clustered_context(
      jax.random.key(0), num_kv_heads=NUM_KV_HEADS, num_keys=NUM_KEYS,
      num_clusters=NUM_CLUSTERS, head_dim=HEAD_DIM, dtype=jnp.float32)


def _numpy_scores(q, centroids, counts, query_mask):
  """sbar by the layout's definition, one query and head at a time."""
  batch, tokens, num_heads, head_dim = q.shape
  num_kv_heads, num_clusters, _ = centroids.shape
  group = num_heads // num_kv_heads
  out = np.zeros((batch, num_kv_heads, num_clusters))
  for b in range(batch):
    for h in range(num_kv_heads):
      per_head = []
      for g in range(group):
        total = np.zeros(num_clusters)
        real = [t for t in range(tokens) if query_mask[b, t]]
        for t in real:
          logits = centroids[h] @ q[b, t, h * group + g] / np.sqrt(head_dim)
          nonempty = counts[h] > 0
          top = logits[nonempty].max()
          denom = (counts[h] * np.exp(logits - top))[nonempty].sum()
          total += np.where(nonempty, np.exp(logits - top) / denom, 0.0)
        per_head.append(total / max(len(real), 1))
      out[b, h] = np.max(per_head, axis=0)
  return out


@pytest.mark.parametrize("group", [1, 4])
def test_centroid_scores_matches_definition(context, group):
  q = jax.random.normal(jax.random.key(1), (2, 3, NUM_KV_HEADS * group,
                                            HEAD_DIM))
  mask = np.array([[True, False, True], [True, True, True]])
  got = references.centroid_scores(q, context.centroids, context.counts,
                                   query_mask=jnp.asarray(mask))
  want = _numpy_scores(np.asarray(q, np.float64),
                       np.asarray(context.centroids, np.float64),
                       np.asarray(context.counts), mask)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_centroid_scores_empty_clusters_and_overflow(context):
  counts = context.counts.at[:, 3].set(0)
  q = 1e3 * jax.random.normal(jax.random.key(2), (1, 2 * NUM_KV_HEADS,
                                                  HEAD_DIM))
  scores = references.centroid_scores(q, context.centroids, counts)
  assert np.isfinite(np.asarray(scores)).all()
  np.testing.assert_array_equal(scores[:, :, 3], 0.0)
  # With huge logits each query's mass sits on one cluster: N_j s_j ~ 1.
  weighted = np.asarray(scores) * np.asarray(counts)[None]
  np.testing.assert_allclose(weighted.max(axis=-1), 1.0, rtol=1e-3)


def test_decode_equals_one_token_prefill(context):
  q = jax.random.normal(jax.random.key(3), (3, 2 * NUM_KV_HEADS, HEAD_DIM))
  np.testing.assert_allclose(
      references.centroid_scores(q, context.centroids, context.counts),
      references.centroid_scores(q[:, None], context.centroids,
                                 context.counts), rtol=1e-6)


def test_hierarchical_keeping_everything_is_flat(context):
  coarse = synthetic.coarse_level(jax.random.key(4), context.centroids,
                                  context.counts, 4)
  q = jax.random.normal(jax.random.key(5), (2, 4, 2 * NUM_KV_HEADS, HEAD_DIM))
  fine, kept = references.hierarchical_centroid_scores(
      q, context.centroids, context.counts, *coarse, coarse_threshold=-1.0)
  assert np.asarray(kept).all()
  np.testing.assert_allclose(
      fine, references.centroid_scores(q, context.centroids, context.counts),
      rtol=1e-5)


def test_hierarchical_pruned_clusters_score_zero(context):
  coarse = synthetic.coarse_level(jax.random.key(6), context.centroids,
                                  context.counts, 4)
  q = jax.random.normal(jax.random.key(7), (2, 2 * NUM_KV_HEADS, HEAD_DIM))
  coarse_scores = references.centroid_scores(q, coarse[0], coarse[1])
  threshold = float(jnp.median(coarse_scores))
  fine, kept = references.hierarchical_centroid_scores(
      q, context.centroids, context.counts, *coarse,
      coarse_threshold=threshold)
  np.testing.assert_array_equal(kept, coarse_scores > threshold)
  offsets = np.asarray(coarse[2])
  for b in range(2):
    for h in range(NUM_KV_HEADS):
      for c in range(4):
        block = np.asarray(fine[b, h, offsets[h, c]:offsets[h, c + 1]])
        if not kept[b, h, c]:
          np.testing.assert_array_equal(block, 0.0)


def test_attention_matches_numpy(context):
  group = 2
  q = jax.random.normal(jax.random.key(8), (2, 3, NUM_KV_HEADS * group,
                                            HEAD_DIM))
  mask = jax.random.bernoulli(jax.random.key(9), 0.3,
                              (2, NUM_KV_HEADS, NUM_KEYS))
  mask = mask.at[1, 0].set(False)
  out, lse = references.attention(q, context.keys, context.values, mask)
  qn, kn, vn = (np.asarray(x, np.float64)
                for x in (q, context.keys, context.values))
  for b in range(2):
    for t in range(3):
      for n in range(NUM_KV_HEADS * group):
        h = n // group
        keep = np.asarray(mask[b, h])
        if not keep.any():
          assert lse[b, t, n] == -np.inf
          np.testing.assert_array_equal(out[b, t, n], 0.0)
          continue
        logits = kn[h][keep] @ qn[b, t, n] / np.sqrt(HEAD_DIM)
        want_lse = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
        weights = np.exp(logits - want_lse)
        np.testing.assert_allclose(lse[b, t, n], want_lse, rtol=1e-5)
        np.testing.assert_allclose(out[b, t, n], weights @ vn[h][keep],
                                   rtol=1e-4, atol=1e-5)


def test_softmax_with_lse_masks_rows_without_keys():
  logits = jnp.array([[0.5, -jnp.inf, 2.0], [-jnp.inf, -jnp.inf, -jnp.inf]])
  weights, lse = references.softmax_with_lse(logits)
  np.testing.assert_allclose(weights[0], jax.nn.softmax(logits[0]), rtol=1e-6)
  np.testing.assert_allclose(lse[0], np.log(np.exp(0.5) + np.exp(2.0)), rtol=1e-6)
  np.testing.assert_array_equal(weights[1], 0.0)
  assert np.isneginf(lse[1])
