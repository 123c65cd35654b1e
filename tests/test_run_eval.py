"""End-to-end runs of `python -m experiments.run_eval` on stories260K (subprocesses, CPU)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

from experiments import run_eval
from squeezed_jax.attention_methods import METHODS
from squeezed_jax.eval import benchmark_runs
from tests.conftest import STORIES_DIR

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
MODEL = [f"--checkpoint={os.path.join(STORIES_DIR, 'stories260K.bin')}",
         f"--tokenizer={os.path.join(STORIES_DIR, 'tok512.bin')}"]


def _run(*flags):
  return subprocess.run([sys.executable, "-m", "experiments.run_eval", *MODEL, *flags], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, check=False)


def test_flag_choices_match_the_library():
  assert run_eval.METHODS == METHODS and run_eval.BENCHMARKS == benchmark_runs.BENCHMARKS


def test_tiny_ruler_sweep_writes_tables_and_plot_then_resumes(tmp_path):
  output = str(tmp_path / "eval")
  flags = ["--benchmark=ruler", "--tasks=single_needle", "--lengths=384",
           "--question_tokens=128", "--methods=dense,squeezed", "--kv_budgets=0.25",
           "--num_examples=1", "--observation_window=32", "--max_new_tokens=8",
           f"--output_dir={output}"]
  run = _run(*flags)
  assert run.returncode == 0, run.stderr
  predictions = os.path.join(output, "predictions", "single_needle_384.jsonl")
  assert f"single_needle_384: 1 examples run, 0 already done, 2 records in {predictions}" in (
      run.stdout)
  for kind, ext in (("csv", "csv"), ("markdown", "md"), ("plot", "png")):
    assert f"{kind}: {os.path.join(output, 'ruler.' + ext)}" in run.stdout
  with open(predictions) as f:
    records = [json.loads(line) for line in f]
  assert [(r["id"], r["method"], r["budget"]) for r in records] == [
      ("single_needle-384-0", "dense", 1.0), ("single_needle-384-0", "squeezed", 0.25)]
  assert all(r["context_tokens"] == 256 and r["question_tokens"] == 128 for r in records)
  assert all(r["generated_tokens"] <= 8 and r["score"] in (0.0, 100.0) for r in records)
  with open(os.path.join(output, "ruler.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  assert [(r["task"], r["length"], r["method"], r["count"]) for r in rows] == [
      ("single_needle", "384", "dense", "1"), ("single_needle", "384", "squeezed", "1")]
  assert float(rows[1]["kv_budget"]) == records[1]["kv_budget"] < 0.5
  assert "| single_needle | 384 | squeezed | 0.25 |" in open(os.path.join(output, "ruler.md")).read()
  assert os.path.getsize(os.path.join(output, "ruler.png")) > 1000

  with open(predictions, "rb") as f:
    before = f.read()
  rerun = _run(*flags)
  assert rerun.returncode == 0, rerun.stderr
  assert "single_needle_384: 0 examples run, 1 already done, 2 records" in rerun.stdout
  with open(predictions, "rb") as f:
    assert f.read() == before

  os.remove(os.path.join(output, "ruler.csv"))
  report = _run(*flags, "--report_only", "--lengths=384,512")  # 512: no file, nothing to add
  assert report.returncode == 0, report.stderr
  assert "examples run" not in report.stdout and "| single_needle | 384 | dense |" in report.stdout
  with open(os.path.join(output, "ruler.csv"), newline="") as f:
    assert list(csv.DictReader(f)) == rows
  assert not os.path.exists(os.path.join(output, "predictions", "single_needle_512.jsonl"))


def test_bad_flags_fail_before_loading_the_model(tmp_path):
  output = f"--output_dir={tmp_path}"
  run = _run("--benchmark=ruler", "--methods=dense,sparse", output)
  assert run.returncode != 0 and "unknown --methods ['sparse']" in run.stderr
  run = _run("--benchmark=ruler", "--kv_budgets=0.5", "--percentiles=0.9", output)
  assert run.returncode != 0 and "not both" in run.stderr
  run = _run("--benchmark=multiquery", "--tasks=kv_lookup", output)
  assert run.returncode != 0 and "--tasks does not apply" in run.stderr
  assert not os.listdir(tmp_path)
