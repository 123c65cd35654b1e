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
