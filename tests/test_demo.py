"""Runs of experiments/demo.py: the needle demo on a tiny random model, and the story fallback."""

from __future__ import annotations

import os
import subprocess
import sys

import jax.numpy as jnp
from flax import nnx

from models.llama import LlamaConfig
from models.llama.tokenizer import load_tokenizer
from squeezed_jax.eval.multiquery import multiquery_example
from squeezed_jax.training import export, train_step

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
LLAMA2 = load_tokenizer("assets/tokenizers/llama2_tokenizer.model")


def _demo(*flags):
  return subprocess.run([sys.executable, "-m", "experiments.demo", *flags], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, check=False)


def test_needle_demo_answers_with_dense_and_squeezed_attention(tmp_path):
  config = LlamaConfig(vocab_size=32000, hidden_size=16, intermediate_size=32, num_layers=1,
                       num_heads=2, num_kv_heads=1, head_dim=8, tie_word_embeddings=True,
                       max_position_embeddings=2048, dtype=jnp.bfloat16)
  graphdef, params = nnx.split(train_step.init_model(config, seed=0))
  export.export_hf(export.cast_model(graphdef, params), tmp_path)
  run = _demo(f"--model_dir={tmp_path}", "--context_tokens=700", "--num_needles=2",
              "--max_new_tokens=3")
  assert run.returncode == 0, run.stderr
  example = multiquery_example(LLAMA2, example_id="demo", num_tokens=700, num_questions=2,
                               seed=0)
  assert f"fixed context: {len(example.context)} tokens" in run.stdout
  assert "dense:" in run.stdout and "squeezed, 90% of keys pruned:" in run.stdout
  for question, (gold,) in zip(example.questions, example.answers):
    key = LLAMA2.decode(question).split(" for ")[1].split()[0]
    assert run.stdout.count(f"{key}: ") == 2 and run.stdout.count(f"gold {gold}") == 2
  assert run.stdout.count("KV budget") == 2 and "tokens/s once compiled" in run.stdout


def test_falls_back_to_the_story_model(tmp_path):
  run = _demo(f"--model_dir={tmp_path / 'missing'}", "--story_tokens=20")
  assert run.returncode == 0, run.stderr
  assert "no needle model at" in run.stdout
  assert "Once upon a time, there was a little girl" in run.stdout
  assert "tokens/s" in run.stdout
