"""Tests of `squeezed_jax.training.checkpointing`: save every N, resume latest, clear errors."""

from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from squeezed_jax.atomic_checkpoint import CheckpointError
from squeezed_jax.training.checkpointing import TrainingCheckpoints


def _tree(seed):
  keys = jax.random.split(jax.random.key(seed), 2)
  return {"params": {"w": jax.random.normal(keys[0], (3, 4)),
                     "layers": [jax.random.normal(keys[1], (5,)).astype(jnp.bfloat16)]},
          "step": jnp.int32(seed)}


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_saves_every_n_steps_and_restores_the_latest(tmp_path):
  checkpoints = TrainingCheckpoints(str(tmp_path), save_every=2, max_to_keep=2)
  assert checkpoints.restore_latest(_tree(0)) is None
  assert not checkpoints.save(1, _tree(1), {"run": "a"})
  for step in (2, 4, 6):
    assert checkpoints.save(step, _tree(step), {"run": "a"})
  assert checkpoints.save(7, _tree(7), {"run": "a"}, force=True)
  assert not checkpoints.save(7, _tree(7), {"run": "a"}, force=True)
  assert checkpoints.latest_step() == 7
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["6", "7"]
  checkpoints.close()
  step, tree, metadata = TrainingCheckpoints(str(tmp_path), save_every=2).restore_latest(
      jax.tree.map(jnp.zeros_like, _tree(0)))
  assert (step, metadata) == (7, {"run": "a"})
  _assert_trees_equal(tree, _tree(7))


def test_an_interrupted_save_is_ignored(tmp_path):
  checkpoints = TrainingCheckpoints(str(tmp_path), save_every=1)
  checkpoints.save(3, _tree(3), {})
  # What a run killed while writing step 4 leaves behind: orbax's temporary directory.
  (tmp_path / "4.orbax-checkpoint-tmp-1234").mkdir()
  (tmp_path / "4.orbax-checkpoint-tmp-1234" / "junk").write_text("partial")
  reopened = TrainingCheckpoints(str(tmp_path), save_every=1)
  assert reopened.latest_step() == 3
  step, tree, _ = reopened.restore_latest(_tree(0))
  assert step == 3
  _assert_trees_equal(tree, _tree(3))


def test_corrupt_checkpoint_raises_naming_the_step(tmp_path):
  checkpoints = TrainingCheckpoints(str(tmp_path), save_every=1)
  checkpoints.save(5, _tree(5), {})
  for path in pathlib.Path(tmp_path, "5", "leaves").rglob("*"):
    if path.is_file() and path.stat().st_size > 0 and "metadata" not in path.name:
      path.write_bytes(b"\0garbage" * 3)
  with pytest.raises(CheckpointError, match=f"{os.sep}5'"):
    TrainingCheckpoints(str(tmp_path), save_every=1).restore_latest(_tree(0))


def test_another_structure_is_refused(tmp_path):
  checkpoints = TrainingCheckpoints(str(tmp_path), save_every=1)
  checkpoints.save(1, _tree(1), {})
  other = {"params": {"v": jnp.zeros((3, 4))}, "step": jnp.int32(0)}
  with pytest.raises(CheckpointError, match="another structure"):
    checkpoints.restore_latest(other)


def test_errors(tmp_path):
  with pytest.raises(ValueError, match="save_every=0"):
    TrainingCheckpoints(str(tmp_path), save_every=0)
  (tmp_path / "file").write_text("x")
  with pytest.raises(CheckpointError, match="not a directory"):
    TrainingCheckpoints(str(tmp_path / "file"), save_every=1)
