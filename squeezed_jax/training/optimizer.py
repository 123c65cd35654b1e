"""AdamW with linear warm-up, cosine decay and global-norm gradient clipping (optax)."""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """peak_learning_rate is reached after warmup_steps, then decays by a cosine to
  final_learning_rate_fraction * peak at total_steps. Weight decay applies to matrices only."""

  peak_learning_rate: float = 2e-3
  warmup_steps: int = 200
  total_steps: int = 1000
  final_learning_rate_fraction: float = 0.1
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  b1: float = 0.9
  b2: float = 0.95

  def __post_init__(self):
    if not 0 <= self.warmup_steps < self.total_steps:
      raise ValueError(f"need 0 <= {self.warmup_steps=} < {self.total_steps=}")


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
  """0 -> peak linearly over warmup_steps, then cosine to the final fraction at total_steps."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.peak_learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=config.total_steps,
      end_value=config.peak_learning_rate * config.final_learning_rate_fraction)


def _is_matrix(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  """clip_by_global_norm(clip_norm), then AdamW (decay on >= 2-D parameters) on the schedule."""
  return optax.chain(
      optax.clip_by_global_norm(config.clip_norm),
      optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2,
                  weight_decay=config.weight_decay, mask=_is_matrix))
