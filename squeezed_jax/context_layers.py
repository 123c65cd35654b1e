"""A `FixedContext` split into per-layer views, the form the online attention reads.

The model calls its attention function once per layer with that layer's cache, so every layer
needs its own [Hkv, ...] arrays. Slicing [L, ...] arrays inside the jitted decode step would hand
the kernels a fresh slice (a copy, where a custom kernel consumes it) at every step and layer.
A `FixedContext` keeps its K/V as one buffer per layer, which the views share (no copy); only the
small cluster arrays are sliced, once per call, outside jit. Every question and step then reads
the same buffers.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from squeezed_jax.fixed_context import FixedContext
from squeezed_jax.key_clustering import HierarchicalClusteredKeys


@flax.struct.dataclass
class ContextLayer:
  """One layer of a fixed context, shared by every question (no batch axis).

  keys, values: [Hkv, S', D] clustered part, rows reordered by fine cluster.
  window_keys, window_values: [Hkv, W, D] observation window, always attended.
  centroids: [Hkv, K, D] (in the K/V dtype unless asked otherwise); counts: [Hkv, K] int32;
    offsets: [Hkv, K + 1] int32.
  permutation: [Hkv, S'] int32, original position (0..S'-1) of each reordered row.
  coarse_centroids, coarse_counts, coarse_offsets: [Hkv, Kc, D], [Hkv, Kc], [Hkv, Kc + 1]
    (hierarchical contexts, else None).
  page_min, page_max: [Hkv, P, D] elementwise min / max of the keys of each page of
    `page_size` keys in original order (Quest's page summaries; None unless asked for).
  threshold, coarse_threshold: scalar float32 tau of the fine / coarse lookup (None if unused).
  """

  keys: jax.Array
  values: jax.Array
  window_keys: jax.Array
  window_values: jax.Array
  centroids: jax.Array
  counts: jax.Array
  offsets: jax.Array
  permutation: jax.Array
  coarse_centroids: jax.Array | None = None
  coarse_counts: jax.Array | None = None
  coarse_offsets: jax.Array | None = None
  page_min: jax.Array | None = None
  page_max: jax.Array | None = None
  threshold: jax.Array | None = None
  coarse_threshold: jax.Array | None = None

  @property
  def num_clustered(self) -> int:
    """S', keys of the clustered part."""
    return self.keys.shape[1]

  @property
  def num_tokens(self) -> int:
    """S = S' + W, tokens of the fixed context (the first question token's position)."""
    return self.keys.shape[1] + self.window_keys.shape[1]


def page_summaries(keys: jax.Array, permutation: jax.Array,
                   page_size: int) -> tuple[jax.Array, jax.Array]:
  """Quest's per-page key bounds over pages of `page_size` keys in original order.

  keys: [Hkv, S', D] cluster-reordered; permutation: [Hkv, S'] original position of each row.
  Returns (page_min, page_max), each [Hkv, ceil(S' / page_size), D] in float32; the last page
  may be partial (its bounds cover its real keys only).
  """
  num_kv_heads, num_keys, head_dim = keys.shape
  heads = jnp.arange(num_kv_heads)[:, None]
  original = jnp.zeros(keys.shape, jnp.float32).at[heads, permutation].set(
      keys.astype(jnp.float32))
  num_pages = -(-num_keys // page_size)
  pad = ((0, 0), (0, num_pages * page_size - num_keys), (0, 0))
  pages = lambda fill: jnp.pad(original, pad, constant_values=fill).reshape(
      num_kv_heads, num_pages, page_size, head_dim)
  return pages(jnp.inf).min(axis=2), pages(-jnp.inf).max(axis=2)


def split_layers(ctx: FixedContext, *, threshold: float | jax.Array | None = None,
                 coarse_threshold: float | jax.Array | None = None,
                 page_size: int | None = None,
                 centroid_dtype: jnp.dtype | str | None = None) -> tuple[ContextLayer, ...]:
  """Per-layer views of `ctx`: its per-layer K/V buffers, and slices of its cluster arrays.

  threshold, coarse_threshold: the lookup's tau values (stored as traced scalars, so another
  percentile does not recompile). page_size: also build Quest page summaries of that size.
  centroid_dtype: the dtype the lookups read the (fine and coarse) centroids in; None = the K/V
  dtype (bfloat16 centroids halve the lookup's reads, a third of a decode step's bytes at a 12.5%
  budget; the context stores them in float32).
  """
  clusters = ctx.clusters
  hierarchical = isinstance(clusters, HierarchicalClusteredKeys)
  as_scalar = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  centroid_dtype = centroid_dtype or ctx.keys[0].dtype
  layers = []
  for layer in range(ctx.num_layers):
    pick = lambda array, layer=layer: array[layer]
    page_min = page_max = None
    if page_size is not None:
      page_min, page_max = page_summaries(ctx.keys[layer], clusters.permutation[layer],
                                          page_size)
    layers.append(ContextLayer(
        keys=ctx.keys[layer], values=ctx.values[layer],
        window_keys=ctx.window_keys[layer], window_values=ctx.window_values[layer],
        centroids=pick(clusters.centroids).astype(centroid_dtype), counts=pick(clusters.counts),
        offsets=pick(clusters.offsets), permutation=pick(clusters.permutation),
        coarse_centroids=(pick(clusters.coarse_centroids).astype(centroid_dtype)
                          if hierarchical else None),
        coarse_counts=pick(clusters.coarse_counts) if hierarchical else None,
        coarse_offsets=pick(clusters.coarse_offsets) if hierarchical else None,
        page_min=page_min, page_max=page_max,
        threshold=as_scalar(threshold), coarse_threshold=as_scalar(coarse_threshold)))
  return tuple(jax.block_until_ready(layers))
