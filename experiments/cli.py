"""What every launcher shares: quiet third-party logs, id-list parsing, clean error exits."""

from __future__ import annotations

import functools
import logging
import sys
from typing import Callable

from absl import app
from absl import logging as absl_logging


def parse_ids(flag: str, value: str) -> list[int]:
  """'1,2, 3' -> [1, 2, 3]; a UsageError naming `flag` otherwise."""
  try:
    return [int(t) for t in value.split(",") if t.strip()]
  except ValueError as e:
    raise app.UsageError(f"--{flag} must be comma-separated integers: {e}") from None


def launcher(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """Wraps an absl main: our progress logs at INFO, others at WARNING; bad input exits cleanly."""

  @functools.wraps(main)
  def wrapped(argv):
    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("squeezed_jax", "experiments"):
      logging.getLogger(name).setLevel(logging.INFO)
    try:
      main(argv)
    except (ValueError, FileNotFoundError) as e:
      sys.exit(f"error: {e}")

  return wrapped
