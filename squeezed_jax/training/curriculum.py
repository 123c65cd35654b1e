"""Sequence-length curriculum: stages of growing length, each with about the same tokens per batch.

One compiled train step per stage shape ([batch_size, seq_len]), so a few stages keep compilation
short. A stage's batch size is `tokens_per_batch // seq_len`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Stage:
  """Steps first_step .. end_step - 1 train on [batch_size, seq_len] batches."""

  seq_len: int
  batch_size: int
  first_step: int
  end_step: int


@dataclasses.dataclass(frozen=True)
class Curriculum:
  """Consecutive stages covering steps 0 .. total_steps - 1."""

  stages: tuple[Stage, ...]

  @property
  def total_steps(self) -> int:
    return self.stages[-1].end_step

  def stage_at(self, step: int) -> Stage:
    """The stage that trains step `step`."""
    for stage in self.stages:
      if stage.first_step <= step < stage.end_step:
        return stage
    raise ValueError(f"{step=} is outside the curriculum's 0..{self.total_steps - 1}")

  @classmethod
  def from_fractions(cls, seq_lens: Sequence[int], fractions: Sequence[float], *,
                     tokens_per_batch: int, total_steps: int) -> "Curriculum":
    """Stages of `seq_lens`, stage i taking about `fractions[i]` (normalised) of `total_steps`.

    Every stage gets at least one step; the last one ends at `total_steps`.
    """
    if len(seq_lens) != len(fractions) or not seq_lens:
      raise ValueError(f"need one fraction per sequence length, got {seq_lens=} {fractions=}")
    if min(fractions) <= 0:
      raise ValueError(f"{fractions=} must be positive")
    if total_steps < len(seq_lens):
      raise ValueError(f"{total_steps=} must give each of the {len(seq_lens)} stages a step")
    if max(seq_lens) > tokens_per_batch:
      raise ValueError(f"{tokens_per_batch=} must hold one sequence of {max(seq_lens)=}")
    total_fraction = sum(fractions)
    stages, first, cumulative = [], 0, 0.0
    for index, (seq_len, fraction) in enumerate(zip(seq_lens, fractions)):
      cumulative += fraction
      remaining_stages = len(seq_lens) - index - 1
      end = (total_steps if remaining_stages == 0 else
             min(max(first + 1, round(total_steps * cumulative / total_fraction)),
                 total_steps - remaining_stages))
      stages.append(Stage(seq_len=seq_len, batch_size=tokens_per_batch // seq_len,
                          first_step=first, end_step=end))
      first = end
    return cls(stages=tuple(stages))
