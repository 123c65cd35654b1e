"""Tests for squeezed_jax.fixed_context: build on real weights, save/load, wrong-model errors."""

import jax
import numpy as np
import pytest
from flax import nnx

from models.llama import PRESETS, Llama
from squeezed_jax import atomic_checkpoint
from squeezed_jax.context_prefill import prefill_context
from squeezed_jax.fixed_context import ContextConfig, FixedContext

def test_build_layout_on_real_weights(stories, stories_context):
  model, _, ids = stories
  context = stories_context
  config = model.config
  clustered = len(ids) - 32
  num_clusters = int(np.ceil(0.05 * clustered))
  assert context.num_layers == config.num_layers and context.num_clustered == clustered
  for name, length in (("keys", clustered), ("values", clustered), ("window_keys", 32),
                       ("window_values", 32)):
    assert [x.shape for x in getattr(context, name)] == (
        [(config.num_kv_heads, length, config.head_dim)] * config.num_layers), name
  assert context.clusters.centroids.shape[2] == num_clusters
  counts = np.asarray(context.clusters.counts)
  assert (counts.sum(-1) == clustered).all()
  # Reordered keys of cluster c average to its centroid (the mean of un-normalised keys).
  keys, offsets = np.stack(context.keys), np.asarray(context.clusters.offsets)
  centroids = np.asarray(context.clusters.centroids)
  for layer, head in [(0, 0), (config.num_layers - 1, config.num_kv_heads - 1)]:
    for c in np.flatnonzero(counts[layer, head])[:5]:
      rows = keys[layer, head, offsets[layer, head, c]:offsets[layer, head, c + 1]]
      np.testing.assert_allclose(rows.mean(0), centroids[layer, head, c], atol=1e-5)


def test_cache_is_the_prefill_reordered_and_split(stories, stories_context):
  model, _, ids = stories
  ctx = stories_context
  prefilled = prefill_context(model, ids, window=32, chunk_size=128)
  permutation = np.asarray(ctx.clusters.permutation)
  for layer in (0, ctx.num_layers - 1):
    for name in ("keys", "values"):
      full = np.asarray(getattr(prefilled, name)[layer])
      np.testing.assert_array_equal(
          np.asarray(getattr(ctx, name)[layer]),
          np.take_along_axis(full[:, :ctx.num_clustered], permutation[layer][..., None], axis=1))
      np.testing.assert_array_equal(np.asarray(getattr(ctx, f"window_{name}")[layer]),
                                    full[:, ctx.num_clustered:])


def test_thresholds_prune_the_calibrated_fraction(stories_context):
  context = stories_context
  percentiles = np.array(context.config.percentiles)
  thresholds = np.asarray(context.thresholds)
  assert np.all(np.diff(thresholds) >= 0), "a larger pruned fraction needs a higher threshold"
  kept = np.asarray(context.kept_fraction).mean(axis=(1, 2))
  # Pooled over all heads, the kept fraction is 1 - p up to the granularity of a cluster.
  np.testing.assert_allclose(kept, 1 - percentiles, atol=0.1)
  with pytest.raises(ValueError, match="not calibrated"):
    context.threshold(0.33)
  assert float(context.threshold(0.9)) == float(thresholds[-1])


def test_save_load_round_trip_is_bit_exact(stories, stories_context, tmp_path):
  model, _, _ = stories
  context = stories_context
  context.save(str(tmp_path / "ctx"))
  loaded = FixedContext.load(str(tmp_path / "ctx"), model=model)
  assert loaded.config == context.config
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(context)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_load_into_another_model_fails_clearly(stories_context, tmp_path):
  stories_context.save(str(tmp_path / "ctx"))
  other = Llama(PRESETS["tiny"], rngs=nnx.Rngs(0))
  with pytest.raises(atomic_checkpoint.CheckpointError, match="built for another model"):
    FixedContext.load(str(tmp_path / "ctx"), model=other)


def test_load_of_other_artifact_or_missing_dir_fails(tmp_path):
  atomic_checkpoint.save(str(tmp_path / "other"), {"x": jax.numpy.ones(3)}, {"format": "x"})
  with pytest.raises(atomic_checkpoint.CheckpointError, match="not a fixed context"):
    FixedContext.load(str(tmp_path / "other"))
  with pytest.raises(atomic_checkpoint.CheckpointError, match="no checkpoint directory"):
    FixedContext.load(str(tmp_path / "missing"))


def test_hierarchical_build(stories):
  model, _, ids = stories
  config = ContextConfig(observation_window=32, prefill_chunk=128, hierarchical=True,
                         percent_clusters=10.0, percent_clusters_coarse=2.0)
  context = FixedContext.build(model, ids, config)
  clusters = context.clusters
  coarse_counts = np.asarray(clusters.coarse_counts)
  assert (coarse_counts.sum(-1) == context.num_clustered).all()
  assert context.coarse_thresholds.shape == (len(config.percentiles),)
  # Keys of one coarse cluster are contiguous: fine ranges chained by coarse_offsets.
  fine_offsets = np.asarray(clusters.offsets)
  coarse_offsets = np.asarray(clusters.coarse_offsets)
  rows_per_coarse = np.diff(np.take_along_axis(fine_offsets, coarse_offsets, axis=-1), axis=-1)
  np.testing.assert_array_equal(rows_per_coarse, coarse_counts)


def test_bad_config_values():
  with pytest.raises(ValueError, match="percentiles"):
    ContextConfig(percentiles=(0.5, 1.0))
  with pytest.raises(ValueError, match="percent_clusters_coarse"):
    ContextConfig(hierarchical=True, percent_clusters=1.0, percent_clusters_coarse=5.0)
