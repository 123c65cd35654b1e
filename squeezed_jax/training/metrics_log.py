"""Training metrics: JSON lines on disk, one progress line with ETA on stdout, the loss curve."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence


class MetricsLog:
  """Appends one JSON object per line to `path` (a resumed run appends to the same file)."""

  def __init__(self, path: str):
    self.path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def write(self, record: Mapping[str, Any]) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(dict(record)) + "\n")


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The records of a metrics file, in order."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def format_duration(seconds: float) -> str:
  """125.3 -> '2m05s'."""
  minutes, seconds = divmod(int(round(seconds)), 60)
  return f"{minutes}m{seconds:02d}s"


def progress_line(step: int, total_steps: int, metrics: Mapping[str, float], *,
                  seq_len: int, steps_per_second: float, elapsed_seconds: float) -> str:
  """One line: step, length, losses, answer accuracy, throughput, elapsed time and ETA."""
  eta = (total_steps - step) / steps_per_second if steps_per_second > 0 else float("inf")
  return (f"step {step}/{total_steps} len {seq_len} loss {metrics['loss']:.3f} "
          f"text {metrics['text_loss']:.3f} answer {metrics['answer_loss']:.3f} "
          f"answer_acc {metrics['answer_accuracy']:.3f} lr {metrics['learning_rate']:.2e} "
          f"| {steps_per_second:.2f} steps/s | elapsed {format_duration(elapsed_seconds)} "
          f"ETA {format_duration(eta) if eta != float('inf') else '?'}")


def plot_loss_curve(records: Sequence[Mapping[str, Any]], path: str) -> None:
  """Plots text, answer and held-out losses and answer accuracy against the step into `path`."""
  import matplotlib  # Imported here: only the end of a run needs it.
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  train = [r for r in records if "text_loss" in r]
  heldout = [r for r in records if "heldout_loss" in r]
  figure, loss_axis = plt.subplots(figsize=(8, 4.5))
  steps = [r["step"] for r in train]
  loss_axis.plot(steps, [r["text_loss"] for r in train], label="text loss (train)")
  loss_axis.plot(steps, [r["answer_loss"] for r in train], label="answer loss (train)")
  if heldout:
    loss_axis.plot([r["step"] for r in heldout], [r["heldout_loss"] for r in heldout], "o-",
                   color="tab:red", label="held-out essay loss")
  loss_axis.set_xlabel("step")
  loss_axis.set_ylabel("cross-entropy (nats/token)")
  loss_axis.set_yscale("log")
  accuracy_axis = loss_axis.twinx()
  accuracy_axis.plot(steps, [r["answer_accuracy"] for r in train], color="tab:green", alpha=0.6,
                     label="answer token accuracy")
  accuracy_axis.set_ylabel("answer token accuracy")
  accuracy_axis.set_ylim(0, 1)
  # A stage starts after the last record of the stage before (the curve starts at step 0).
  starts = [(0 if i == 0 else train[i - 1]["step"], r["seq_len"]) for i, r in enumerate(train)
            if i == 0 or r["seq_len"] != train[i - 1]["seq_len"]]
  for step, seq_len in starts:
    loss_axis.axvline(step, color="gray", linestyle=":", linewidth=0.8)
    loss_axis.text(step, loss_axis.get_ylim()[1], f" {seq_len / 1024:g}K", va="top", fontsize=8)
  handles = loss_axis.get_legend_handles_labels()
  extra = accuracy_axis.get_legend_handles_labels()
  loss_axis.legend(handles[0] + extra[0], handles[1] + extra[1], loc="center right", fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)
