"""Runs a check of `tests/sharding_checks.py` in a subprocess that sees 8 CPU devices."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def run_check(*names: str, timeout: float = 300.0) -> str:
  """Runs the named checks; returns their stdout, or fails with the subprocess's output."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-m", "tests.sharding_checks", *names], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)
  assert result.returncode == 0, f"{names} failed:\n{result.stdout}\n{result.stderr[-6000:]}"
  return result.stdout
