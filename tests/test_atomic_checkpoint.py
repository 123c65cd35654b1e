"""Tests for squeezed_jax.atomic_checkpoint: round trip, interrupted saves, corruption."""

import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from squeezed_jax import atomic_checkpoint as ckpt


def _arrays(seed):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"keys": jax.random.normal(k1, (2, 3, 5), jnp.bfloat16),
          "counts": jax.random.randint(k2, (4,), 0, 9, jnp.int32)}


def test_round_trip_is_bit_exact(tmp_path):
  arrays = _arrays(0)
  ckpt.save(str(tmp_path / "c"), arrays, {"note": "x", "p": [0.5]})
  loaded, metadata = ckpt.load(str(tmp_path / "c"))
  assert metadata == {"note": "x", "p": [0.5]}
  for name in arrays:
    assert loaded[name].dtype == arrays[name].dtype
    np.testing.assert_array_equal(np.asarray(loaded[name]), np.asarray(arrays[name]))


def test_fingerprint_sees_a_single_changed_element():
  x = jax.random.normal(jax.random.key(1), (4, 8, 16), jnp.bfloat16)
  assert int(ckpt.fingerprint(x)) == int(ckpt.fingerprint(x + 0))
  assert int(ckpt.fingerprint(x)) != int(ckpt.fingerprint(x.at[3, 7, 15].add(1)))
  swapped = x.at[0, 0, 0].set(x[0, 0, 1]).at[0, 0, 1].set(x[0, 0, 0])
  assert int(ckpt.fingerprint(x)) != int(ckpt.fingerprint(swapped))


def test_interrupted_save_leaves_previous_version_intact(tmp_path):
  directory = str(tmp_path / "c")
  old = _arrays(0)
  ckpt.save(directory, old, {"version": 1})
  with mock.patch.object(ckpt.json, "dump", side_effect=KeyboardInterrupt("killed")):
    with pytest.raises(KeyboardInterrupt):
      ckpt.save(directory, _arrays(1), {"version": 2})
  loaded, metadata = ckpt.load(directory)
  assert metadata == {"version": 1}
  np.testing.assert_array_equal(np.asarray(loaded["keys"]), np.asarray(old["keys"]))
  assert len([n for n in os.listdir(directory) if n.startswith("v-")]) == 1


def test_rerun_replaces_instead_of_accumulating(tmp_path):
  directory = str(tmp_path / "c")
  for seed in range(3):
    ckpt.save(directory, _arrays(seed), {"seed": seed})
  assert ckpt.load(directory)[1] == {"seed": 2}
  assert len([n for n in os.listdir(directory) if n.startswith("v-")]) == 1


def test_missing_and_partial_checkpoints_raise(tmp_path):
  with pytest.raises(ckpt.CheckpointError, match="no checkpoint directory"):
    ckpt.load(str(tmp_path / "absent"))
  os.makedirs(tmp_path / "partial" / "v-123")
  with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
    ckpt.load(str(tmp_path / "partial"))


def test_corrupt_array_is_named(tmp_path):
  directory = str(tmp_path / "c")
  ckpt.save(directory, _arrays(0), {})
  version_dir, record = ckpt.read_metadata(directory)
  record["arrays"]["counts"]["fingerprint"] ^= 1  # as if the stored bytes had changed
  with open(os.path.join(version_dir, "metadata.json"), "w") as f:
    ckpt.json.dump(record, f)
  with pytest.raises(ckpt.CheckpointError, match="'counts'.*corrupt"):
    ckpt.load(directory)


def test_damaged_array_files_raise(tmp_path):
  directory = str(tmp_path / "c")
  ckpt.save(directory, _arrays(0), {})
  version_dir, _ = ckpt.read_metadata(directory)
  for root, _, files in os.walk(os.path.join(version_dir, "arrays")):
    for name in files:
      if "manifest" in name or root.endswith("d"):
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(3)
  with pytest.raises(ckpt.CheckpointError):
    ckpt.load(directory)
