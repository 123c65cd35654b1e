"""Training checkpoints with orbax: saved every N steps, the latest one resumed after a crash.

A checkpoint of step s is the directory `<dir>/<s>/`, written by `orbax.CheckpointManager`, which
writes into a temporary directory and renames it only once complete: a run killed mid-save leaves
the previous checkpoints as they were, and the temporary directory is ignored on resume.

Any pytree of arrays can be saved (here a `TrainState`): its leaves are stored under positional
names with their tree paths in the JSON metadata, and restored into the structure of a template
tree, after checking that the paths agree, so a checkpoint of another model or optimizer is
refused by name rather than loaded wrongly. Unreadable or damaged checkpoints raise
`CheckpointError` naming the step directory.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from squeezed_jax.atomic_checkpoint import CheckpointError

_LEAVES = "leaves"
_METADATA = "metadata"


def _leaf_name(index: int) -> str:
  return f"leaf_{index:05d}"


def _tree_paths(tree: Any) -> list[str]:
  return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


class TrainingCheckpoints:
  """Checkpoints of one training run in `directory`, keeping the `max_to_keep` latest."""

  def __init__(self, directory: str, *, save_every: int, max_to_keep: int = 2):
    if save_every < 1:
      raise ValueError(f"{save_every=} must be positive")
    self.directory = os.path.abspath(directory)
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise CheckpointError(f"checkpoint directory {self.directory!r} is not a directory")
    self.save_every = save_every
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=(_LEAVES, _METADATA),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    """The step of the latest complete checkpoint, or None."""
    return self._manager.latest_step()

  def save(self, step: int, tree: Any, metadata: Mapping[str, Any], *,
           force: bool = False) -> bool:
    """Saves `tree` as step `step` if step is a multiple of save_every (or `force`).

    metadata: JSON-serialisable facts kept with it (e.g. the run's settings). Returns whether a
    checkpoint was written.
    """
    if not force and step % self.save_every:
      return False
    if step in self._manager.all_steps():
      return False
    leaves = {_leaf_name(i): leaf for i, leaf in enumerate(jax.tree.leaves(tree))}
    record = {"paths": _tree_paths(tree), "run": dict(metadata)}
    self._manager.save(step, args=ocp.args.Composite(
        **{_LEAVES: ocp.args.StandardSave(leaves), _METADATA: ocp.args.JsonSave(record)}))
    self._manager.wait_until_finished()
    return True

  def restore_latest(self, template: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, tree, metadata) of the latest checkpoint, in `template`'s structure; None if none.

    template: a tree of arrays (or ShapeDtypeStructs) shaped like the saved one.
    Raises CheckpointError if the checkpoint is unreadable or was saved from another structure.
    """
    step = self.latest_step()
    if step is None:
      return None
    step_dir = os.path.join(self.directory, str(step))
    try:
      record = self._manager.restore(step, args=ocp.args.Composite(
          **{_METADATA: ocp.args.JsonRestore()}))[_METADATA]
    except Exception as e:  # orbax raises many types for damaged files.
      raise CheckpointError(f"cannot read the metadata of checkpoint {step_dir!r}: {e}") from e
    paths = _tree_paths(template)
    if record.get("paths") != paths:
      differing = sorted(set(paths).symmetric_difference(record.get("paths") or []))[:5]
      raise CheckpointError(f"checkpoint {step_dir!r} holds another structure than the one to "
                            f"restore (paths differing: {differing})")
    leaves, treedef = jax.tree.flatten(template)
    abstract = {_leaf_name(i): jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype)
                for i, leaf in enumerate(leaves)}
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          **{_LEAVES: ocp.args.StandardRestore(abstract)}))[_LEAVES]
    except Exception as e:  # orbax raises many types for damaged files.
      raise CheckpointError(f"cannot restore the arrays of checkpoint {step_dir!r} (delete it to "
                            f"resume from an earlier one): {e}") from e
    tree = jax.tree.unflatten(treedef, [restored[_leaf_name(i)] for i in range(len(leaves))])
    return step, tree, record["run"]

  def close(self) -> None:
    self._manager.close()
