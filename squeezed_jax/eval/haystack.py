"""The Paul Graham essay haystack of RULER-style tasks: whole sentences cut to a token length.

The essays (`assets/text/PaulGrahamEssays.json`, `{"text": ...}`, from NVIDIA/RULER) are split into
sentences once. A `Haystack` pairs them with a tokenizer and counts each sentence's tokens lazily,
the first time a haystack uses it, so a 128K-token haystack tokenises only the sentences it needs,
and later haystacks reuse the counts. These per-sentence counts only guess how many sentences fit;
the length of a built text is always measured by encoding it whole (`largest_fitting_size`), so a
haystack of `num_tokens` tokens is the longest run of whole sentences, from a seed-chosen sentence
onwards and wrapping around the corpus, whose encoding has at most `num_tokens` tokens.

A tokenizer is any object with `encode(text, bos=..., eos=...) -> list[int]` (e.g.
`models.llama.tokenizer.load_tokenizer(...)`).
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
from typing import Callable, Protocol, Sequence

DEFAULT_ESSAYS_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "assets", "text",
    "PaulGrahamEssays.json")

# A sentence ends at ., ! or ? (and any closing quotes/brackets) followed by whitespace, or directly
# by a capital letter after a lowercase one: the corpus glues paragraphs as "accelerating.We".
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*(?:\s+|(?<=[a-z][.!?])(?=[A-Z]))")


class TextTokenizer(Protocol):
  """What a haystack needs from a tokenizer."""

  def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
    """Token ids of `text`, with BOS first if `bos` and EOS last if `eos`."""
    ...


def load_essays(path: str | os.PathLike[str] = DEFAULT_ESSAYS_PATH) -> str:
  """The essay text of a `{"text": ...}` JSON file; FileNotFoundError/ValueError naming the path."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"essay file {path=} does not exist (copy PaulGrahamEssays.json there)")
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"cannot read essay file {path=} as JSON: {e}") from e
  text = data.get("text") if isinstance(data, dict) else None
  if not isinstance(text, str) or not text.strip():
    raise ValueError(f"essay file {path=} must hold a JSON object with a non-empty string 'text'")
  return text


def split_sentences(text: str) -> list[str]:
  """The sentences of `text`, each with its whitespace runs collapsed to single spaces."""
  sentences = []
  start = 0
  for match in _SENTENCE_END.finditer(text):
    sentences.append(text[start:match.end()])
    start = match.end()
  sentences.append(text[start:])
  return [s for s in (" ".join(s.split()) for s in sentences) if s]


def largest_fitting_size(
    num_tokens_of_size: Callable[[int], int], *, num_tokens: int, guess: int, max_size: int
) -> tuple[int, int]:
  """The largest size in [0, max_size] whose text has at most `num_tokens` tokens.

  Each probe encodes a whole text, so probes are kept few: after the guess, the next size is
  extrapolated from the average tokens per unit of size seen so far (a secant through size 0),
  kept strictly between the largest size known to fit and the smallest known not to. For a close
  guess this takes two or three probes; it always ends with the two neighbouring sizes measured.

  Args:
    num_tokens_of_size: the token count of the text built with a size (e.g. a number of sentences),
      non-decreasing in the size.
    num_tokens: the token budget.
    guess: a first estimate of the answer.
    max_size: the largest size allowed.

  Returns:
    (size, tokens): the largest fitting size and its token count.

  Raises:
    ValueError: if even size 0 takes more than `num_tokens` tokens.
  """
  empty_tokens = num_tokens_of_size(0)
  if empty_tokens > num_tokens:
    raise ValueError(
        f"{num_tokens=} is too small: the text without filler already takes {empty_tokens} tokens")
  low, low_tokens = 0, empty_tokens
  high = max_size + 1  # The smallest size known not to fit; max_size + 1 while none is known.
  size = min(max(guess, 1), max_size)
  while high - low > 1:
    tokens = num_tokens_of_size(size)
    if tokens <= num_tokens:
      low, low_tokens = size, tokens
    else:
      high = size
    tokens_per_size = max((tokens - empty_tokens) / size, 1e-9)
    step = int((num_tokens - low_tokens) / tokens_per_size)
    size = min(max(low + step, low + 1), high - 1)
  return low, low_tokens


class Haystack:
  """Essay sentences with lazily cached token counts for one tokenizer."""

  def __init__(self, tokenizer: TextTokenizer, sentences: Sequence[str] | None = None):
    """Pairs `tokenizer` with `sentences` (default: `split_sentences(load_essays())`)."""
    self.tokenizer = tokenizer
    self.sentences = tuple(split_sentences(load_essays()) if sentences is None else sentences)
    if not self.sentences:
      raise ValueError("a haystack needs at least one sentence")
    self._sentence_tokens: list[int | None] = [None] * len(self.sentences)

  def __len__(self) -> int:
    return len(self.sentences)

  def random_start(self, rng: random.Random) -> int:
    """A sentence index drawn from `rng` where a haystack starts."""
    return rng.randrange(len(self.sentences))

  def sentence_run(self, start: int, count: int) -> list[str]:
    """`count` sentences from index `start` on, wrapping around the corpus."""
    return [self.sentences[(start + i) % len(self.sentences)] for i in range(count)]

  def guess_count(self, start: int, num_tokens: int) -> int:
    """How many sentences from `start` on have about `num_tokens` tokens, by per-sentence counts."""
    total, count = 0, 0
    while total < num_tokens:
      index = (start + count) % len(self.sentences)
      if self._sentence_tokens[index] is None:
        self._sentence_tokens[index] = len(self.tokenizer.encode(self.sentences[index], bos=False))
      total += self._sentence_tokens[index]
      count += 1
    return count

  def fit(
      self, num_tokens_of_run: Callable[[list[str]], int], *, start: int, num_tokens: int,
      overhead_tokens: int = 0
  ) -> int:
    """How many sentences from `start` on make the longest text with at most `num_tokens` tokens.

    Args:
      num_tokens_of_run: the token count of the text built from a sentence run (e.g. with needles
        inserted and instructions around it); it must not decrease as the run grows.
      start: the index of the run's first sentence.
      num_tokens: the token budget of the built text.
      overhead_tokens: about how many of the tokens are not the haystack's (for the first guess).

    Raises:
      ValueError: if the text without any sentence already takes more than `num_tokens` tokens.
    """
    guess = self.guess_count(start, num_tokens - overhead_tokens)
    count, _ = largest_fitting_size(
        lambda count: num_tokens_of_run(self.sentence_run(start, count)),
        num_tokens=num_tokens, guess=guess, max_size=2 * guess + 16)
    return count

  def text(self, num_tokens: int, seed: int) -> str:
    """Whole sentences from a `seed`-chosen start, at most `num_tokens` tokens (no BOS) in all."""
    start = self.random_start(random.Random(seed))
    count = self.fit(lambda run: len(self.tokenizer.encode(" ".join(run), bos=False)),
                     start=start, num_tokens=num_tokens)
    return " ".join(self.sentence_run(start, count))


@functools.lru_cache(maxsize=8)
def haystack_for(tokenizer: TextTokenizer) -> Haystack:
  """The default-corpus `Haystack` of `tokenizer`, built once per tokenizer object and kept."""
  return Haystack(tokenizer)
