"""Tests for squeezed_jax.sharding.rules and mesh: PartitionSpecs of weights, contexts and caches
on an 8-device mesh (subprocess), and the mesh checks on this process's devices."""

import jax
import pytest

from squeezed_jax.sharding import MeshConfig, make_mesh
from squeezed_jax.sharding.mesh import mesh_config
from tests.sharding_subprocess import run_check


def test_partition_specs_on_eight_devices():
  assert "partition specs as documented" in run_check("rules")


def test_mesh_sizes_must_match_devices():
  devices = jax.devices()[:1]
  mesh = make_mesh(MeshConfig(), devices)
  assert mesh_config(mesh) == MeshConfig(1, 1, 1)
  with pytest.raises(ValueError, match="needs 2 devices, got len"):
    make_mesh(MeshConfig(context=2), devices)
  with pytest.raises(ValueError, match="must be >= 1"):
    MeshConfig(heads=0)
