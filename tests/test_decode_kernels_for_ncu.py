"""The ncu driver's two decode paths (experiments/decode_kernels_for_ncu.py)
read the same key budget: equal outputs, in interpret mode on small shapes."""

from __future__ import annotations

import numpy as np

from experiments import decode_kernels_for_ncu


def test_fused_and_row_list_paths_agree():
  paths = decode_kernels_for_ncu.decode_paths(
      700, 0.25, window=20, heads=2, head_dim=64, interpret=True)
  assert sorted(paths) == ["fused", "row list"]
  fused, row_list = (np.asarray(fn(*args), np.float32)
                     for fn, args in paths.values())
  assert fused.shape == (1, 2, 64) and np.isfinite(fused).all()
  np.testing.assert_allclose(fused, row_list, rtol=1e-2, atol=1e-2)
