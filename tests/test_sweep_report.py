"""Tests of the sweep summary: grouping, averages, CSV, markdown and the plot (`sweep_report`)."""

from __future__ import annotations

import csv

import pytest

from squeezed_jax.eval import sweep_report


def _record(task, method, budget, score, kv_budget, seconds, build, example="e0", question=0):
  kind = "dense" if method == "dense" else "kv_budget"
  return {"id": example, "question": question, "task": task, "length": 4096, "method": method,
          "budget_kind": kind, "budget": budget, "score": score, "kv_budget": kv_budget,
          "seconds": seconds, "build_seconds": build}


RECORDS = [
    _record("kv_lookup", "dense", 1.0, 100.0, 1.0, 0.3, 2.0),
    _record("kv_lookup", "dense", 1.0, 50.0, 1.0, 0.1, 4.0, example="e1"),
    _record("kv_lookup", "dense", 1.0, 0.0, 1.0, 0.2, 4.0, example="e1", question=1),
    _record("kv_lookup", "squeezed", 0.25, 100.0, 0.27, 0.05, 2.0),
    _record("kv_lookup", "squeezed", 0.25, 0.0, 0.29, 0.07, 4.0, example="e1"),
    _record("single_needle", "dense", 1.0, 100.0, 1.0, 0.4, 1.0),
    _record("single_needle", "squeezed", 0.25, 60.0, 0.31, 0.09, 1.0),
]


def test_summary_rows_hold_means_and_medians():
  rows = {(r.task, r.method): r for r in sweep_report.summarize(RECORDS)}
  dense = rows[("kv_lookup", "dense")]
  assert (dense.count, dense.budget_kind, dense.budget) == (3, "dense", 1.0)
  assert dense.score == pytest.approx(50.0) and dense.kv_budget == 1.0
  assert dense.seconds_per_question == pytest.approx(0.2)
  assert dense.build_seconds == pytest.approx(3.0)  # per context (e0: 2, e1: 4), not per question
  squeezed = rows[("kv_lookup", "squeezed")]
  assert squeezed.score == pytest.approx(50.0) and squeezed.kv_budget == pytest.approx(0.28)
  assert squeezed.seconds_per_question == pytest.approx(0.06)


def test_average_rows_are_task_means():
  rows = sweep_report.summarize(RECORDS)
  average = {r.method: r for r in rows if r.task == sweep_report.AVERAGE_TASK}
  assert average["dense"].score == pytest.approx(75.0)  # (50 + 100) / 2
  assert average["squeezed"].score == pytest.approx(55.0)  # (50 + 60) / 2
  assert average["squeezed"].kv_budget == pytest.approx((0.28 + 0.31) / 2)
  assert average["squeezed"].count == 3
  assert rows[-1].task == sweep_report.AVERAGE_TASK and rows[0].task == "kv_lookup"
  single = sweep_report.summarize([r for r in RECORDS if r["task"] == "single_needle"])
  assert all(r.task == "single_needle" for r in single)


def test_report_files(tmp_path):
  paths = sweep_report.write_report(RECORDS, str(tmp_path / "out"), "ruler", title="toy")
  with open(paths["csv"], newline="") as f:
    table = list(csv.DictReader(f))
  assert len(table) == 6
  assert {(row["task"], row["method"]) for row in table} == {
      (t, m) for t in ("kv_lookup", "single_needle", "average") for m in ("dense", "squeezed")}
  squeezed = next(row for row in table if (row["task"], row["method"]) == ("single_needle",
                                                                          "squeezed"))
  assert float(squeezed["score"]) == 60.0 and float(squeezed["kv_budget"]) == 0.31
  markdown = open(paths["markdown"]).read()
  assert markdown.startswith("# toy\n")
  assert "| single_needle | 4096 | squeezed | 0.25 | 0.3100 | 60.00 | 1 | 0.0900 | 1.00 |" in markdown
  assert "| kv_lookup | 4096 | dense | - | 1.0000 | 50.00 | 3 | 0.2000 | 3.00 |" in markdown
  with open(paths["plot"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="no records"):
    sweep_report.write_report([], str(tmp_path / "empty"), "ruler")
