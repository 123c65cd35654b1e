"""Tests of `squeezed_jax.training.retrieval_examples`: token-level RULER-style examples."""

from __future__ import annotations

import numpy as np
import pytest

from models.llama.tokenizer import load_tokenizer
from squeezed_jax.eval import ruler_tasks
from squeezed_jax.training import essay_corpus, retrieval_examples
from squeezed_jax.training.retrieval_examples import RETRIEVAL_TASKS, Role

LLAMA2 = load_tokenizer("assets/tokenizers/llama2_tokenizer.model")


@pytest.fixture(scope="module")
def builder():
  corpus = essay_corpus.essay_corpus_for(LLAMA2)
  return retrieval_examples.RetrievalExampleBuilder(LLAMA2, corpus, bos_id=LLAMA2.bos_id,
                                                    eos_id=LLAMA2.eos_id)


def _build(builder, task, num_tokens, seed):
  return builder.build(task, num_tokens=num_tokens, rng=np.random.default_rng(seed))


@pytest.mark.parametrize("task", RETRIEVAL_TASKS)
def test_deterministic_for_a_seed(builder, task):
  first, again, other = (_build(builder, task, 1500, seed) for seed in (3, 3, 4))
  np.testing.assert_array_equal(first.tokens, again.tokens)
  np.testing.assert_array_equal(first.roles, again.roles)
  assert first.answers == again.answers
  assert first.answers != other.answers


@pytest.mark.parametrize("task", RETRIEVAL_TASKS)
@pytest.mark.parametrize("num_tokens", [1024, 3000])
def test_answers_are_in_the_context_and_the_completion(builder, task, num_tokens):
  for seed in range(3):
    example = _build(builder, task, num_tokens, seed)
    tokens, roles = example.tokens, example.roles
    context = LLAMA2.decode(tokens[:example.num_prompt_tokens].tolist())
    completion = LLAMA2.decode(tokens[example.num_prompt_tokens:].tolist())
    for answer in example.answers:
      assert answer in context
      assert answer in completion
    assert tokens[0] == LLAMA2.bos_id and tokens[-1] == LLAMA2.eos_id
    assert roles[0] == Role.HIDDEN
    np.testing.assert_array_equal(roles[example.num_prompt_tokens:], Role.ANSWER)
    assert not np.any(roles[:example.num_prompt_tokens] == Role.ANSWER)
    # The whole haystack is used: less than one sentence of the budget is left over.
    assert num_tokens - 400 < len(tokens) <= num_tokens


def test_layout_matches_the_text_level_prompt(builder):
  """BOS + intro + haystack with needles + newline + question, as encoding the texts gives."""
  example = _build(builder, "multi_key_needle", 2000, seed=1)
  prompt = example.tokens[:example.num_prompt_tokens].tolist()
  text = LLAMA2.decode(prompt)
  context, question_start, question = text.partition("\nWhat is the special magic number")
  assert context.startswith(ruler_tasks.NEEDLE_INTRO.strip())
  reencoded = (LLAMA2.encode(context + "\n", bos=True)
               + LLAMA2.encode(question_start[1:] + question, bos=False))
  # Pieces are encoded apart; merges across piece boundaries change a few ids at most.
  assert abs(len(reencoded) - len(prompt)) <= 3
  needles = [LLAMA2.decode(example.tokens[i:j].tolist())
             for i, j in _runs(example.roles == Role.HIDDEN)][1:]  # The first run is BOS.
  assert len(needles) >= 2
  assert all(n.startswith("The special magic number for ") for n in needles)


def _runs(mask):
  """(start, end) of each run of True in `mask`."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
  return list(zip(edges[::2], edges[1::2]))


def test_too_small_a_budget_does_not_fit(builder):
  with pytest.raises(retrieval_examples.DoesNotFit, match="kv_lookup"):
    _build(builder, "kv_lookup", 60, seed=0)
  with pytest.raises(ValueError, match="unknown task='nope'"):
    _build(builder, "nope", 1000, seed=0)


def test_continuation_ids():
  ids = retrieval_examples.continuation_ids(LLAMA2, "The number is", " 1234567.")
  assert LLAMA2.encode("The number is", bos=False) + ids == LLAMA2.encode("The number is 1234567.",
                                                                          bos=False)
  with pytest.raises(ValueError, match="changes the prefix"):
    retrieval_examples.continuation_ids(LLAMA2, "hel", "lo world")
