"""Tests of `squeezed_jax.training.metrics_log`."""

from __future__ import annotations

import numpy as np

from squeezed_jax.training import metrics_log


def _records(rng):
  records = []
  for step in range(10, 130, 10):
    records.append({"step": step, "seq_len": 1024 if step <= 60 else 4096,
                    "loss": float(rng.uniform(3, 9)), "text_loss": float(rng.uniform(3, 6)),
                    "answer_loss": float(rng.uniform(0.1, 3)),
                    "answer_accuracy": float(rng.uniform(0, 1))})
  records.append({"step": 60, "heldout_loss": 4.2})
  records.append({"step": 120, "final": {"heldout": {"loss": 4.0}}})
  return records


def test_write_then_read_appends_records(tmp_path):
  path = str(tmp_path / "sub" / "metrics.jsonl")
  records = _records(np.random.default_rng(0))
  log = metrics_log.MetricsLog(path)
  for record in records[:5]:
    log.write(record)
  for record in records[5:]:
    metrics_log.MetricsLog(path).write(record)  # A resumed run appends.
  assert metrics_log.read_metrics(path) == records


def test_progress_line_and_durations():
  metrics = {"loss": 5.25, "text_loss": 4.0, "answer_loss": 0.625, "answer_accuracy": 0.875,
             "learning_rate": 1.5e-3}
  line = metrics_log.progress_line(100, 400, metrics, seq_len=2048, steps_per_second=2.0,
                                   elapsed_seconds=61)
  assert line.startswith("step 100/400 len 2048 loss 5.250 text 4.000 answer 0.625")
  assert "answer_acc 0.875" in line and "2.00 steps/s" in line
  assert "elapsed 1m01s ETA 2m30s" in line
  assert "ETA ?" in metrics_log.progress_line(1, 2, metrics, seq_len=8, steps_per_second=0,
                                              elapsed_seconds=0)
  assert metrics_log.format_duration(125.3) == "2m05s"


def test_plot_loss_curve_writes_a_png(tmp_path):
  path = tmp_path / "loss.png"
  metrics_log.plot_loss_curve(_records(np.random.default_rng(1)), str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert path.stat().st_size > 10_000
