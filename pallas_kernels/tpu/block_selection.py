"""Block-granular selection for the TPU: K/V blocks plus a per-row mask.

TPU DMAs move whole tiles, so the TPU kernel reads blocks of `block_rows`
cluster-contiguous rows. A block is listed if any of its rows belongs to a kept
cluster; the rows of a listed block that are not selected are masked out. The
price is read amplification: rows read / rows selected (see
`read_amplification`), large when kept clusters are much smaller than a block.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import selection as selection_lib


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockSelection:
  """K/V blocks to read per (sequence, KV head).

  Attributes:
    blocks: [B, Hkv, max_blocks] int32 block indices; slots >= num_blocks repeat
      the last listed block (so the pipeline issues no new copy for them).
    num_blocks: [B, Hkv] int32.
    row_mask: [B, Hkv, nb, block_rows] bool, selected rows of every block
      (nb = ceil(S' / block_rows); rows past S' are False).
  """

  blocks: jax.Array
  num_blocks: jax.Array
  row_mask: jax.Array

  @property
  def block_rows(self) -> int:
    return self.row_mask.shape[-1]


def block_selection(row_mask: jax.Array, *, block_rows: int,
                    max_blocks: int | None = None) -> BlockSelection:
  """Blocks holding selected rows.

  Args:
    row_mask: [B, Hkv, S'] bool selected rows (`selection.key_mask`).
    block_rows: rows per block.
    max_blocks: static length of the block list (blocks past it are dropped);
      None = every block of the context (never drops).

  Returns:
    The `BlockSelection`.
  """
  batch, num_kv_heads, num_keys = row_mask.shape
  num_row_blocks = -(-num_keys // block_rows)
  max_blocks = num_row_blocks if max_blocks is None else max_blocks
  mask = jnp.pad(row_mask, ((0, 0), (0, 0),
                            (0, num_row_blocks * block_rows - num_keys)))
  mask = mask.reshape(batch, num_kv_heads, num_row_blocks, block_rows)
  listed = mask.any(axis=-1).reshape(-1, num_row_blocks)
  starts = jnp.broadcast_to(jnp.arange(num_row_blocks), listed.shape)
  blocks, count = selection_lib.compact_ranges(
      listed, starts, jnp.ones_like(starts), max_blocks)
  last = jnp.take_along_axis(blocks, jnp.maximum(count - 1, 0)[:, None], -1)
  blocks = jnp.where(jnp.arange(max_blocks) < count[:, None], blocks, last)
  return BlockSelection(
      blocks=blocks.reshape(batch, num_kv_heads, max_blocks),
      num_blocks=count.reshape(batch, num_kv_heads), row_mask=mask)


def read_amplification(block_sel: BlockSelection) -> jax.Array:
  """[B, Hkv] rows read / rows selected (1 = no waste; nan if none)."""
  selected = block_sel.row_mask.sum(axis=(-1, -2))
  return (block_sel.num_blocks * block_sel.block_rows) / selected
