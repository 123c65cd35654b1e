"""RULER-style retrieval examples built from token ids, fast enough to feed training on the fly.

The facts (needles, question, answers) come from the same helpers as the text-level tasks of
`squeezed_jax.eval.ruler_tasks`, so training and evaluation ask the same things in the same words.
Instead of encoding a whole text, an example concatenates pre-tokenised pieces:

    BOS, intro, haystack sentences with the needles between them, "\\n", question, completion, EOS

which is how `tokenizer.encode(context, bos=True) + tokenizer.encode(question + completion)` lays
out the ids, up to merges across piece boundaries. Each token carries a role that says how the
loss treats the prediction of that token: `TEXT` (language modelling), `HIDDEN` (not trained:
BOS and the needles, whose values are random) or `ANSWER` (the completion and EOS, weighted up).
"""

from __future__ import annotations

import dataclasses
import enum
import random
from typing import Callable, Sequence

import numpy as np

from squeezed_jax.eval import ruler_tasks
from squeezed_jax.eval.haystack import TextTokenizer
from squeezed_jax.training.essay_corpus import EssayCorpus


class DoesNotFit(ValueError):
  """An example's facts need more tokens than it may have."""


class Role(enum.IntEnum):
  """How the loss treats the prediction of a token."""

  TEXT = 0
  HIDDEN = 1
  ANSWER = 2


@dataclasses.dataclass(frozen=True)
class TokenExample:
  """One retrieval example as token ids.

  tokens: [N] int32, starting with BOS and ending with EOS. roles: [N] int8 `Role` values.
  num_prompt_tokens: the ids before the completion (what a model is given to answer).
  """

  task: str
  tokens: np.ndarray
  roles: np.ndarray
  answers: list[str]
  num_prompt_tokens: int


# Per task: the facts of one example, with the task's options drawn per example from `rng` (at
# most as many JSON pairs as `num_tokens`, the example's length, has room for).
def _single_needle(rng: random.Random, vocabulary: Sequence[str],
                   num_tokens: int) -> ruler_tasks.HiddenFacts:
  del num_tokens  # One short needle fits any length.
  return ruler_tasks.keyed_needles_facts(rng, vocabulary, num_keys=1)


def _multi_key_needle(rng: random.Random, vocabulary: Sequence[str],
                      num_tokens: int) -> ruler_tasks.HiddenFacts:
  del num_tokens  # A few short needles fit any length.
  return ruler_tasks.keyed_needles_facts(rng, vocabulary, num_keys=rng.randint(2, 6))


def _multi_value_needle(rng: random.Random, vocabulary: Sequence[str],
                        num_tokens: int) -> ruler_tasks.HiddenFacts:
  del num_tokens  # A few short needles fit any length.
  return ruler_tasks.multi_value_needle_facts(rng, vocabulary, num_values=rng.randint(2, 4))


