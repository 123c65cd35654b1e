"""Logical-axis sharding rules: which mesh axis splits each named array axis.

Every array of a sharded run names its axes logically ("batch", "kv_heads", "clusters", ...);
`RULES` maps each logical name to a mesh axis of `mesh.py` (or None: replicated). A mesh axis
that does not divide an array's dimension is dropped for that array (replicated along it), so any
mesh is valid for storage; the context-parallel attention itself checks its divisibility needs.

  model weights   Megatron-style head parallelism: q/k/v projections split by output head,
                  o_proj by input head, the MLP by hidden unit (gate/up by column, down by row);
                  embeddings, lm_head and norms replicated. XLA (GSPMD) inserts the reductions.
  FixedContext    clustered K/V [Hkv, S', D] by (heads, context) rows; window and cluster
                  arrays by heads (the context-parallel layout of `context_layout.py` re-splits
                  the clusters across `context`).
  question caches OnlineCache's KV [B, T, Hkv, D] by (data, heads); statistics by data/heads.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from squeezed_jax.attention_methods import OnlineCache
from squeezed_jax.fixed_context import FixedContext
from squeezed_jax.sharding.mesh import CONTEXT, DATA, HEADS

RULES: dict[str, str | None] = {
    "batch": DATA,
    "q_heads": HEADS,
    "kv_heads": HEADS,
    "mlp": HEADS,
    "clusters": CONTEXT,
    "context_rows": CONTEXT,
    "layers": None,
    "embed": None,
    "vocab": None,
    "head_dim": None,
    "tokens": None,
    "window": None,
}

# Logical axes of the model's parameters, by the last name of their nnx path.
WEIGHT_AXES: dict[str, tuple[str, ...]] = {
    "q_proj": ("embed", "q_heads", "head_dim"),
    "k_proj": ("embed", "kv_heads", "head_dim"),
    "v_proj": ("embed", "kv_heads", "head_dim"),
    "o_proj": ("q_heads", "head_dim", "embed"),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
    "embedding": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "scale": ("embed",),
}


def logical_spec(axes: Sequence[str | None], shape: Sequence[int],
                 mesh: jax.sharding.Mesh) -> PartitionSpec:
  """The PartitionSpec of an array with logical `axes` and `shape` on `mesh`.

  A mesh axis is used only where its size divides the dimension (else that dimension is
  replicated).
  """
  if len(axes) != len(shape):
    raise ValueError(f"{len(axes)=} logical axes {tuple(axes)} for an array of {shape=}")
  spec = []
  for name, size in zip(axes, shape):
    mesh_axis = None if name is None else RULES[name]
    fits = mesh_axis is not None and size % mesh.shape[mesh_axis] == 0
    spec.append(mesh_axis if fits and mesh.shape[mesh_axis] > 1 else None)
  return PartitionSpec(*spec)


def logical_sharding(axes: Sequence[str | None], shape: Sequence[int],
                     mesh: jax.sharding.Mesh) -> NamedSharding:
  """`logical_spec` as a NamedSharding."""
  return NamedSharding(mesh, logical_spec(axes, shape, mesh))


def _place(tree: Any, axes_of: Any, mesh: jax.sharding.Mesh) -> Any:
  """device_put of every array leaf of `tree` by its logical axes (`axes_of`, same structure)."""
  return jax.tree.map(lambda x, axes: jax.device_put(x, logical_sharding(axes, x.shape, mesh)),
                      tree, axes_of)


def weight_axes(path: Sequence[Any], ndim: int) -> tuple[str | None, ...]:
  """Logical axes of the parameter at pytree `path` (its last string key names it)."""
  names = [key.key for key in path if isinstance(getattr(key, "key", None), str)]
  axes = WEIGHT_AXES.get(names[-1] if names else "")
  if axes is None or len(axes) != ndim:
    raise ValueError(f"no sharding rule for parameter {jax.tree_util.keystr(tuple(path))} "
                     f"({ndim=})")
  return axes


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
  """Places `model`'s parameters on `mesh` by `WEIGHT_AXES` (in place); returns the model."""
  state = nnx.state(model, nnx.Param)
  placed = jax.tree_util.tree_map_with_path(
      lambda path, x: jax.device_put(
          x, logical_sharding(weight_axes(path, x.ndim), x.shape, mesh)), state)
  nnx.update(model, placed)
  return model


def fixed_context_axes(ctx: FixedContext) -> FixedContext:
  """A FixedContext-shaped tree whose array leaves are replaced by their logical axes."""
  clustered = ("kv_heads", "context_rows", "head_dim")
  window = ("kv_heads", "window", "head_dim")
  per_layer = lambda axes: (axes,) * ctx.num_layers
  cluster_axes = {
      "centroids": ("layers", "kv_heads", None, "head_dim"),
      "counts": ("layers", "kv_heads", None),
      "offsets": ("layers", "kv_heads", None),
      "permutation": ("layers", "kv_heads", "context_rows"),
      "labels": ("layers", "kv_heads", "context_rows"),
      "coarse_centroids": ("layers", "kv_heads", None, "head_dim"),
      "coarse_counts": ("layers", "kv_heads", None),
      "coarse_offsets": ("layers", "kv_heads", None),
      "coarse_labels": ("layers", "kv_heads", None),
  }
  clusters = type(ctx.clusters)(**{name: cluster_axes[name] for name in ctx.clusters._fields})
  return ctx.replace(
      keys=per_layer(clustered), values=per_layer(clustered),
      window_keys=per_layer(window), window_values=per_layer(window), clusters=clusters,
      thresholds=(None,), kept_fraction=(None, "layers", "kv_heads"),
      coarse_thresholds=None if ctx.coarse_thresholds is None else (None,),
      token_ids=("tokens",))


def shard_fixed_context(ctx: FixedContext, mesh: jax.sharding.Mesh) -> FixedContext:
  """`ctx` with every array placed on `mesh` by `fixed_context_axes` (the storage layout)."""
  return _place(ctx, fixed_context_axes(ctx), mesh)


def online_cache_axes(cache: OnlineCache) -> OnlineCache:
  """An OnlineCache-shaped tree of logical axes (context not bound)."""
  kv = ("batch", None, "kv_heads", "head_dim")
  per_head = ("batch", "kv_heads")
  return cache.replace(
      kv=cache.kv.replace(keys=kv, values=kv),
      stats=cache.stats.replace(rows=per_head, summary_vectors=per_head, mass=per_head,
                                overflows=per_head, lookups=("batch",)),
      real_until=("batch",))


def shard_caches(caches: Sequence[OnlineCache], mesh: jax.sharding.Mesh
                 ) -> tuple[OnlineCache, ...]:
  """Places per-layer question caches (from `online.init_caches`) on `mesh`."""
  return tuple(_place(cache, online_cache_axes(cache), mesh) for cache in caches)
