"""End-to-end runs of `python -m experiments.score_longbench` on small prediction files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
TREC_CLASSES = ["City", "Country", "Other location"]


def _score(path):
  return subprocess.run(
      [sys.executable, "-m", "experiments.score_longbench", f"--predictions={path}"], cwd=ROOT,
      capture_output=True, text=True, timeout=300, check=False)


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_prints_one_json_object_of_task_scores(tmp_path):
  records = [
      # qa_f1: 1 and 2/3 (P = R = 2/3) -> 100 * (5/3) / 2 = 83.33.
      {"task": "hotpotqa", "pred": "The Beatles.", "answers": ["beatles", "Fab Four"]},
      {"task": "hotpotqa", "pred": "x x y", "answers": ["x y y"]},
      # first line "City" -> 1; "Country or City" -> 1/2: 75.
      {"task": "trec", "pred": "\nCity\nCountry", "answers": ["City"], "all_classes": TREC_CLASSES},
      {"task": "trec", "pred": "Country or City", "answers": ["City"],
       "all_classes": TREC_CLASSES},
      # code_sim of "return a + c" vs "return a + b": 22/24 = 91.67 -> 92 -> 92.0.
      {"task": "lcc", "pred": "# add\nreturn a + c\n", "answers": ["return a + b"]},
      # retrieval: numbers 22 and 7 -> 1/2.
      {"task": "passage_retrieval_en", "pred": "Paragraph 22 or 7", "answers": ["Paragraph 22"]},
  ]
  path = tmp_path / "preds.jsonl"
  _write_jsonl(path, records)
  run = _score(path)
  assert run.returncode == 0, run.stderr
  lines = run.stdout.strip().splitlines()
  assert len(lines) == 1
  assert json.loads(lines[0]) == {
      "hotpotqa": 83.33, "lcc": 92.0, "passage_retrieval_en": 50.0, "trec": 75.0}


def test_bad_input_exits_with_a_clear_error(tmp_path):
  path = tmp_path / "preds.jsonl"
  _write_jsonl(path, [{"task": "lsht", "pred": "x", "answers": ["x"], "all_classes": ["x"]}])
  run = _score(path)
  assert run.returncode != 0
  assert "error: task='lsht' is a Chinese LongBench task" in run.stderr
  path.write_text('{"task": "lcc", "pred": "x", "answers": ["x"]}\nnot json\n', encoding="utf-8")
  run = _score(path)
  assert run.returncode != 0 and f"{path}:2: not a JSON line" in run.stderr
