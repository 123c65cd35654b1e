"""The device mesh of a sharded run: axes for questions (data), heads and the fixed context.

    mesh = make_mesh(MeshConfig(data=2, heads=2, context=2))   # 8 devices

`data` splits the batch of questions, `heads` the attention heads (and the MLP's hidden units),
`context` the fixed context's clusters. The product of the three sizes must be the number of
devices used (all of `jax.devices()` unless `devices` is given).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np

DATA = "data"
HEADS = "heads"
CONTEXT = "context"
AXES = (DATA, HEADS, CONTEXT)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes (each >= 1)."""

  data: int = 1
  heads: int = 1
  context: int = 1

  def __post_init__(self):
    for name in AXES:
      if getattr(self, name) < 1:
        raise ValueError(f"mesh axis {name}={getattr(self, name)} must be >= 1")

  @property
  def shape(self) -> tuple[int, int, int]:
    """(data, heads, context)."""
    return (self.data, self.heads, self.context)

  @property
  def num_devices(self) -> int:
    return math.prod(self.shape)


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None
              ) -> jax.sharding.Mesh:
  """A `Mesh` with axes ("data", "heads", "context") over `devices` (default: all of them).

  Raises ValueError when the axis sizes do not multiply to the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  if config.num_devices != len(devices):
    raise ValueError(f"mesh {dict(zip(AXES, config.shape))} needs {config.num_devices} devices, "
                     f"got {len(devices)=}")
  return jax.sharding.Mesh(np.asarray(devices).reshape(config.shape), AXES)


def mesh_config(mesh: jax.sharding.Mesh) -> MeshConfig:
  """The `MeshConfig` of a mesh made by `make_mesh`."""
  missing = [name for name in AXES if name not in mesh.shape]
  if missing:
    raise ValueError(f"mesh axes {tuple(mesh.shape)} lack {missing}; use make_mesh")
  return MeshConfig(**{name: mesh.shape[name] for name in AXES})
