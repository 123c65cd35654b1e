"""RULER-style synthetic long-context tasks on the Paul Graham essay haystack, and their scorers.

Each generator makes one `TaskExample` from a seed (all randomness from `random.Random(seed)`), so
the same seed gives the same example. The fixed `context` ends right before the `question` (the
user input, ending with the start of the answer for the model to complete). Its length in tokens
is measured as the model sees it when the context is prefilled and the question appended:

    len(tokenizer.encode(context, bos=True)) + len(tokenizer.encode(question, bos=False))

and is the largest not above `num_tokens` that whole haystack sentences (or, for `common_words`,
whole words of the list) allow.

Tasks (`TASKS`), after RULER (NVIDIA/RULER):
  single_needle: "The special magic number for <key> is <7 digits>." at a seed-chosen depth.
  multi_key_needle: several such needles with different keys; one key is asked.
  multi_value_needle: several values for one key; all are asked.
  kv_lookup: a JSON object of UUID keys -> UUID values in the haystack; one key is asked.
  variable_tracking: chains "VAR X = 12345.", "VAR Y = VAR X.", ... spread through the haystack;
    the variables holding the first chain's value are asked.
  common_words: a numbered list where a few words repeat many times; the most common are asked.

The haystack tasks first draw what they hide and ask (`HiddenFacts`, from the public `*_facts`
helpers) and then place it in a text haystack; token-level builders (the training data of
`squeezed_jax.training`) place the same facts in a haystack of token ids.

Scorers: `ruler_score` (RULER's string_match_all: the fraction of answers found in the prediction)
and `string_match_part` (RULER's string_match_part: 1 if any answer is found), both ignoring case.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re
import uuid
from typing import Any, Callable, Sequence, TypeVar

from squeezed_jax.eval.haystack import TextTokenizer, haystack_for, largest_fitting_size

NEEDLE_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to "
                "memorize them. I will quiz you about the numbers afterwards.\n")
KV_INTRO = ("A JSON object of UUID keys and values is hidden within the following text. Make sure "
            "to memorize it. I will quiz you about its values afterwards.\n")
VARIABLE_INTRO = ("Memorize and track the chains of variable assignments hidden in the following "
                  "text.\n")
COMMON_WORDS_INTRO = ("Below is a numbered list of words. Some of them appear more often than "
                      "others. Memorize the ones that appear most often.\n")

_WORD = re.compile(r"\b[a-z]{3,}\b")
Part = TypeVar("Part")


@dataclasses.dataclass(frozen=True)
class TaskExample:
  """One synthetic example: `context + question` is the prompt, `answers` the expected strings.

  `metadata` always holds `prompt_tokens` (the measured length, see the module docstring) and
  task-specific facts, e.g. for the haystack tasks `needles` (the inserted texts), `needle_offsets`
  (their character offsets in `context`), `depths` (their drawn relative depths in [0, 1)),
  `haystack_start` and `haystack_sentences` (the first essay sentence's index and their count).
  """
  task: str
  context: str
  question: str
  answers: list[str]
  metadata: dict[str, Any]


def prompt_num_tokens(tokenizer: TextTokenizer, context: str, question: str) -> int:
  """Tokens of `context` encoded with BOS plus `question` encoded without it."""
  return len(tokenizer.encode(context, bos=True)) + len(tokenizer.encode(question, bos=False))


@functools.lru_cache(maxsize=4)
def essay_vocabulary(sentences: tuple[str, ...]) -> tuple[str, ...]:
  """The distinct lowercase words (3+ letters) of `sentences`, sorted (keys are made of them)."""
  return tuple(sorted({word for sentence in sentences for word in _WORD.findall(sentence)}))


def random_keys(rng: random.Random, vocabulary: Sequence[str], count: int) -> list[str]:
  """`count` distinct "<word>-<word>" keys."""
  keys: list[str] = []
  while len(keys) < count:
    key = f"{rng.choice(vocabulary)}-{rng.choice(vocabulary)}"
    if key not in keys:
      keys.append(key)
  return keys


def distinct_numbers(rng: random.Random, count: int, digits: int) -> list[str]:
  """`count` distinct numbers of exactly `digits` digits, as strings."""
  return [str(n) for n in rng.sample(range(10**(digits - 1), 10**digits), count)]


def _random_uuid(rng: random.Random) -> str:
  """A version-4 UUID drawn from `rng`."""
  return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def interleave_needles(
    run: Sequence[Part], needles: Sequence[Part], depths: Sequence[float]
) -> tuple[list[Part], list[int]]:
  """The haystack `run` with `needles` inserted, and the needles' indices in it.

  Needle i goes before item `round(depths[i] * len(run))` of the run (a sentence, as text or as
  token ids); `depths` is sorted, so needles keep their order.
  """
  positions = [round(depth * len(run)) for depth in depths]
  parts, needle_parts = [], []
  needle = 0
  for index in range(len(run) + 1):
    while needle < len(needles) and positions[needle] == index:
      needle_parts.append(len(parts))
      parts.append(needles[needle])
      needle += 1
    if index < len(run):
      parts.append(run[index])
  return parts, needle_parts


def _insert_needles(
    intro: str, run: Sequence[str], needles: Sequence[str], depths: Sequence[float]
) -> tuple[str, list[int]]:
  """The context `intro + sentences with needles + "\\n"` and the needles' character offsets."""
  parts, needle_parts = interleave_needles(run, needles, depths)
  part_offsets, offset = [], len(intro)
  for part in parts:
    part_offsets.append(offset)
    offset += len(part) + 1
  offsets = [part_offsets[i] for i in needle_parts]
  return intro + " ".join(parts) + "\n", offsets


def _too_small(task: str, error: ValueError) -> ValueError:
  """The error for a `num_tokens` too small to hold `task`'s fixed text."""
  return ValueError(f"task {task!r}: {error}")


@dataclasses.dataclass(frozen=True)
class HiddenFacts:
  """What a haystack task hides and asks, drawn before any haystack is chosen.

  intro: the text before the haystack; needles: the texts hidden in it, in order; question: the
  user input; answers: the expected strings; metadata: task-specific facts (keys, chains, ...).
  Text-level examples (`make_example`) and token-level ones (e.g. training data) place the same
  facts in a haystack.
  """
  intro: str
  needles: list[str]
  question: str
  answers: list[str]
  metadata: dict[str, Any]


def haystack_example(
    task: str, *, tokenizer: TextTokenizer, num_tokens: int, rng: random.Random,
    facts: HiddenFacts
) -> TaskExample:
  """`facts` placed in an essay haystack: the `task` example of the longest haystack that fits.

  The haystack's first sentence and the needles' depths are drawn from `rng`; the length is
  measured as the module docstring says. ValueError if `num_tokens` cannot hold the facts.
  """
  haystack = haystack_for(tokenizer)
  start = haystack.random_start(rng)
  intro, needles, question = facts.intro, facts.needles, facts.question
  depths = sorted(rng.random() for _ in needles)

  def num_tokens_of_run(run: list[str]) -> int:
    return prompt_num_tokens(tokenizer, _insert_needles(intro, run, needles, depths)[0], question)

  try:
    count = haystack.fit(num_tokens_of_run, start=start, num_tokens=num_tokens,
                         overhead_tokens=num_tokens_of_run([]))
  except ValueError as e:
    raise _too_small(task, e) from None
  context, offsets = _insert_needles(intro, haystack.sentence_run(start, count), needles, depths)
  return TaskExample(
      task=task, context=context, question=question, answers=facts.answers,
      metadata=dict(facts.metadata, needles=needles, needle_offsets=offsets, depths=depths,
                    haystack_start=start, haystack_sentences=count,
                    prompt_tokens=prompt_num_tokens(tokenizer, context, question)))


def magic_number_needle(key: str, value: str) -> str:
  """The needle sentence hiding `value` under `key`."""
  return f"The special magic number for {key} is {value}."


def magic_number_question(key: str) -> str:
  """The question asking for the magic number of `key`, ending where the answer starts."""
  return (f"What is the special magic number for {key} mentioned in the provided text? "
          f"The special magic number for {key} mentioned in the provided text is")


def keyed_needles_facts(
    rng: random.Random, vocabulary: Sequence[str], *, num_keys: int
) -> HiddenFacts:
  """`num_keys` magic-number needles with distinct keys, of which one is asked."""
  keys = random_keys(rng, vocabulary, num_keys)
  values = distinct_numbers(rng, num_keys, digits=7)
  asked = rng.randrange(num_keys)
  return HiddenFacts(
      intro=NEEDLE_INTRO, needles=[magic_number_needle(k, v) for k, v in zip(keys, values)],
      question=magic_number_question(keys[asked]), answers=[values[asked]],
      metadata={"keys": keys, "asked_key": keys[asked]})


def multi_value_needle_facts(
    rng: random.Random, vocabulary: Sequence[str], *, num_values: int
) -> HiddenFacts:
  """`num_values` magic-number needles for one key; all values are asked."""
  (key,) = random_keys(rng, vocabulary, 1)
  values = distinct_numbers(rng, num_values, digits=7)
  question = (f"What are all the special magic numbers for {key} mentioned in the provided text? "
              f"The special magic numbers for {key} mentioned in the provided text are")
  return HiddenFacts(
      intro=NEEDLE_INTRO, needles=[magic_number_needle(key, v) for v in values],
      question=question, answers=values, metadata={"keys": [key], "asked_key": key})


def kv_lookup_facts(rng: random.Random, *, num_pairs: int) -> HiddenFacts:
  """A JSON object of `num_pairs` UUID -> UUID pairs (one needle); one key's value is asked."""
  pairs = [(_random_uuid(rng), _random_uuid(rng)) for _ in range(num_pairs)]
  key, value = pairs[rng.randrange(num_pairs)]
  json_object = "JSON data: {" + ", ".join(f'"{k}": "{v}"' for k, v in pairs) + "}"
  question = (f'What is the value of the key "{key}" in the JSON object? '
              f'The value of the key "{key}" is')
  return HiddenFacts(intro=KV_INTRO, needles=[json_object], question=question, answers=[value],
                     metadata={"asked_key": key, "num_pairs": num_pairs})


def variable_tracking_facts(
    rng: random.Random, *, num_chains: int, num_hops: int
) -> HiddenFacts:
  """`num_chains` assignment chains of `num_hops` hops; the first chain's variables are asked."""
  names: list[str] = []
  while len(names) < num_chains * (num_hops + 1):
    name = "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5))
    if name not in names:
      names.append(name)
  chains = [names[c * (num_hops + 1):(c + 1) * (num_hops + 1)] for c in range(num_chains)]
  values = distinct_numbers(rng, num_chains, digits=5)
  statements = [
      [f"VAR {chain[0]} = {value}."] +
      [f"VAR {chain[i]} = VAR {chain[i - 1]}." for i in range(1, num_hops + 1)]
      for chain, value in zip(chains, values)]
  order = [c for c in range(num_chains) for _ in range(num_hops + 1)]
  rng.shuffle(order)  # Interleaves the chains, each keeping its own order.
  next_statement = [0] * num_chains
  needles = []
  for c in order:
    needles.append(statements[c][next_statement[c]])
    next_statement[c] += 1
  question = (f"Find all variables that are assigned the value {values[0]} in the text above, "
              f"directly or through other variables. Answer: The {num_hops + 1} variables "
              f"assigned the value {values[0]} are:")
  return HiddenFacts(intro=VARIABLE_INTRO, needles=needles, question=question,
                     answers=chains[0], metadata={"chains": chains, "values": values})


def _vocabulary_of(tokenizer: TextTokenizer) -> tuple[str, ...]:
  return essay_vocabulary(haystack_for(tokenizer).sentences)


def single_needle(*, num_tokens: int, tokenizer: TextTokenizer, seed: int) -> TaskExample:
  """One magic-number needle; the answer is its 7-digit value."""
  rng = random.Random(seed)
  facts = keyed_needles_facts(rng, _vocabulary_of(tokenizer), num_keys=1)
  return haystack_example("single_needle", tokenizer=tokenizer, num_tokens=num_tokens, rng=rng,
                           facts=facts)


def multi_key_needle(
    *, num_tokens: int, tokenizer: TextTokenizer, seed: int, num_keys: int = 4
) -> TaskExample:
  """`num_keys` magic-number needles with distinct keys; one key's value is asked."""
  rng = random.Random(seed)
  facts = keyed_needles_facts(rng, _vocabulary_of(tokenizer), num_keys=num_keys)
  return haystack_example("multi_key_needle", tokenizer=tokenizer, num_tokens=num_tokens,
                           rng=rng, facts=facts)


def multi_value_needle(
    *, num_tokens: int, tokenizer: TextTokenizer, seed: int, num_values: int = 4
) -> TaskExample:
  """`num_values` magic-number needles for one key; all values are asked."""
  rng = random.Random(seed)
  facts = multi_value_needle_facts(rng, _vocabulary_of(tokenizer), num_values=num_values)
  return haystack_example("multi_value_needle", tokenizer=tokenizer, num_tokens=num_tokens,
                           rng=rng, facts=facts)


def kv_lookup(
    *, num_tokens: int, tokenizer: TextTokenizer, seed: int, num_pairs: int = 16
) -> TaskExample:
  """A JSON object of `num_pairs` UUID -> UUID pairs in the haystack; one key's value is asked."""
  rng = random.Random(seed)
  return haystack_example("kv_lookup", tokenizer=tokenizer, num_tokens=num_tokens, rng=rng,
                           facts=kv_lookup_facts(rng, num_pairs=num_pairs))


def variable_tracking(
    *, num_tokens: int, tokenizer: TextTokenizer, seed: int, num_chains: int = 1,
    num_hops: int = 4
) -> TaskExample:
  """`num_chains` assignment chains of `num_hops` hops; the first chain's variables are asked."""
  rng = random.Random(seed)
  facts = variable_tracking_facts(rng, num_chains=num_chains, num_hops=num_hops)
  return haystack_example("variable_tracking", tokenizer=tokenizer, num_tokens=num_tokens,
                           rng=rng, facts=facts)


def common_words(
    *, num_tokens: int, tokenizer: TextTokenizer, seed: int, num_common: int = 10,
    common_freq: int = 30, uncommon_freq: int = 3
) -> TaskExample:
  """A shuffled numbered word list filling `num_tokens`; the `num_common` repeated words are asked.

  Each common word appears `common_freq` times, each uncommon word `uncommon_freq` times; the
  number of uncommon words (distinct essay words) is the largest that fits.
  """
  if not common_freq > uncommon_freq >= 1:
    raise ValueError(f"need {common_freq=} > {uncommon_freq=} >= 1")
  rng = random.Random(seed)
  words = list(_vocabulary_of(tokenizer))
  rng.shuffle(words)
  common, uncommon = words[:num_common], words[num_common:]
  shuffle_seed = rng.getrandbits(64)
  question = (f"Question: What are the {num_common} most common words in the above list? "
              f"Answer: The top {num_common} words that appear most often in the list are:")

  def build(num_uncommon: int) -> str:
    items = common * common_freq + uncommon[:num_uncommon] * uncommon_freq
    random.Random(shuffle_seed).shuffle(items)
    return COMMON_WORDS_INTRO + "".join(f"{i + 1}. {w}\n" for i, w in enumerate(items))

  def num_tokens_of_size(num_uncommon: int) -> int:
    return prompt_num_tokens(tokenizer, build(num_uncommon), question)

  common_only_tokens = num_tokens_of_size(0)
  tokens_per_item = common_only_tokens / (num_common * common_freq)
  guess = int((num_tokens - common_only_tokens) / (tokens_per_item * uncommon_freq))
  try:
    num_uncommon, tokens = largest_fitting_size(
        num_tokens_of_size, num_tokens=num_tokens, guess=guess, max_size=len(uncommon))
  except ValueError as e:
    raise _too_small("common_words", e) from None
  return TaskExample(
      task="common_words", context=build(num_uncommon), question=question, answers=common,
      metadata={"common_freq": common_freq, "uncommon_freq": uncommon_freq,
                "num_uncommon": num_uncommon, "prompt_tokens": tokens})


_GENERATORS: dict[str, Callable[..., TaskExample]] = {
    "single_needle": single_needle,
    "multi_key_needle": multi_key_needle,
    "multi_value_needle": multi_value_needle,
    "kv_lookup": kv_lookup,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
}
TASKS = tuple(_GENERATORS)


def make_example(
    task: str, *, num_tokens: int, tokenizer: TextTokenizer, seed: int, **options: Any
) -> TaskExample:
  """The `task` example of `seed` at `num_tokens` tokens; `options` go to the task's generator."""
  if task not in _GENERATORS:
    raise ValueError(f"unknown {task=}; expected one of {TASKS}")
  if num_tokens <= 0:
    raise ValueError(f"{num_tokens=} must be positive")
  return _GENERATORS[task](num_tokens=num_tokens, tokenizer=tokenizer, seed=seed, **options)


def _found(prediction: str, answers: Sequence[str]) -> list[bool]:
  """Whether each answer occurs in `prediction`, ignoring case; ValueError if there is none."""
  if not answers:
    raise ValueError("answers must not be empty")
  prediction = prediction.lower()
  return [answer.lower() in prediction for answer in answers]


def ruler_score(prediction: str, answers: Sequence[str]) -> float:
  """RULER's string_match_all: the fraction of `answers` occurring in `prediction`, in [0, 1]."""
  found = _found(prediction, answers)
  return sum(found) / len(found)


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
  """RULER's string_match_part: 1.0 if any of `answers` occurs in `prediction`, else 0.0."""
  return float(any(_found(prediction, answers)))
