"""Restoring a saved `FixedContext` directly onto a mesh, whatever mesh it was saved from.

Saving needs nothing new: `FixedContext.save` hands its (possibly sharded) arrays to orbax,
which writes every array shard from the device that holds it (and only one copy of replicated
data). This module restores such a checkpoint with each array placed by the sharding rules
(`rules.fixed_context_axes`) on the given mesh: orbax reads, on each device, only the slices it
owns, so the context never has to fit on one device, and the saving mesh does not matter. The
arrays' shapes, dtypes and fingerprints are verified as `atomic_checkpoint.load` does.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from models.llama import Llama, LlamaConfig
from squeezed_jax import atomic_checkpoint
from squeezed_jax.fixed_context import (_ARRAY_FIELDS, _LAYER_FIELDS, FORMAT, ContextConfig,
                                        FixedContext)
from squeezed_jax.key_clustering import ClusteredKeys, HierarchicalClusteredKeys
from squeezed_jax.sharding.rules import fixed_context_axes, logical_sharding


def _from_named(arrays: Mapping[str, Any], config: ContextConfig,
                model_config: LlamaConfig) -> FixedContext:
  """A FixedContext from arrays (or ShapeDtypeStructs) named as `FixedContext.save` names them."""
  cluster_type = HierarchicalClusteredKeys if config.hierarchical else ClusteredKeys
  clusters = cluster_type(**{name: arrays[f"clusters.{name}"] for name in cluster_type._fields})
  per_layer = {name: tuple(arrays[f"{name}.{layer}"] for layer in range(model_config.num_layers))
               for name in _LAYER_FIELDS}
  return FixedContext(**{name: arrays.get(name) for name in _ARRAY_FIELDS}, **per_layer,
                      clusters=clusters, config=config, model_config=model_config)


def _named_leaves(ctx: FixedContext) -> dict[str, Any]:
  """The leaves of a FixedContext-shaped tree by their saved name (inverse of `_from_named`)."""
  named = {name: getattr(ctx, name) for name in _ARRAY_FIELDS if getattr(ctx, name) is not None}
  named.update({f"{name}.{layer}": leaf for name in _LAYER_FIELDS
                for layer, leaf in enumerate(getattr(ctx, name))})
  named.update({f"clusters.{name}": leaf for name, leaf in ctx.clusters._asdict().items()})
  return named


def load_fixed_context(directory: str, mesh: jax.sharding.Mesh, *,
                       model: Llama | None = None) -> FixedContext:
  """Reads a `FixedContext.save` artifact with every array sharded on `mesh` by the rules.

  With `model`, first checks that the context was built for it (CheckpointError otherwise).
  """
  version_dir, record = atomic_checkpoint.read_metadata(directory)
  metadata = record["metadata"]
  if metadata.get("format") != FORMAT:
    raise atomic_checkpoint.CheckpointError(
        f"{directory!r} is not a fixed context ({metadata.get('format')=}, expected {FORMAT})")
  config = ContextConfig(**{**metadata["config"],
                            "percentiles": tuple(metadata["config"]["percentiles"])})
  expected = record["arrays"]
  abstract = _from_named({name: jax.ShapeDtypeStruct(tuple(spec["shape"]), spec["dtype"])
                          for name, spec in expected.items()}, config,
                         LlamaConfig.from_hf_config(metadata["model_config"]))
  if model is not None:
    abstract.check_model(model)
    abstract = abstract.replace(model_config=model.config)
  shardings = jax.tree.map(lambda leaf, axes: logical_sharding(axes, leaf.shape, mesh),
                           abstract, fixed_context_axes(abstract))
  target = {name: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
            for (name, leaf), sharding in zip(_named_leaves(abstract).items(),
                                              _named_leaves(shardings).values())}
  try:
    arrays = ocp.StandardCheckpointer().restore(os.path.join(version_dir, "arrays"), target)
  except Exception as e:  # orbax/tensorstore raise many types for damaged files.
    raise atomic_checkpoint.CheckpointError(
        f"cannot read the arrays of checkpoint {directory!r}: {e}") from e
  for name, spec in expected.items():
    if int(atomic_checkpoint.fingerprint(arrays[name])) != spec["fingerprint"]:
      raise atomic_checkpoint.CheckpointError(
          f"array {name!r} of {directory!r} is corrupt (checksum mismatch)")
  return _from_named(arrays, config, abstract.model_config)
