"""End-to-end runs of the launchers, as a user types them (subprocesses, stories260K)."""

import json
import os
import subprocess
import sys

from tests.conftest import STORIES_DIR, STORY

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
MODEL = ["--checkpoint", os.path.join(STORIES_DIR, "stories260K.bin"),
         "--tokenizer", os.path.join(STORIES_DIR, "tok512.bin")]


def _run(module, *flags):
  return subprocess.run([sys.executable, "-m", module, *flags], cwd=ROOT, capture_output=True,
                        text=True, timeout=600, check=False)


def test_generate_prints_a_greedy_story_as_json():
  run = _run("experiments.generate", *MODEL, "--prompt=Once upon a time", "--max_new_tokens=30",
             "--json")
  assert run.returncode == 0, run.stderr
  result = json.loads(run.stdout.strip().splitlines()[-1])
  assert len(result["token_ids"]) == 30 and result["prompt_ids"][0] == 1
  assert result["text"].startswith(", there was a little girl")


def test_build_context_then_ask_a_question(tmp_path):
  context_file = tmp_path / "story.txt"
  context_file.write_text(STORY)
  output = str(tmp_path / "ctx")
  run = _run("experiments.build_context", *MODEL, f"--context_file={context_file}",
             f"--output={output}", "--observation_window=32", "--prefill_chunk=128")
  assert run.returncode == 0, run.stderr
  summary = json.loads(run.stdout.strip().splitlines()[-2])
  assert summary["output"] == output and set(summary["thresholds"]) == {"0.5", "0.7", "0.8", "0.9"}
  run = _run("experiments.generate", *MODEL, f"--context_dir={output}", "--prompt= Lily and the dog",
             "--method=squeezed", "--percentile=0.5", "--max_new_tokens=10", "--json")
  assert run.returncode == 0, run.stderr
  answer = json.loads(run.stdout.strip().splitlines()[-1])
  assert answer["method"] == "squeezed" and 0.0 < answer["mean_kv_budget"] < 1.0
  assert len(answer["token_ids"]) > 0


def test_bad_flags_fail_with_a_message():
  run = _run("experiments.generate", *MODEL, "--prompt_ids=1,x")
  assert run.returncode != 0 and "--prompt_ids must be comma-separated integers" in run.stderr
  run = _run("experiments.generate", "--checkpoint=/nonexistent.bin", "--prompt_ids=1")
  assert run.returncode != 0 and "nonexistent" in run.stderr