def _kv_lookup(rng: random.Random, vocabulary: Sequence[str],
               num_tokens: int) -> ruler_tasks.HiddenFacts:
  del vocabulary  # Keys are UUIDs.
  max_pairs = max(1, min(16, num_tokens // 256))  # A pair takes about 60 tokens.
  return ruler_tasks.kv_lookup_facts(rng, num_pairs=rng.randint(1, max_pairs))


def _variable_tracking(rng: random.Random, vocabulary: Sequence[str],
                       num_tokens: int) -> ruler_tasks.HiddenFacts:
  del vocabulary, num_tokens  # Names are random letters; a few statements fit any length.
  return ruler_tasks.variable_tracking_facts(rng, num_chains=rng.randint(1, 2),
                                             num_hops=rng.randint(1, 4))


def _list_completion(facts: ruler_tasks.HiddenFacts) -> str:
  """The answers in order, comma-separated, after a space and before a period."""
  return " " + ", ".join(facts.answers) + "."


def _quoted_completion(facts: ruler_tasks.HiddenFacts) -> str:
  """The JSON value, quoted as it is in the haystack."""
  return f' "{facts.answers[0]}".'


# Per task: how to draw its facts, and what a perfect answer continues the question with.
_TASKS: dict[str, tuple[Callable[..., ruler_tasks.HiddenFacts],
                        Callable[[ruler_tasks.HiddenFacts], str]]] = {
    "single_needle": (_single_needle, _list_completion),
    "multi_key_needle": (_multi_key_needle, _list_completion),
    "multi_value_needle": (_multi_value_needle, _list_completion),
    "kv_lookup": (_kv_lookup, _quoted_completion),
    "variable_tracking": (_variable_tracking, _list_completion),
}
RETRIEVAL_TASKS = tuple(_TASKS)


def continuation_ids(tokenizer: TextTokenizer, prefix: str, continuation: str) -> list[int]:
  """The ids `continuation` adds when encoded right after `prefix` (no BOS).

  ValueError if encoding `prefix + continuation` does not start with the ids of `prefix`.
  """
  prefix_ids = tokenizer.encode(prefix, bos=False)
  ids = tokenizer.encode(prefix + continuation, bos=False)
  if ids[:len(prefix_ids)] != prefix_ids:
    raise ValueError(f"encoding {continuation=} after {prefix=} changes the prefix's ids")
  return ids[len(prefix_ids):]


class RetrievalExampleBuilder:
  """Builds `TokenExample`s of the retrieval tasks from a tokenised essay corpus (train split)."""

  def __init__(self, tokenizer: TextTokenizer, corpus: EssayCorpus, *, bos_id: int, eos_id: int):
    self.tokenizer = tokenizer
    self.corpus = corpus
    self.bos_id, self.eos_id = bos_id, eos_id
    self.newline_ids = np.asarray(continuation_ids(tokenizer, "text", "\n"), np.int32)
    self._intro_ids: dict[str, np.ndarray] = {}

  def _encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tokenizer.encode(text, bos=False), np.int32)

  def build(self, task: str, *, num_tokens: int, rng: np.random.Generator) -> TokenExample:
    """The `task` example of at most `num_tokens` ids with the longest haystack that fits.

    All randomness comes from `rng`. DoesNotFit if `num_tokens` cannot hold the facts.
    """
    if task not in _TASKS:
      raise ValueError(f"unknown {task=}; expected one of {RETRIEVAL_TASKS}")
    draw_facts, completion_of = _TASKS[task]
    facts_rng = random.Random(int(rng.integers(2**63)))
    facts = draw_facts(facts_rng, self.corpus.vocabulary, num_tokens)
    if facts.intro not in self._intro_ids:
      self._intro_ids[facts.intro] = self._encode(facts.intro)
    intro = self._intro_ids[facts.intro]
    needles = [self._encode(needle) for needle in facts.needles]
    question = self._encode(facts.question)
    completion = np.asarray(
        continuation_ids(self.tokenizer, facts.question, completion_of(facts)) + [self.eos_id],
        np.int32)
    fixed = (1 + len(intro) + sum(map(len, needles)) + len(self.newline_ids) + len(question)
             + len(completion))
    budget = num_tokens - fixed
    if budget < 0:
      raise DoesNotFit(f"task {task!r} needs {fixed} tokens without haystack, more than "
                       f"{num_tokens=}")
    split = self.corpus.train
    run = split.sentence_run(split.random_start(rng, budget), budget)
    depths = sorted(rng.random(len(needles)).tolist())
    parts, needle_parts = ruler_tasks.interleave_needles(run, needles, depths)
    part_roles = np.full(len(parts), Role.TEXT, np.int8)
    part_roles[needle_parts] = Role.HIDDEN
    pieces = ([np.asarray([self.bos_id], np.int32), intro] + parts
              + [self.newline_ids, question, completion])
    roles = np.concatenate([[Role.HIDDEN, Role.TEXT], part_roles,
                            [Role.TEXT, Role.TEXT, Role.ANSWER]]).astype(np.int8)
    tokens = np.concatenate(pieces)
    roles = np.repeat(roles, [len(piece) for piece in pieces])
    return TokenExample(task=task, tokens=tokens, roles=roles, answers=facts.answers,
                        num_prompt_tokens=len(tokens) - len(completion))
