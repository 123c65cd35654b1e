"""Tests of `squeezed_jax.training.needle_eval`: greedy needle accuracy, held-out perplexity."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from models.llama import LlamaConfig
from models.llama.tokenizer import load_tokenizer
from squeezed_jax.eval import ruler_tasks
from squeezed_jax.generation import generate_tokens
from squeezed_jax.training import essay_corpus, needle_eval, train_step
from squeezed_jax.training.causal_attention import causal_attention

LLAMA2 = load_tokenizer("assets/tokenizers/llama2_tokenizer.model")
CONFIG = LlamaConfig(vocab_size=32000, hidden_size=16, intermediate_size=32, num_layers=1,
                     num_heads=2, num_kv_heads=1, head_dim=8, tie_word_embeddings=True,
                     max_position_embeddings=2048)


@pytest.fixture(scope="module")
def model():
  return train_step.init_model(CONFIG, seed=0)


def test_greedy_generate_matches_generate_tokens(model):
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 32000, n).tolist() for n in (5, 40, 23)]
  got = needle_eval.greedy_generate(model, prompts, capacity=256, max_new_tokens=6)
  expected = generate_tokens(model, prompts, max_new_tokens=6).token_ids
  assert got == expected
  with pytest.raises(ValueError, match="exceeds capacity=32"):
    needle_eval.greedy_generate(model, prompts, capacity=32, max_new_tokens=6)


def test_needle_accuracy_scores_greedy_answers(model, monkeypatch):
  num_tokens, seed = 600, 7
  gold = [ruler_tasks.make_example("single_needle", num_tokens=num_tokens, tokenizer=LLAMA2,
                                   seed=seed + i).answers[0] for i in range(5)]
  calls = []

  def fake_generate(model, prompts, *, capacity, max_new_tokens):
    calls.append((len(prompts), capacity, max_new_tokens))
    first = len(calls) * 2 - 2
    answers = (gold + gold[-1:])[first:first + len(prompts)]
    return [LLAMA2.encode(f" {a}." if i % 2 == 0 else " 0000000.", bos=False)
            for i, a in enumerate(answers)]

  monkeypatch.setattr(needle_eval, "greedy_generate", fake_generate)
  result = needle_eval.needle_accuracy(model, LLAMA2, num_tokens=num_tokens, num_examples=5,
                                       seed=seed, batch_size=2)
  # Even positions of each batch of two answer right: examples 0, 2 and 4.
  assert result.accuracy == pytest.approx(3 / 5)
  assert calls == [(2, 768, 16)] * 3  # The last batch is padded to the batch size.
  assert result.answers == [[a] for a in gold]
  assert result.mean_prompt_tokens <= num_tokens
  assert result.summary() == {"task": "single_needle", "num_tokens": num_tokens,
                              "accuracy": result.accuracy, "num_examples": 5,
                              "mean_prompt_tokens": result.mean_prompt_tokens}


def test_heldout_windows_are_consecutive_after_bos():
  split = essay_corpus.essay_corpus_for(LLAMA2).heldout
  windows = needle_eval.heldout_windows(split, seq_len=1000, bos_id=1)
  assert windows.shape == (split.num_tokens // 1000, 1001)
  assert np.all(windows[:, 0] == 1)
  np.testing.assert_array_equal(windows[:, 1:].reshape(-1), split.tokens[:windows.shape[0] * 1000])
  with pytest.raises(ValueError, match="fewer than seq_len"):
    needle_eval.heldout_windows(split, seq_len=split.num_tokens + 1, bos_id=1)


def test_heldout_loss_is_the_mean_nll(model):
  windows = np.random.default_rng(1).integers(3, 32000, (3, 17)).astype(np.int32)
  attention = causal_attention("xla")
  loss = needle_eval.heldout_loss(model, windows, batch_size=2, attention_fn=attention)
  inputs = jnp.asarray(windows[:, :-1])
  logits, _ = model(inputs, train_step.row_positions(inputs), None, attention)
  expected = float(jnp.mean(train_step.token_nll(logits, jnp.asarray(windows[:, 1:]))))
  assert loss == pytest.approx(expected, rel=1e-5)
