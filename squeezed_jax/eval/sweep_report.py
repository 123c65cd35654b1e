"""Sweep results as tables and a plot: method x budget x task -> score, KV budget used, time.

`summarize` groups the records of `squeezed_jax.eval.sweep` by (task, length, method, budget kind,
budget): mean score, mean KV budget used, median seconds per question and median build seconds
per context (medians: robust to a first, compiling call when warm-up is off). Where several tasks
share a length, an "average" task row per (length, method, budget) averages the task rows (a
macro average, as LongBench and RULER report). `write_report` writes `<stem>.csv`, `<stem>.md`
and `<stem>.png` (score against the KV budget used, one panel per task and length, one line per
method, dense as a dashed level).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import os
import statistics
from typing import Any, Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position  # after the backend

from squeezed_jax.attention_methods import METHODS

AVERAGE_TASK = "average"


@dataclasses.dataclass(frozen=True)
class SummaryRow:
  """One (task, length, method, budget) cell; count = questions scored."""

  task: str
  length: int
  method: str
  budget_kind: str
  budget: float
  count: int
  score: float
  kv_budget: float
  seconds_per_question: float
  build_seconds: float


def _sort_key(row: SummaryRow) -> tuple:
  return (row.task == AVERAGE_TASK, row.task, row.length, METHODS.index(row.method), -row.budget)


def summarize(records: Iterable[Mapping[str, Any]]) -> list[SummaryRow]:
  """Rows per (task, length, method, budget kind, budget), plus average-task rows (see above)."""
  groups: dict[tuple, list[Mapping[str, Any]]] = collections.defaultdict(list)
  for record in records:
    groups[(record["task"], record["length"], record["method"], record["budget_kind"],
            record["budget"])].append(record)
  rows = []
  for (task, length, method, kind, budget), group in groups.items():
    builds = {r["id"]: r["build_seconds"] for r in group}
    rows.append(SummaryRow(
        task=task, length=length, method=method, budget_kind=kind, budget=budget,
        count=len(group), score=statistics.fmean(r["score"] for r in group),
        kv_budget=statistics.fmean(r["kv_budget"] for r in group),
        seconds_per_question=statistics.median(r["seconds"] for r in group),
        build_seconds=statistics.median(builds.values())))
  rows.extend(_average_rows(rows))
  return sorted(rows, key=_sort_key)


def _average_rows(rows: Sequence[SummaryRow]) -> list[SummaryRow]:
  """Per (length, method, budget kind, budget) held by more than one task: the task mean."""
  by_cell: dict[tuple, list[SummaryRow]] = collections.defaultdict(list)
  for row in rows:
    by_cell[(row.length, row.method, row.budget_kind, row.budget)].append(row)
  averages = []
  for (length, method, kind, budget), cell in by_cell.items():
    if len(cell) < 2:
      continue
    mean = lambda name, cell=cell: statistics.fmean(getattr(r, name) for r in cell)
    averages.append(SummaryRow(
        task=AVERAGE_TASK, length=length, method=method, budget_kind=kind, budget=budget,
        count=sum(r.count for r in cell), score=mean("score"), kv_budget=mean("kv_budget"),
        seconds_per_question=mean("seconds_per_question"), build_seconds=mean("build_seconds")))
  return averages


def write_csv(rows: Sequence[SummaryRow], path: str) -> None:
  """One line per row, the SummaryRow fields as columns."""
  fields = [f.name for f in dataclasses.fields(SummaryRow)]
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    for row in rows:
      writer.writerow(dataclasses.asdict(row))


def markdown_table(rows: Sequence[SummaryRow]) -> str:
  """A markdown table of the rows (score x100 scale, seconds per question amortised)."""
  lines = ["| task | length | method | budget | KV budget used | score | n | s / question | "
           "build s |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    budget = "-" if r.budget_kind == "dense" else (
        f"{r.budget:g}" + (" (pct)" if r.budget_kind == "percentile" else ""))
    lines.append(f"| {r.task} | {r.length} | {r.method} | {budget} | {r.kv_budget:.4f} | "
                 f"{r.score:.2f} | {r.count} | {r.seconds_per_question:.4f} | "
                 f"{r.build_seconds:.2f} |")
  return "\n".join(lines) + "\n"


def plot(rows: Sequence[SummaryRow], path: str, title: str = "") -> None:
  """Score against KV budget used: a panel per (task, length), a line per method."""
  panels = sorted({(r.task, r.length) for r in rows}, key=lambda p: (p[0] == AVERAGE_TASK, p))
  columns = min(3, len(panels))
  rows_of_panels = -(-len(panels) // columns)
  figure, axes = plt.subplots(rows_of_panels, columns, squeeze=False,
                              figsize=(4.5 * columns, 3.5 * rows_of_panels))
  for axis, (task, length) in zip(axes.flat, panels):
    panel = [r for r in rows if (r.task, r.length) == (task, length)]
    for method in METHODS:
      points = sorted((r.kv_budget, r.score) for r in panel if r.method == method)
      if not points:
        continue
      if method == "dense":
        axis.axhline(points[0][1], color="black", linestyle="--", label="dense")
        continue
      axis.plot(*zip(*points), marker="o", label=method)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("KV budget used (fraction of the fixed context)")
    axis.set_ylabel("score")
    axis.set_ylim(-3, 103)
    axis.set_title(f"{task}, {length} tokens")
    axis.grid(True, alpha=0.3)
  for axis in list(axes.flat)[len(panels):]:
    axis.set_visible(False)
  axes.flat[0].legend(fontsize="small")
  if title:
    figure.suptitle(title)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def write_report(records: Iterable[Mapping[str, Any]], output_dir: str, stem: str,
                 title: str = "") -> dict[str, str]:
  """Writes <stem>.csv, <stem>.md and <stem>.png under `output_dir`; returns their paths."""
  rows = summarize(records)
  if not rows:
    raise ValueError(f"no records to report in {output_dir}")
  os.makedirs(output_dir, exist_ok=True)
  paths = {kind: os.path.join(output_dir, f"{stem}.{ext}")
           for kind, ext in (("csv", "csv"), ("markdown", "md"), ("plot", "png"))}
  write_csv(rows, paths["csv"])
  with open(paths["markdown"], "w", encoding="utf-8") as f:
    f.write((f"# {title}\n\n" if title else "") + markdown_table(rows))
  plot(rows, paths["plot"], title)
  return paths
