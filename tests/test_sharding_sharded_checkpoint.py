"""Tests for squeezed_jax.sharding.sharded_checkpoint: a FixedContext saved sharded on one mesh
restores bit-identical onto other meshes (subprocess with 8 CPU devices)."""

from tests.sharding_subprocess import run_check


def test_restore_onto_other_meshes():
  assert "restored equal on 4 meshes" in run_check("checkpoint")
