"""Tests for squeezed_jax.sharding.context_parallel: sharded attention equals one device.

The checks run in a subprocess with 8 CPU devices (`tests/sharding_checks.py`): meshes
(data, heads, context) in sharding_checks.MESHES (1, 2, 4 and 8 devices, mixed) against
`attention_methods.context_attention` on one device (float32, atol = rtol = 2e-5; row counts
and overflow flags equal), and a model forward (prefill + 3 decode steps) with sharded weights,
caches and context on mesh (2, 2, 2) against the one-device forward (1e-4).
"""

from tests.sharding_subprocess import run_check


def test_context_parallel_attention_equals_one_device():
  assert "equal to one device" in run_check("attention")


def test_sharded_model_forward_equals_one_device():
  assert "equal to one device" in run_check("forward")
