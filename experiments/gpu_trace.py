"""GPU kernels of a traced call, from the JAX profiler (benchmarks only)."""

from __future__ import annotations

import collections
import glob
import re
import tempfile
from typing import Callable

import jax

Kernel = tuple[int, int, str]  # (start ns, duration ns, name)


def traced_kernels(run: Callable[[], object]) -> list[Kernel]:
  """Every GPU kernel that `run()` launches (sorted by start; [] off GPU).

  `run` must block until its results are ready.
  """
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      run()
    [path] = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    data = jax.profiler.ProfileData.from_file(path)
  kernels = []
  for plane in data.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      if line.name.lower().startswith("stream"):
        kernels += [(e.start_ns, e.duration_ns, e.name) for e in line.events]
  return sorted(kernels)


def gpu_kernels(fn, inputs: list[tuple], calls: int = 10) -> dict:
  """The GPU kernels of one call of `fn`, from a profiler trace of `calls`.

  Returns kernels per call, busy ms per call (sum of kernel durations), span
  ms per call (first kernel start to last kernel end, over calls), and the
  kernels of the last call with their durations.
  """
  for args in inputs:
    jax.block_until_ready(fn(*args))

  def run():
    for i in range(calls):
      result = fn(*inputs[i % len(inputs)])
    jax.block_until_ready(result)

  events = traced_kernels(run)
  if not events:
    return dict(kernels_per_call=0)
  per_call = len(events) // calls
  return dict(
      kernels_per_call=len(events) / calls,
      busy_ms=sum(e[1] for e in events) / calls * 1e-6,
      span_ms=(events[-1][0] + events[-1][1] - events[0][0]) / calls * 1e-6,
      last_call=[(name, round(duration * 1e-3, 1)) for _, duration, name
                 in events[-per_call:]])


def kernel_family(name: str) -> str:
  """A kernel's name without XLA's numbering (loop_fusion_12 -> loop_fusion)."""
  return re.sub(r"([_.]\d+)+$", "", name)


def time_by_family(kernels: list[Kernel]) -> dict[str, tuple[int, float]]:
  """{family: (number of kernels, total microseconds)}."""
  totals = collections.defaultdict(lambda: [0, 0.0])
  for _, duration, name in kernels:
    entry = totals[kernel_family(name)]
    entry[0] += 1
    entry[1] += duration * 1e-3
  return {name: (count, micros) for name, (count, micros) in totals.items()}


def per_step_difference(longer: list[Kernel], shorter: list[Kernel],
                        steps: int, top: int = 12) -> dict:
  """Kernels per step of a loop, from traces of two runs `steps` apart.

  Returns kernels per step, busy and span microseconds per step, and the
  `top` kernel families by time per step: [(family, kernels, us)].
  """
  span = lambda kernels: (kernels[-1][0] + kernels[-1][1] - kernels[0][0]
                          if kernels else 0)
  long_families, short_families = time_by_family(longer), time_by_family(shorter)
  families = []
  for name, (count, micros) in long_families.items():
    short_count, short_micros = short_families.get(name, (0, 0.0))
    families.append((name, round((count - short_count) / steps, 2),
                     round((micros - short_micros) / steps, 1)))
  families.sort(key=lambda family: -family[2])
  return dict(
      kernels_per_step=round((len(longer) - len(shorter)) / steps, 1),
      busy_us_per_step=round(sum(f[2] for f in families), 1),
      span_us_per_step=round((span(longer) - span(shorter)) * 1e-3 / steps, 1),
      top_kernels=families[:top])
