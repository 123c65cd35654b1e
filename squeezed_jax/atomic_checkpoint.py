"""Atomic, verified orbax checkpoints of named arrays plus JSON metadata.

Layout of a checkpoint directory:

    <dir>/CURRENT          one line: the name of the complete version to read
    <dir>/v-<uuid>/arrays/ orbax checkpoint of the arrays
    <dir>/v-<uuid>/metadata.json

A save writes a whole new version beside the old one and only then replaces `CURRENT`
(`os.replace` is atomic), so an interrupted save leaves the previous checkpoint readable and
untouched. Every array's shape, dtype and a fingerprint (a position-weighted checksum computed on
device) are stored in the metadata and checked on load, so a corrupt or truncated array is reported
by name instead of being used.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

_CURRENT = "CURRENT"
_METADATA = "metadata.json"
_ARRAYS = "arrays"


class CheckpointError(ValueError):
  """A checkpoint is missing, partial, corrupt, or does not match what the caller expects."""


@jax.jit
def fingerprint(x: jax.Array) -> jax.Array:
  """A uint32 checksum of `x`'s bits, weighted by element position (any one change alters it)."""
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
  if width is None:
    raise ValueError(f"cannot fingerprint {x.dtype=}")
  words = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
  position = jnp.zeros(x.shape, jnp.uint32)
  for axis in range(x.ndim):
    position = position * jnp.uint32(0x01000193) ^ jax.lax.broadcasted_iota(jnp.uint32, x.shape,
                                                                            axis)
  weights = position * jnp.uint32(0x9E3779B1) | jnp.uint32(1)
  return jnp.sum(words * weights, dtype=jnp.uint32)


def _describe(arrays: Mapping[str, jax.Array]) -> dict[str, dict[str, Any]]:
  return {name: {"shape": list(a.shape), "dtype": str(a.dtype),
                 "fingerprint": int(fingerprint(jnp.asarray(a)))}
          for name, a in arrays.items()}


def save(directory: str, arrays: Mapping[str, jax.Array], metadata: Mapping[str, Any]) -> None:
  """Writes `arrays` and JSON-serialisable `metadata` as the new current version of `directory`."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  version = f"v-{uuid.uuid4().hex}"
  version_dir = os.path.join(directory, version)
  try:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(version_dir, _ARRAYS), dict(arrays))
    checkpointer.wait_until_finished()
    record = {"metadata": dict(metadata), "arrays": _describe(arrays)}
    with open(os.path.join(version_dir, _METADATA), "w") as f:
      json.dump(record, f, indent=1)
    pointer = os.path.join(directory, f".{_CURRENT}.{version}.tmp")
    with open(pointer, "w") as f:
      f.write(version + "\n")
    os.replace(pointer, os.path.join(directory, _CURRENT))
  except BaseException:
    shutil.rmtree(version_dir, ignore_errors=True)
    raise
  for name in os.listdir(directory):
    if name.startswith("v-") and name != version:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def read_metadata(directory: str) -> tuple[str, dict[str, Any]]:
  """Returns (version directory, record) of the current version; raises CheckpointError."""
  pointer = os.path.join(directory, _CURRENT)
  if not os.path.isdir(directory):
    raise CheckpointError(f"no checkpoint directory at {directory!r}")
  if not os.path.isfile(pointer):
    raise CheckpointError(f"{directory!r} holds no complete checkpoint (no {_CURRENT} file)")
  with open(pointer) as f:
    version_dir = os.path.join(directory, f.read().strip())
  metadata_path = os.path.join(version_dir, _METADATA)
  try:
    with open(metadata_path) as f:
      return version_dir, json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"unreadable checkpoint metadata {metadata_path!r}: {e}") from e


def load(directory: str, targets: Mapping[str, jax.ShapeDtypeStruct] | None = None
         ) -> tuple[dict[str, jax.Array], dict[str, Any]]:
  """Reads and verifies the current version: returns (arrays, metadata).

  targets: per array name, a ShapeDtypeStruct with the sharding to restore it with (orbax then
  reads on each device only the slices it holds); None restores every array as saved.
  """
  version_dir, record = read_metadata(directory)
  expected = record["arrays"]
  try:
    arrays = ocp.StandardCheckpointer().restore(
        os.path.join(version_dir, _ARRAYS), None if targets is None else dict(targets))
  except Exception as e:  # orbax/tensorstore raise many types for damaged files.
    raise CheckpointError(f"cannot read the arrays of checkpoint {directory!r}: {e}") from e
  missing = sorted(set(expected) - set(arrays))
  if missing:
    raise CheckpointError(f"checkpoint {directory!r} lacks arrays {missing}")
  for name, spec in expected.items():
    array = jnp.asarray(arrays[name])
    got = {"shape": list(array.shape), "dtype": str(array.dtype)}
    if got != {"shape": spec["shape"], "dtype": spec["dtype"]}:
      raise CheckpointError(f"array {name!r} of {directory!r} is {got}, expected "
                            f"shape {spec['shape']} dtype {spec['dtype']}")
    if int(fingerprint(array)) != spec["fingerprint"]:
      raise CheckpointError(f"array {name!r} of {directory!r} is corrupt (checksum mismatch)")
    arrays[name] = array
  return {name: arrays[name] for name in expected}, record["metadata"]

