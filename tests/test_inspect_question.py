"""End-to-end run of experiments.inspect_question on a stories260K fixed context (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from tests.conftest import STORIES_DIR

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


def test_writes_the_pictures_and_their_numbers(stories_context, tmp_path):
  context_dir = str(tmp_path / "ctx")
  stories_context.save(context_dir)
  output_dir = tmp_path / "pictures"
  run = subprocess.run(
      [sys.executable, "-m", "experiments.inspect_question",
       f"--checkpoint={os.path.join(STORIES_DIR, 'stories260K.bin')}",
       f"--tokenizer={os.path.join(STORIES_DIR, 'tok512.bin')}", f"--context_dir={context_dir}",
       "--question= Where was the dog?", "--kv_head=1", "--budgets=0.1,0.3,1.0",
       f"--output_dir={output_dir}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert run.returncode == 0, run.stderr
  names = ("selected_keys.png", "mass_vs_budget.png", "inspection.json")
  assert run.stdout.strip().splitlines()[-3:] == [
      f"wrote {os.path.abspath(output_dir / name)}" for name in names]
  for name in names[:2]:
    assert (output_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
  record = json.loads((output_dir / "inspection.json").read_text())
  config = stories_context.model_config
  assert record["layer"] == config.num_layers // 2 and record["budgets"] == [0.1, 0.3, 1.0]
  assert np.shape(record["selected_key_fraction"]) == (config.num_layers, config.num_kv_heads)
  assert set(record["curves"]) == {"squeezed", "quest", "oracle_topk"}
  for curve in record["curves"].values():
    mass = np.asarray(curve["mass"])
    assert mass.shape == (config.num_kv_heads, 3)
    np.testing.assert_allclose(mass[:, -1], 1.0, atol=1e-3)  # the whole context: all the mass


def test_bad_flags_fail_with_a_message(tmp_path):
  run = subprocess.run(
      [sys.executable, "-m", "experiments.inspect_question",
       f"--checkpoint={os.path.join(STORIES_DIR, 'stories260K.bin')}",
       f"--context_dir={tmp_path}", f"--output_dir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert run.returncode != 0
  assert "give exactly one of --question and --question_ids" in run.stderr
