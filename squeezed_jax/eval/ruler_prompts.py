"""Token ids of RULER-style examples with exactly the same shapes at a given length.

Jitted code compiles once per shape: the offline build once per context length, and every online
method once per (context length, question length). A sweep therefore gives every example of a
length the same context length and the same question length:

1. `padded_context_ids`: the generator's context (whole sentences, so a little short of its
   budget) is brought to an exact token count with filler: the essay text that follows the
   haystack, in tokens, inserted at the end of the haystack (before the context's final newline,
   after any needle there), so no needle is cut or moved by more than the filler's length.
2. `ruler_prompt`: the prompt `BOS + context + question` is padded to exactly `num_tokens` tokens,
   and its last `question_tokens` become the user input: the question, preceded by the last few
   tokens of the haystack. This is the question padded to a fixed bucket, on its left, with the
   very tokens that precede it, so the model reads exactly the unsplit prompt. Those few haystack
   tokens are attended densely as user input; they would be anyway, inside the always-attended
   observation window (W = 100 by default) at the end of the fixed context.
"""

from __future__ import annotations

from squeezed_jax.eval.haystack import TextTokenizer, haystack_for
from squeezed_jax.eval.prompt_templates import PromptIds
from squeezed_jax.eval.ruler_tasks import TaskExample

# Greedy decoding stops after this many new tokens, or at EOS (RULER: 128 for its needle tasks, 30
# for variable tracking, 120 for common words). The answers here are at most 4 numbers of 7 digits,
# one UUID or 5 variable names; one value for all of them lets the tasks share compiled code.
MAX_NEW_TOKENS: dict[str, int] = {
    "single_needle": 64, "multi_key_needle": 64, "multi_value_needle": 64, "kv_lookup": 64,
    "variable_tracking": 64, "common_words": 128,
}


def _common_prefix_length(a: list[int], b: list[int]) -> int:
  length = 0
  for x, y in zip(a, b):
    if x != y:
      break
    length += 1
  return length


def filler_ids(tokenizer: TextTokenizer, example: TaskExample, count: int) -> list[int]:
  """`count` tokens of the essay sentences that follow the example's haystack (no BOS)."""
  haystack = haystack_for(tokenizer)
  start = (example.metadata.get("haystack_start", 0)
           + example.metadata.get("haystack_sentences", 0))
  ids: list[int] = []
  sentences = 4
  while len(ids) < count:
    ids = tokenizer.encode(" ".join(haystack.sentence_run(start, sentences)), bos=False)
    sentences *= 2
  return ids[:count]


def padded_context_ids(tokenizer: TextTokenizer, example: TaskExample,
                       num_tokens: int) -> list[int]:
  """The example's context with BOS, padded with filler to exactly `num_tokens` tokens.

  Filler goes right before the tokens of the context's trailing newlines (where the encodings of
  the context with and without them part). ValueError if the context is already longer.
  """
  ids = tokenizer.encode(example.context, bos=True)
  missing = num_tokens - len(ids)
  if missing < 0:
    raise ValueError(f"{example.task} context has {len(ids)} tokens, more than {num_tokens=}")
  if not missing:
    return ids
  at = _common_prefix_length(ids, tokenizer.encode(example.context.rstrip("\n"), bos=True))
  return ids[:at] + filler_ids(tokenizer, example, missing) + ids[at:]


def ruler_prompt(tokenizer: TextTokenizer, example: TaskExample, *, num_tokens: int,
                 question_tokens: int) -> PromptIds:
  """Context of num_tokens - question_tokens ids and user input of question_tokens ids.

  `example` must have been generated for at most `num_tokens` prompt tokens; its question (encoded
  without BOS) must fit in `question_tokens`.
  """
  question = tokenizer.encode(example.question, bos=False)
  if len(question) > question_tokens:
    raise ValueError(f"{example.task} question has {len(question)} tokens, more than "
                     f"{question_tokens=}; raise question_tokens")
  if question_tokens >= num_tokens:
    raise ValueError(f"{question_tokens=} must be below {num_tokens=}")
  prompt = padded_context_ids(tokenizer, example, num_tokens - len(question)) + question
  split = num_tokens - question_tokens
  return PromptIds(context=prompt[:split], question=prompt[split:])
