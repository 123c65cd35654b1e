"""Tests of pallas_kernels.block_sizes validation."""

from __future__ import annotations

import pytest

from pallas_kernels import block_sizes


def test_valid_defaults():
  assert block_sizes.AttentionBlockSizes.for_decode().split_rows == 512
  assert block_sizes.AttentionBlockSizes.for_prefill().split_rows is None
  assert block_sizes.LookupBlockSizes().block_k == 128


@pytest.mark.parametrize("kwargs,message", [
    (dict(block_rows=48), "power of two"),
    (dict(block_m=8), ">= 16"),
    (dict(block_rows=64, split_rows=96), "must divide"),
])
def test_attention_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    block_sizes.AttentionBlockSizes(**kwargs)


def test_lookup_errors():
  with pytest.raises(ValueError, match="power of two"):
    block_sizes.LookupBlockSizes(block_k=100)


def test_decode_defaults_and_errors():
  tiles = block_sizes.DecodeBlockSizes()
  assert tiles.block_clusters == 128 and tiles.lookup.single_pass_tiles == 1
  with pytest.raises(ValueError, match="power of two"):
    block_sizes.DecodeBlockSizes(block_clusters=96)
  with pytest.raises(ValueError, match="must be >= 16"):
    block_sizes.DecodeBlockSizes(coarse_block=8)
  with pytest.raises(ValueError, match="reduce_rows=8.*must be >= 16"):
    block_sizes.DecodeBlockSizes(reduce_rows=8)
  with pytest.raises(ValueError, match="must be <="):
    block_sizes.DecodeBlockSizes(block_rows=32, piece_rows=64)
  with pytest.raises(ValueError, match="single_pass_tiles"):
    block_sizes.LookupBlockSizes(single_pass_tiles=0)


@pytest.mark.parametrize("x,power,multiple_of_16", [
    (1, 1, 16), (16, 16, 16), (17, 32, 32), (100, 128, 112)])
def test_padding_helpers(x, power, multiple_of_16):
  assert block_sizes.next_power_of_two(x) == power
  assert block_sizes.round_up(x, 16) == multiple_of_16
