"""Tests of fixed-shape RULER prompts (`ruler_prompts`): padding, split, shapes per length."""

from __future__ import annotations

import pytest

from models.llama.tokenizer import load_tokenizer
from squeezed_jax.eval import ruler_prompts, ruler_tasks
from squeezed_jax.eval.haystack import haystack_for

LLAMA2 = load_tokenizer("assets/tokenizers/llama2_tokenizer.model")
TOK512 = load_tokenizer("assets/stories260K/tok512.bin")
# Options that fit every task in a few hundred tokens.
SMALL_OPTIONS = {"common_words": {"num_common": 4, "common_freq": 6, "uncommon_freq": 2},
                 "kv_lookup": {"num_pairs": 2}}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_padding_inserts_following_essay_tokens_before_the_final_newline(seed):
  example = ruler_tasks.make_example("multi_key_needle", num_tokens=1500, tokenizer=LLAMA2,
                                     seed=seed)
  ids = LLAMA2.encode(example.context, bos=True)
  missing = 37 + seed
  padded = ruler_prompts.padded_context_ids(LLAMA2, example, len(ids) + missing)
  assert len(padded) == len(ids) + missing
  at = next(i for i, (a, b) in enumerate(zip(ids, padded)) if a != b)
  assert padded[:at] == ids[:at] and padded[at + missing:] == ids[at:]
  assert LLAMA2.decode(ids[at:]).strip("\n ") == ""  # only the trailing newline comes after
  haystack = haystack_for(LLAMA2)
  following = haystack.sentence_run(
      example.metadata["haystack_start"] + example.metadata["haystack_sentences"], 8)
  assert padded[at:at + missing] == LLAMA2.encode(" ".join(following), bos=False)[:missing]
  text = LLAMA2.decode(padded)
  assert all(needle in text for needle in example.metadata["needles"])


def test_padding_to_fewer_tokens_than_the_context_is_an_error():
  example = ruler_tasks.make_example("single_needle", num_tokens=600, tokenizer=LLAMA2, seed=4)
  num_context = len(LLAMA2.encode(example.context, bos=True))
  assert ruler_prompts.padded_context_ids(LLAMA2, example, num_context) == LLAMA2.encode(
      example.context, bos=True)
  with pytest.raises(ValueError, match=f"more than num_tokens={num_context - 1}"):
    ruler_prompts.padded_context_ids(LLAMA2, example, num_context - 1)


@pytest.mark.parametrize("tokenizer,num_tokens,question_tokens",
                         [(LLAMA2, 2048, 128), (TOK512, 448, 160)])
def test_every_example_of_a_length_has_the_same_shapes(tokenizer, num_tokens, question_tokens):
  for task in ruler_tasks.TASKS:
    for seed in (0, 1):
      example = ruler_tasks.make_example(task, num_tokens=num_tokens, tokenizer=tokenizer,
                                         seed=seed, **SMALL_OPTIONS.get(task, {}))
      prompt = ruler_prompts.ruler_prompt(tokenizer, example, num_tokens=num_tokens,
                                          question_tokens=question_tokens)
      assert len(prompt.context) == num_tokens - question_tokens
      assert len(prompt.question) == question_tokens
      question = tokenizer.encode(example.question, bos=False)
      full = prompt.context + prompt.question
      assert full[-len(question):] == question
      assert full[:-len(question)] == ruler_prompts.padded_context_ids(
          tokenizer, example, num_tokens - len(question))


def test_question_longer_than_its_bucket_is_an_error():
  example = ruler_tasks.make_example("kv_lookup", num_tokens=2048, tokenizer=LLAMA2, seed=0)
  length = len(LLAMA2.encode(example.question, bos=False))
  with pytest.raises(ValueError, match=f"question has {length} tokens, more than "
                                       f"question_tokens={length - 1}"):
    ruler_prompts.ruler_prompt(LLAMA2, example, num_tokens=2048, question_tokens=length - 1)
  with pytest.raises(ValueError, match="question_tokens=2048 must be below num_tokens=2048"):
    ruler_prompts.ruler_prompt(LLAMA2, example, num_tokens=2048, question_tokens=2048)
