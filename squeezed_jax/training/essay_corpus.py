"""The Paul Graham essays as token ids, tokenised once and split into train and held-out sentences.

Every sentence of `squeezed_jax.eval.haystack.split_sentences` is encoded on its own (no BOS): the
LLaMA SentencePiece tokenizer gives a sentence the same ids whether it stands alone or follows a
space, so concatenating sentence ids reproduces the ids of the text joined with spaces (up to rare
merges across a sentence boundary). The last `heldout_fraction` of the sentences (the last essays of
the corpus) is held out for perplexity; training text and haystacks come from the rest.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

from squeezed_jax.eval.haystack import TextTokenizer, load_essays, split_sentences
from squeezed_jax.eval.ruler_tasks import essay_vocabulary


@dataclasses.dataclass(frozen=True)
class EssaySplit:
  """Consecutive sentences as token ids.

  tokens: [N] int32, the ids of every sentence, concatenated.
  starts: [S + 1] int64, sentence s is tokens[starts[s]:starts[s + 1]]; starts[S] = N.
  """

  tokens: np.ndarray
  starts: np.ndarray

  @property
  def num_sentences(self) -> int:
    return len(self.starts) - 1

  @property
  def num_tokens(self) -> int:
    return len(self.tokens)

  def random_start(self, rng: np.random.Generator, num_tokens: int) -> int:
    """A sentence index, drawn from `rng`, from which at least `num_tokens` tokens follow."""
    if num_tokens > self.num_tokens:
      raise ValueError(f"{num_tokens=} exceeds the split's {self.num_tokens} tokens")
    last = int(np.searchsorted(self.starts, self.num_tokens - num_tokens, side="right")) - 1
    return int(rng.integers(0, last + 1))

  def window(self, first_sentence: int, num_tokens: int) -> np.ndarray:
    """[num_tokens] int32: the ids from sentence `first_sentence` on (the last one may be cut)."""
    begin = int(self.starts[first_sentence])
    if begin + num_tokens > self.num_tokens:
      raise ValueError(f"{num_tokens=} tokens from sentence {first_sentence} run past the split's "
                       f"{self.num_tokens} tokens")
    return self.tokens[begin:begin + num_tokens]

  def sentence_run(self, first_sentence: int, max_tokens: int) -> list[np.ndarray]:
    """The most whole sentences from `first_sentence` on with at most `max_tokens` ids in all."""
    begin = self.starts[first_sentence]
    end = int(np.searchsorted(self.starts, begin + max_tokens, side="right")) - 1
    return [self.tokens[self.starts[s]:self.starts[s + 1]] for s in range(first_sentence, end)]


@dataclasses.dataclass(frozen=True)
class EssayCorpus:
  """The tokenised essays: `train` and `heldout` splits, and the words keys are drawn from."""

  train: EssaySplit
  heldout: EssaySplit
  vocabulary: tuple[str, ...]


def _split_of(sentence_ids: Sequence[Sequence[int]]) -> EssaySplit:
  lengths = np.array([len(ids) for ids in sentence_ids], np.int64)
  starts = np.concatenate([[0], np.cumsum(lengths)])
  tokens = np.fromiter((t for ids in sentence_ids for t in ids), np.int32, count=int(starts[-1]))
  return EssaySplit(tokens=tokens, starts=starts)


def tokenize_essays(tokenizer: TextTokenizer, sentences: Sequence[str] | None = None, *,
                    heldout_fraction: float = 0.05) -> EssayCorpus:
  """Encodes every sentence (default: the essay corpus) and holds out the last ones.

  heldout_fraction: the share of sentences, taken from the end, in the held-out split.
  """
  if not 0.0 < heldout_fraction < 1.0:
    raise ValueError(f"{heldout_fraction=} must be in (0, 1)")
  sentences = tuple(split_sentences(load_essays()) if sentences is None else sentences)
  num_heldout = max(1, round(heldout_fraction * len(sentences)))
  if num_heldout >= len(sentences):
    raise ValueError(f"{len(sentences)} sentences are too few to hold out {heldout_fraction=}")
  sentence_ids = [tokenizer.encode(sentence, bos=False) for sentence in sentences]
  cut = len(sentences) - num_heldout
  return EssayCorpus(train=_split_of(sentence_ids[:cut]), heldout=_split_of(sentence_ids[cut:]),
                     vocabulary=essay_vocabulary(sentences))


@functools.lru_cache(maxsize=4)
def essay_corpus_for(tokenizer: TextTokenizer, heldout_fraction: float = 0.05) -> EssayCorpus:
  """`tokenize_essays` of the default corpus, computed once per tokenizer object."""
  return tokenize_essays(tokenizer, heldout_fraction=heldout_fraction)
