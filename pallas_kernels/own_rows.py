"""Each decode sequence's own K/V rows (its question and generated tokens).

A decode query attends the shared fixed context and, besides it, the rows of
its own sequence: the first `lengths[b]` rows of `keys[b]`. The GPU decode
kernels attend them in their reduce (`gpu/decode_reduce.py`), so the
context's partials and the own rows merge in one kernel; the other paths
attend them with `references.own_rows_attention` and merge by log-sum-exp.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from pallas_kernels import merge
from pallas_kernels import references


class OwnRows(NamedTuple):
  """keys, values: [B, T, Hkv, D]; lengths: [B] int32 rows attended (<= T)."""

  keys: jax.Array
  values: jax.Array
  lengths: jax.Array


def check(own: OwnRows, q: jax.Array, num_kv_heads: int) -> None:
  """Raises ValueError unless `own` fits decode queries q [B, Hq, D]."""
  batch, _, head_dim = q.shape
  if own.keys.shape != own.values.shape:
    raise ValueError(f"{own.keys.shape=} must equal {own.values.shape=}")
  if (own.keys.ndim != 4 or own.keys.shape[0] != batch
      or own.keys.shape[2:] != (num_kv_heads, head_dim)):
    raise ValueError(f"{own.keys.shape=} must be [B={batch}, T, "
                     f"Hkv={num_kv_heads}, D={head_dim}]")
  if own.lengths.shape != (batch,):
    raise ValueError(f"{own.lengths.shape=} must be {(batch,)}")


def merge_with(q: jax.Array, out: jax.Array, lse: jax.Array,
               own: OwnRows | None,
               sm_scale: float | None) -> tuple[jax.Array, jax.Array]:
  """(out, lse) of decode queries [B, Hq, D], merged in float32 with their
  own rows (unchanged when `own` is None); out keeps its dtype."""
  if own is None:
    return out, lse
  own_out, own_lse = references.own_rows_attention(q, *own,
                                                   sm_scale=sm_scale)
  merged, lse = merge.merge_partials(own_out, own_lse, out, lse)
  return merged.astype(out.dtype), lse
