"""End-to-end runs of experiments/train_llama.py on CPU: train, export, evaluate, resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from models.llama.checkpoint import load_checkpoint

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
TINY = ["--config_overrides=hidden_size=16,intermediate_size=32,num_layers=1,num_heads=2,"
        "num_kv_heads=1,head_dim=8", "--steps=3", "--seq_lens=256", "--stage_fractions=1",
        "--tokens_per_batch=512", "--min_doc_tokens=64", "--warmup_steps=1", "--save_every=1",
        "--keep_checkpoints=3",
        "--log_every=1", "--data_workers=0", "--heldout_seq_len=256"]


def _train(*flags):
  return subprocess.run([sys.executable, "-m", "experiments.train_llama", *TINY, *flags],
                        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def _records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _computed(record):
  """What a step computed (not its timing)."""
  return {k: v for k, v in record.items() if k not in ("tokens_per_second", "elapsed_seconds")}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("train")
  run = _train(f"--workdir={workdir}", f"--export_dir={workdir / 'export'}",
               "--eval_lengths=400", "--eval_examples=2", "--eval_batch_size=2")
  assert run.returncode == 0, run.stderr
  return workdir, run.stdout


def test_trains_exports_and_evaluates(first_run):
  workdir, stdout = first_run
  export = workdir / "export"
  assert "the reload gives identical logits" in stdout
  assert f"checkpoints in {workdir / 'checkpoints'}" in stdout and str(export) in stdout
  records = _records(workdir)
  assert [r["step"] for r in records[:3]] == [1, 2, 3]
  assert all(r["seq_len"] == 256 and r["loss"] > 0 for r in records[:3])
  assert "final" in records[-1]
  results = json.loads((export / "eval.json").read_text())
  assert results["steps"] == 3 and results["heldout"]["perplexity"] > 1
  (needle,) = results["needle"]
  assert needle["task"] == "single_needle" and needle["num_tokens"] == 400
  assert 0.0 <= needle["accuracy"] <= 1.0 and needle["num_examples"] == 2
  assert (export / "loss_curve.png").stat().st_size > 0
  model, config = load_checkpoint(export)
  assert config.vocab_size == 32000 and config.hidden_size == 16
  assert all(p.stat().st_size <= 15_000_000 for p in export.glob("*.safetensors"))


def test_resumes_from_the_latest_checkpoint_as_if_never_stopped(first_run, tmp_path):
  workdir, _ = first_run
  shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
  for step in ("2", "3"):  # As if the run had crashed after step 1.
    shutil.rmtree(tmp_path / "checkpoints" / step)
  run = _train(f"--workdir={tmp_path}")
  assert run.returncode == 0, run.stderr
  assert "resumed from the checkpoint of step 1" in run.stderr
  assert "training steps 1..3" in run.stdout
  # Steps 2 and 3 see the restored parameters, optimizer state and the same batches.
  assert ([_computed(r) for r in _records(tmp_path)]
          == [_computed(r) for r in _records(workdir)[1:3]])


def test_refuses_to_resume_a_run_with_other_settings(first_run, tmp_path):
  workdir, _ = first_run
  shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
  run = _train(f"--workdir={tmp_path}", "--learning_rate=0.1")
  assert run.returncode != 0
  assert "a run with other settings (['optimizer'])" in run.stderr
