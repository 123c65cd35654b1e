"""experiments/gpu_trace.py: kernel families and per-step differences of two traces."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments import gpu_trace


def test_kernel_family_drops_xla_numbering_only():
  assert gpu_trace.kernel_family("loop_fusion_12") == "loop_fusion"
  assert gpu_trace.kernel_family("input_reduce_fusion.3_1") == "input_reduce_fusion"
  assert gpu_trace.kernel_family("squeezed_decode_attention") == "squeezed_decode_attention"


def test_per_step_difference_counts_the_kernels_between_two_runs():
  prologue = [(0, 5_000, "prefill_fusion_1")]
  step = lambda t: [(t, 2_000, "squeezed_decode_attention"), (t + 2_000, 500, "loop_fusion_7"),
                    (t + 2_600, 400, f"loop_fusion_{t}")]
  shorter = prologue + [k for t in (10_000, 20_000) for k in step(t)]
  longer = prologue + [k for t in (10_000, 20_000, 30_000, 40_000, 50_000) for k in step(t)]
  got = gpu_trace.per_step_difference(longer, shorter, steps=3, top=2)
  assert got["kernels_per_step"] == 3
  assert got["busy_us_per_step"] == 2.9
  assert got["span_us_per_step"] == 10.0
  assert got["top_kernels"] == [("squeezed_decode_attention", 1.0, 2.0), ("loop_fusion", 2.0, 0.9)]


def test_traced_kernels_off_gpu_is_empty_and_runs_the_call():
  ran = []
  kernels = gpu_trace.traced_kernels(lambda: ran.append(jax.block_until_ready(jnp.ones(3) * 2)))
  assert len(ran) == 1
  assert kernels == [] or jax.devices()[0].platform == "gpu"
