"""Progress bars with an ETA (tqdm) for the long steps: context prefill, clustering, sweeps.

    for chunk in progress(chunks, desc="context prefill", unit="chunk"):
      ...

A bar is drawn (on stderr, or as a widget in a notebook) when there is more than one step. Set the
environment variable SQUEEZED_JAX_PROGRESS=0 to turn every bar off, e.g. in batch-job logs; it is
read at each call, so `os.environ["SQUEEZED_JAX_PROGRESS"] = "0"` works inside a notebook too.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence, TypeVar

from tqdm.auto import tqdm

ENV_VAR = "SQUEEZED_JAX_PROGRESS"
_Step = TypeVar("_Step")


def enabled() -> bool:
  """False when SQUEEZED_JAX_PROGRESS is set to 0 (or false / off / no)."""
  return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")


def progress(steps: Sequence[_Step], *, desc: str, unit: str) -> Iterable[_Step]:
  """Iterates over `steps`, drawing a bar with the rate and the ETA when there are several."""
  return tqdm(steps, desc=desc, unit=unit, disable=len(steps) <= 1 or not enabled())
