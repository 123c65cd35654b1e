"""Tests for squeezed_jax.context_layers: per-layer views share the context's K/V buffers."""

import numpy as np

from squeezed_jax.context_layers import split_layers


def test_views_share_the_per_layer_buffers(stories_context):
  ctx = stories_context
  layers = split_layers(ctx, threshold=0.5)
  assert len(layers) == ctx.num_layers
  for index, layer in enumerate(layers):
    assert layer.keys is ctx.keys[index] and layer.values is ctx.values[index]
    assert layer.window_keys is ctx.window_keys[index]
    np.testing.assert_array_equal(layer.centroids, ctx.clusters.centroids[index])
    assert layer.num_tokens == ctx.num_tokens
    assert float(layer.threshold) == 0.5



def test_centroids_are_read_in_the_kv_dtype_unless_asked(stories_context):
  ctx = stories_context
  assert split_layers(ctx)[0].centroids.dtype == ctx.keys[0].dtype
  layer = split_layers(ctx, centroid_dtype="bfloat16")[1]
  assert layer.centroids.dtype == np.dtype("bfloat16")
  np.testing.assert_array_equal(
      np.asarray(layer.centroids, np.float32),
      np.asarray(ctx.clusters.centroids[1].astype("bfloat16"), np.float32))
