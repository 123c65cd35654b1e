"""Frozen block-size configurations of the online-phase kernels.

One dataclass per kernel family, validated on construction, with defaults
chosen for the H200 (measured in `experiments/bench_attention.py`).
"""

from __future__ import annotations

import dataclasses


def round_up(x: int, multiple: int) -> int:
  """The smallest multiple of `multiple` >= x."""
  return -(-x // multiple) * multiple


def next_power_of_two(x: int) -> int:
  """The smallest power of two >= x (Triton tiles are powers of two)."""
  return 1 << max(x - 1, 0).bit_length()


def _check_power_of_two(**sizes: int) -> None:
  for name, size in sizes.items():
    if size <= 0 or size & (size - 1):
      raise ValueError(f"{name}={size} must be a positive power of two")


@dataclasses.dataclass(frozen=True)
class LookupBlockSizes:
  """Tiles of the centroid-scores kernels.

  Attributes:
    block_m: query rows per tile (rows are (batch, group head, token) triples
      of one KV head).
    block_k: centroids per tile.
    single_pass_max_rows: if a KV head has at most this many query rows
      (decode), one pass over the centroids (one query tile of all rows and one
      centroid tile per program: block_m and num_stages ignored) writes the
      logits and the normaliser is finished in XLA;
      otherwise (prefill) two passes recompute the logits.
    single_pass_tiles: centroid tiles scored per program of the single pass.
    num_warps: warps per program.
    num_stages: software-pipelining depth of the centroid loads.
    two_pass_dot_dtype: operand dtype of the two-pass (prefill) products:
      "bfloat16" runs them on the bf16 tensor cores (centroids rounded to
      bf16, f32 accumulation); None keeps the centroids' dtype (float32:
      exact but several times slower). The single pass is bandwidth-bound
      and always uses the centroids' dtype.
  """

  block_m: int = 64
  block_k: int = 128
  single_pass_max_rows: int = 64
  single_pass_tiles: int = 1
  num_warps: int = 4
  num_stages: int = 2
  two_pass_dot_dtype: str | None = "bfloat16"

  def __post_init__(self):
    _check_power_of_two(block_m=self.block_m, block_k=self.block_k)
    if self.block_m < 16 or self.block_k < 16:
      raise ValueError(f"{self.block_m=} and {self.block_k=} must be >= 16")
    if self.single_pass_tiles < 1:
      raise ValueError(f"{self.single_pass_tiles=} must be >= 1")


@dataclasses.dataclass(frozen=True)
class AttentionBlockSizes:
  """Tiles of the block-sparse attention kernel.

  The decode / prefill defaults are the fastest of the variants timed on the
  H200 at S = 128K, 12.5% budget (benchmarks/RESULTS.md).

  Attributes:
    block_m: query rows per tile (rows are (token, group head) pairs of one KV
      head, so one gathered K/V block serves the whole GQA group).
    block_rows: selected K/V rows gathered per inner-loop step.
    split_rows: selected rows per program along the split-K axis (decode); a
      head's row list is cut into splits of this size, so every program does
      the same bounded work whatever count its head keeps. None: one split.
    num_warps: warps per program.
    num_stages: software-pipelining depth of the K/V gathers.
  """

  block_m: int = 16
  block_rows: int = 64
  split_rows: int | None = 512
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    _check_power_of_two(block_m=self.block_m, block_rows=self.block_rows)
    if self.block_m < 16 or self.block_rows < 16:
      raise ValueError(f"{self.block_m=} and {self.block_rows=} must be >= 16")
    if self.split_rows is not None and self.split_rows % self.block_rows:
      raise ValueError(
          f"{self.block_rows=} must divide {self.split_rows=}")

  @classmethod
  def for_decode(cls) -> AttentionBlockSizes:
    """Few query rows, many selected rows: split-K over the row list."""
    return cls(block_m=16, block_rows=128, split_rows=512, num_warps=4,
               num_stages=3)

  @classmethod
  def for_prefill(cls) -> AttentionBlockSizes:
    """A chunk of queries: no split, big query tiles."""
    return cls(block_m=128, block_rows=128, split_rows=None, num_warps=8,
               num_stages=3)


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
  """Tiles of the fused decode path (`gpu/decode_attention.py`).

  Attributes:
    block_clusters: consecutive clusters per selection and attention program
      (a chunk); the selection lists the chunk's kept clusters.
    block_rows: kept rows gathered per inner-loop step of the attention.
    reduce_rows: window rows read per step of the reduce (128: the H200
      measurement in benchmarks/RESULTS.md, seventh pass).
    own_split_rows: a sequence's own rows (question + generated tokens) per
      attention program: they are split like the chunks, and merged with
      them in the reduce.
    piece_rows: rows per entry of the selection's lists (a kept cluster of N
      rows takes ceil(N / piece_rows) entries; 1: a plain row list).
    num_warps: warps per attention program.
    num_stages: software-pipelining depth of the attention's gathers.
    coarse_block: coarse clusters per program of the hierarchical fine
      lookup (>= 16: their keep flags feed a matrix product).
    fine_block: fine centroids scored per step of that lookup.
    lookup: tiles of the single pass over the centroids (fine, or coarse for
      the hierarchical lookup).
  """

  block_clusters: int = 128
  block_rows: int = 64
  reduce_rows: int = 128
  own_split_rows: int = 128
  piece_rows: int = 8
  num_warps: int = 2
  num_stages: int = 3
  coarse_block: int = 16
  fine_block: int = 64
  lookup: LookupBlockSizes = LookupBlockSizes()

  def __post_init__(self):
    _check_power_of_two(block_clusters=self.block_clusters,
                        block_rows=self.block_rows,
                        reduce_rows=self.reduce_rows,
                        own_split_rows=self.own_split_rows,
                        piece_rows=self.piece_rows,
                        coarse_block=self.coarse_block,
                        fine_block=self.fine_block)
    if self.piece_rows > self.block_rows:
      raise ValueError(f"{self.piece_rows=} must be <= {self.block_rows=}")
    if min(self.block_rows, self.reduce_rows, self.coarse_block,
           self.fine_block) < 16:
      raise ValueError(f"{self.block_rows=}, {self.reduce_rows=}, "
                       f"{self.coarse_block=} and {self.fine_block=} must be "
                       ">= 16")
