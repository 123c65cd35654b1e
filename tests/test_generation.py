"""Tests for squeezed_jax.generation: the jitted decode loop against a naive recompute loop."""

import jax.numpy as jnp
import pytest
from flax import nnx

from models.llama import PRESETS, Llama
from squeezed_jax.generation import generate_tokens, pad_prompts


@pytest.fixture(scope="module")
def model():
  return Llama(PRESETS["tiny"], rngs=nnx.Rngs(7))


def _greedy_by_recompute(model, prompt, steps):
  seq = list(prompt)
  for _ in range(steps):
    logits, _ = model(jnp.array([seq]), jnp.arange(len(seq))[None])
    seq.append(int(logits[0, -1].argmax()))
  return seq[len(prompt):]


def test_batched_chunked_greedy_equals_recompute(model):
  prompts = [[1, 17, 33, 45, 60, 2, 9], [1, 200], [1, 5, 6, 7]]
  result = generate_tokens(model, prompts, max_new_tokens=5, stop_tokens=[], prefill_chunk=3)
  for prompt, got in zip(prompts, result.token_ids):
    assert got == _greedy_by_recompute(model, prompt, 5)
  assert result.stopped == [False] * 3


def test_stop_token_ends_generation(model):
  prompt = [1, 17, 33]
  free = generate_tokens(model, [prompt], max_new_tokens=6, stop_tokens=[]).token_ids[0]
  stop = free[2]
  result = generate_tokens(model, [prompt], max_new_tokens=6, stop_tokens=[stop])
  assert result.token_ids[0] == free[:free.index(stop)]
  assert result.stopped == [True]


def test_pad_prompts():
  tokens, lengths = pad_prompts([[1, 2, 3], [4]], 2)
  assert tokens.tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]
  assert lengths.tolist() == [3, 1]


def test_errors(model):
  with pytest.raises(ValueError, match="empty prompt"):
    generate_tokens(model, [[1], []], max_new_tokens=2)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    generate_tokens(model, [[1] * 500], max_new_tokens=20)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate_tokens(model, [[1]], max_new_tokens=0)
