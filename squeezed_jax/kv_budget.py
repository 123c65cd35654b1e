"""KV budget accounting: what each lookup read of the fixed context, accumulated in the cache.

Every lookup (one prefill chunk or one decode step, per layer, KV head and sequence) reports the
clustered fixed-context rows it attends to and the summary vectors it scored (centroids, or
Quest's page bounds). As in the paper, summaries store keys only, so a summary vector costs half a
KV row: the budget of a lookup is (rows + summary_vectors / 2) / S', the fraction of the
clustered fixed context's KV bytes read (the observation window is read by every method and is
not counted).

A requested budget (`generate(kv_budget=)`) is accounted the same way: a method reads the rows
that remain after its summary vectors (`rows_within_budget`), so methods compared at one budget
read the same bytes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

# KV rows one summary vector costs: centroids and page bounds store keys, not values.
ROWS_PER_SUMMARY_VECTOR = 0.5


class LookupUsage(NamedTuple):
  """What one lookup read, per sequence and KV head ([B, Hkv] each).

  rows: clustered fixed-context rows attended. summary_vectors: centroid / page-summary vectors
  scored. overflow: the selection exceeded its static capacity and was truncated.
  mass: fraction of the clustered part's attention mass on the attended rows (mean over the
  real queries and the GQA group), or None when not measured.
  """

  rows: jax.Array
  summary_vectors: jax.Array
  overflow: jax.Array
  mass: jax.Array | None


@flax.struct.dataclass
class BudgetStats:
  """Sums over the lookups of the sequences that had a real query.

  rows, summary_vectors, mass: [B, Hkv] float32 sums of `LookupUsage` fields (mass stays 0 when
  not measured); overflows: [B, Hkv] int32 truncated lookups; lookups: [B] float32 count.
  """

  rows: jax.Array
  summary_vectors: jax.Array
  mass: jax.Array
  overflows: jax.Array
  lookups: jax.Array

  @classmethod
  def zeros(cls, batch: int, num_kv_heads: int) -> "BudgetStats":
    shape = (batch, num_kv_heads)
    return cls(rows=jnp.zeros(shape, jnp.float32), summary_vectors=jnp.zeros(shape, jnp.float32),
               mass=jnp.zeros(shape, jnp.float32), overflows=jnp.zeros(shape, jnp.int32),
               lookups=jnp.zeros((batch,), jnp.float32))

  def add(self, usage: LookupUsage, real: jax.Array) -> "BudgetStats":
    """Adds one lookup for the sequences with `real` [B] bool True."""
    counted = real[:, None]
    add = lambda total, value: total + jnp.where(counted, value, 0).astype(total.dtype)
    return BudgetStats(
        rows=add(self.rows, usage.rows),
        summary_vectors=add(self.summary_vectors, usage.summary_vectors),
        mass=self.mass if usage.mass is None else add(self.mass, usage.mass),
        overflows=add(self.overflows, usage.overflow),
        lookups=self.lookups + real.astype(jnp.float32))


def budget_fractions(stats: BudgetStats, num_clustered: int) -> dict[str, jax.Array]:
  """Per-lookup means as fractions of the clustered fixed context (S' = num_clustered keys).

  Returns [B, Hkv] arrays: "kv_budget" ((rows + summary_vectors / 2) / S'), "rows_fraction"
  (rows / S'), "summary_fraction" (summary_vectors / (2 S')), "attention_mass" (mean mass).
  """
  lookups = jnp.maximum(stats.lookups, 1.0)[:, None]
  rows = stats.rows / lookups / num_clustered
  summary = stats.summary_vectors * ROWS_PER_SUMMARY_VECTOR / lookups / num_clustered
  return {"kv_budget": rows + summary, "rows_fraction": rows, "summary_fraction": summary,
          "attention_mass": stats.mass / lookups}


class BudgetTooSmallError(ValueError):
  """A KV budget that the method's summary vectors alone exceed."""


def rows_within_budget(kv_budget: float, num_clustered: int, summary_vectors: float,
                       method: str) -> int:
  """The rows a lookup may read so that (rows + summary_vectors x ROWS_PER_SUMMARY_VECTOR) / S'
  <= kv_budget.

  Raises BudgetTooSmallError when the summaries alone take the whole budget.
  """
  rows = math.floor(kv_budget * num_clustered - summary_vectors * ROWS_PER_SUMMARY_VECTOR + 1e-6)
  if rows < 1:
    raise BudgetTooSmallError(
        f"{kv_budget=} leaves no rows for {method}: its {summary_vectors} summary vectors per "
        f"lookup alone cost {summary_vectors * ROWS_PER_SUMMARY_VECTOR / num_clustered:.4f} of "
        f"the fixed context's KV bytes ({num_clustered=} keys)")
  return min(rows, num_clustered)
