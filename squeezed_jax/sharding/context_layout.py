"""The context-parallel layout of a fixed context: each `context` device holds whole clusters.

Rows of a (layer, KV head) are cluster-contiguous, so a consecutive run of clusters is a
consecutive run of rows. For P = mesh.shape["context"] devices, the K clusters of every
(layer, KV head) are cut into P groups of consecutive clusters, group p starting at the first
cluster whose first row is >= p * S' / P (so each group holds about S' / P rows, at most one
cluster more). Group p goes to context device p, padded to R rows and Kp clusters, R and Kp the
largest group over all layers and heads (one shape for every layer):

    keys[h, p * R + r]      row r of group p (zero padding past its rows)
    centroids[h, p * Kp + j], counts[h, p * Kp + j]      cluster j of group p (count 0: padding)
    offsets[h, p * (Kp + 1) + j]                          its first row, relative to the group

Padding rows belong to no cluster and padding clusters are empty, so neither is ever selected:
the layout holds the same clusters and rows as the unsharded one, in the same global order.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from squeezed_jax.fixed_context import FixedContext
from squeezed_jax.key_clustering import HierarchicalClusteredKeys
from squeezed_jax.sharding.mesh import CONTEXT, HEADS

CLUSTERED_SPEC = PartitionSpec(HEADS, CONTEXT, None)  # keys, values, centroids
PER_CLUSTER_SPEC = PartitionSpec(HEADS, CONTEXT)      # counts, offsets, cluster_ids
WINDOW_SPEC = PartitionSpec(HEADS, None, None)        # window keys / values


@flax.struct.dataclass
class ContextShards:
  """One layer of a fixed context in the context-parallel layout (P groups, see the module).

  keys, values: [Hkv, P * R, D], placed by CLUSTERED_SPEC.
  window_keys, window_values: [Hkv, W, D], split by heads only (every context device has it).
  centroids: [Hkv, P * Kp, D] float32; counts: [Hkv, P * Kp] int32 (0 for padding clusters).
  offsets: [Hkv, P * (Kp + 1)] int32, each group's cluster offsets relative to its first row.
  cluster_ids: [Hkv, P * Kp] int32, each cluster's index in the unsharded layout (-1: padding).
  threshold: scalar float32 tau of the lookup (None: budget or dense mode).
  num_clustered: S' (static), clustered keys per head without padding.
  num_clusters: K (static), clusters per head in the unsharded layout.
  """

  keys: jax.Array
  values: jax.Array
  window_keys: jax.Array
  window_values: jax.Array
  centroids: jax.Array
  counts: jax.Array
  offsets: jax.Array
  cluster_ids: jax.Array
  threshold: jax.Array | None
  num_clustered: int = flax.struct.field(pytree_node=False)
  num_clusters: int = flax.struct.field(pytree_node=False)

  @property
  def num_tokens(self) -> int:
    """S = S' + W, tokens of the fixed context (the first question token's position)."""
    return self.num_clustered + self.window_keys.shape[1]


def group_bounds(offsets: np.ndarray, num_groups: int) -> np.ndarray:
  """First cluster of each group: offsets [..., K + 1] -> bounds [..., P + 1] (0 ... K).

  Group p is clusters bounds[p] : bounds[p + 1]: those whose first row lies in
  [p * S' / P, (p + 1) * S' / P).
  """
  num_keys = offsets[..., -1:]
  targets = num_keys[..., None, :] * np.arange(1, num_groups)[:, None] / num_groups
  inner = (offsets[..., None, :-1] < targets).sum(axis=-1)
  num_clusters = offsets.shape[-1] - 1
  ends = np.full(inner.shape[:-1] + (1,), num_clusters)
  return np.concatenate([np.zeros_like(ends), inner, ends], axis=-1)


def _layout_indices(offsets: np.ndarray, bounds: np.ndarray, rows_per_group: int,
                    clusters_per_group: int) -> dict[str, np.ndarray]:
  """Gather indices of one layer: offsets [Hkv, K + 1], bounds [Hkv, P + 1].

  Returns "rows" [Hkv, P * R] (source row, -1 for padding), "clusters" [Hkv, P * Kp]
  (source cluster, -1 for padding) and "offsets" [Hkv, P * (Kp + 1)] (group-relative).
  """
  take = lambda index: np.take_along_axis(offsets, index.reshape(len(offsets), -1),
                                          axis=-1).reshape(index.shape)
  first, end = bounds[:, :-1, None], bounds[:, 1:, None]       # [Hkv, P, 1]
  first_row = take(first)
  clusters = first + np.arange(clusters_per_group)
  relative = take(np.minimum(first + np.arange(clusters_per_group + 1), end)) - first_row
  rows = first_row + np.arange(rows_per_group)
  num_heads = len(offsets)
  return {"rows": np.where(rows < take(end), rows, -1).reshape(num_heads, -1),
          "clusters": np.where(clusters < end, clusters, -1).reshape(num_heads, -1),
          "offsets": relative.reshape(num_heads, -1)}


def _gather(table: jax.Array, index: jax.Array) -> jax.Array:
  """table [Hkv, N, ...] rows at index [Hkv, M] (-1: zeros) -> [Hkv, M, ...]."""
  expand = index.reshape(index.shape + (1,) * (table.ndim - 2))
  picked = jnp.take_along_axis(table, jnp.maximum(expand, 0), axis=1)
  return jnp.where(expand >= 0, picked, jnp.zeros((), table.dtype))


def _relayout(keys: jax.Array, values: jax.Array, centroids: jax.Array, counts: jax.Array,
              row_index: jax.Array, cluster_index: jax.Array) -> tuple[jax.Array, ...]:
  """One layer's (keys, values [Hkv, S', D], centroids [Hkv, K, D], counts [Hkv, K]) gathered
  into the layout by row_index [Hkv, P * R] and cluster_index [Hkv, P * Kp]."""
  return (_gather(keys, row_index), _gather(values, row_index), _gather(centroids, cluster_index),
          _gather(counts, cluster_index))


def context_parallel_layers(ctx: FixedContext, mesh: jax.sharding.Mesh, *,
                            threshold: float | jax.Array | None = None
                            ) -> tuple[ContextShards, ...]:
  """Per-layer `ContextShards` of `ctx` for `mesh`'s context axis, placed on `mesh`.

  threshold: the lookup's tau (threshold mode), stored as a replicated traced scalar.
  Flat contexts only (the hierarchical lookup is not context-parallel).
  """
  if isinstance(ctx.clusters, HierarchicalClusteredKeys):
    raise ValueError("context parallelism supports flat contexts only (hierarchical lookup "
                     "is not sharded); build with ContextConfig(hierarchical=False)")
  num_kv_heads = ctx.keys[0].shape[0]
  if num_kv_heads % mesh.shape[HEADS]:
    raise ValueError(f"mesh axis heads={mesh.shape[HEADS]} must divide {num_kv_heads=}")
  num_groups = mesh.shape[CONTEXT]
  offsets = np.asarray(jax.device_get(ctx.clusters.offsets))
  bounds = group_bounds(offsets, num_groups)
  group_rows = np.diff(np.take_along_axis(offsets, bounds, axis=-1), axis=-1)
  rows_per_group = max(1, int(group_rows.max()))
  clusters_per_group = max(1, int(np.diff(bounds, axis=-1).max()))
  placed = lambda spec: NamedSharding(mesh, spec)
  relayout = jax.jit(_relayout, out_shardings=(
      placed(CLUSTERED_SPEC), placed(CLUSTERED_SPEC), placed(CLUSTERED_SPEC),
      placed(PER_CLUSTER_SPEC)))
  as_scalar = None if threshold is None else jax.device_put(
      jnp.asarray(threshold, jnp.float32), placed(PartitionSpec()))
  layers = []
  for layer in range(ctx.num_layers):
    index = _layout_indices(offsets[layer], bounds[layer], rows_per_group, clusters_per_group)
    keys, values, centroids, counts = relayout(
        ctx.keys[layer], ctx.values[layer], ctx.clusters.centroids[layer],
        ctx.clusters.counts[layer], jnp.asarray(index["rows"], jnp.int32),
        jnp.asarray(index["clusters"], jnp.int32))
    put = lambda array, spec: jax.device_put(jnp.asarray(array, jnp.int32), placed(spec))
    layers.append(ContextShards(
        keys=keys, values=values,
        window_keys=jax.device_put(ctx.window_keys[layer], placed(WINDOW_SPEC)),
        window_values=jax.device_put(ctx.window_values[layer], placed(WINDOW_SPEC)),
        centroids=centroids, counts=counts,
        offsets=put(index["offsets"], PER_CLUSTER_SPEC),
        cluster_ids=put(index["clusters"], PER_CLUSTER_SPEC),
        threshold=as_scalar, num_clustered=ctx.num_clustered,
        num_clusters=offsets.shape[-1] - 1))
  return tuple(jax.block_until_ready(layers))
