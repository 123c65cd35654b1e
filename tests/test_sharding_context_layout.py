"""Tests for squeezed_jax.sharding.context_layout's grouping of clusters (numpy, one device)."""

import numpy as np

from squeezed_jax.sharding.context_layout import _layout_indices, group_bounds


def test_groups_are_whole_consecutive_clusters_of_balanced_rows():
  rng = np.random.default_rng(0)
  for groups in (1, 2, 3, 8):
    counts = rng.integers(0, 9, (3, 17))
    offsets = np.concatenate([np.zeros((3, 1), int), np.cumsum(counts, -1)], axis=-1)
    bounds = group_bounds(offsets, groups)
    assert bounds.shape == (3, groups + 1)
    assert (bounds[:, 0] == 0).all() and (bounds[:, -1] == 17).all()
    assert (np.diff(bounds, axis=-1) >= 0).all()
    rows = np.diff(np.take_along_axis(offsets, bounds, -1), axis=-1)
    limit = offsets[:, -1:] / groups + counts.max(-1, keepdims=True)
    assert (rows <= limit).all(), (rows, limit)


def test_layout_indices_hold_every_row_and_cluster_once():
  rng = np.random.default_rng(1)
  counts = rng.integers(0, 6, (2, 11))
  offsets = np.concatenate([np.zeros((2, 1), int), np.cumsum(counts, -1)], axis=-1)
  bounds = group_bounds(offsets, 4)
  rows_per_group = int(np.diff(np.take_along_axis(offsets, bounds, -1), axis=-1).max())
  clusters_per_group = int(np.diff(bounds, axis=-1).max())
  index = _layout_indices(offsets, bounds, rows_per_group, clusters_per_group)
  for head in range(2):
    rows = index["rows"][head]
    np.testing.assert_array_equal(rows[rows >= 0], np.arange(offsets[head, -1]))
    clusters = index["clusters"][head]
    np.testing.assert_array_equal(clusters[clusters >= 0], np.arange(11))
    local = index["offsets"][head].reshape(4, clusters_per_group + 1)
    ids = clusters.reshape(4, clusters_per_group)
    sizes = np.where(ids >= 0, counts[head][np.maximum(ids, 0)], 0)
    np.testing.assert_array_equal(np.diff(local, axis=-1), sizes)
