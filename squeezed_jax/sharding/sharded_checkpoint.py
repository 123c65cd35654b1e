"""Restoring a saved `FixedContext` directly onto a mesh, whatever mesh it was saved from.

Saving needs nothing new: `FixedContext.save` hands its (possibly sharded) arrays to orbax,
which writes every array shard from the device that holds it (and only one copy of replicated
data). This module restores such a checkpoint with each array placed by the sharding rules
(`rules.fixed_context_axes`) on the given mesh: orbax reads, on each device, only the slices it
owns, so the context never has to fit on one device, and the saving mesh does not matter. The
arrays' shapes, dtypes and fingerprints are verified by `atomic_checkpoint.load`.
"""

from __future__ import annotations

import jax

from models.llama import Llama
from squeezed_jax.fixed_context import FixedContext
from squeezed_jax.sharding.rules import fixed_context_axes, logical_sharding


def load_fixed_context(directory: str, mesh: jax.sharding.Mesh, *,
                       model: Llama | None = None) -> FixedContext:
  """Reads a `FixedContext.save` artifact with every array sharded on `mesh` by the rules.

  With `model`, first checks that the context was built for it (CheckpointError otherwise).
  """
  abstract = FixedContext.read_abstract(directory, model=model)
  shardings = jax.tree.map(lambda leaf, axes: logical_sharding(axes, leaf.shape, mesh),
                           abstract, fixed_context_axes(abstract))
  return FixedContext.load(directory, model=model, shardings=shardings)
