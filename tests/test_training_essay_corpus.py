"""Tests of `squeezed_jax.training.essay_corpus`."""

from __future__ import annotations

import numpy as np
import pytest

from models.llama.tokenizer import load_tokenizer
from squeezed_jax.training import essay_corpus

LLAMA2 = load_tokenizer("assets/tokenizers/llama2_tokenizer.model")
SENTENCES = ["The first sentence is short.", "A second one follows here!",
             "Is this the third?", "Number four has 42 words, or not.", "Five.",
             "Six and the last one of the list."]


@pytest.fixture(scope="module")
def small():
  return essay_corpus.tokenize_essays(LLAMA2, SENTENCES, heldout_fraction=0.34)


def test_splits_hold_each_sentence_ids(small):
  assert (small.train.num_sentences, small.heldout.num_sentences) == (4, 2)
  for split, sentences in ((small.train, SENTENCES[:4]), (small.heldout, SENTENCES[4:])):
    for s, sentence in enumerate(sentences):
      ids = split.tokens[split.starts[s]:split.starts[s + 1]].tolist()
      assert ids == LLAMA2.encode(sentence, bos=False)
    assert split.starts[-1] == split.num_tokens == len(split.tokens)
  assert "sentence" in small.vocabulary and "words" in small.vocabulary


def test_sentence_run_is_whole_sentences_within_budget(small):
  split = small.train
  lengths = np.diff(split.starts)
  budget = int(lengths[1] + lengths[2] + 1)
  run = split.sentence_run(1, budget)
  assert [r.tolist() for r in run] == [split.tokens[split.starts[s]:split.starts[s + 1]].tolist()
                                       for s in (1, 2)]
  assert split.sentence_run(1, int(lengths[1]) - 1) == []


def test_window_and_random_start_leave_room(small):
  split = small.train
  rng = np.random.default_rng(0)
  need = split.num_tokens - int(split.starts[2])
  starts = {split.random_start(rng, need) for _ in range(50)}
  assert starts == {0, 1, 2}
  assert split.window(2, need).tolist() == split.tokens[split.starts[2]:].tolist()
  with pytest.raises(ValueError, match="run past"):
    split.window(3, need)
  with pytest.raises(ValueError, match="exceeds"):
    split.random_start(rng, split.num_tokens + 1)


def test_default_corpus_holds_out_its_tail():
  corpus = essay_corpus.essay_corpus_for(LLAMA2)
  assert corpus.train.num_tokens > 600_000 and corpus.heldout.num_tokens > 30_000
  total = corpus.train.num_sentences + corpus.heldout.num_sentences
  assert corpus.heldout.num_sentences == round(0.05 * total)
  assert essay_corpus.essay_corpus_for(LLAMA2) is corpus


def test_errors():
  with pytest.raises(ValueError, match="heldout_fraction=1.5"):
    essay_corpus.tokenize_essays(LLAMA2, SENTENCES, heldout_fraction=1.5)
  with pytest.raises(ValueError, match="too few"):
    essay_corpus.tokenize_essays(LLAMA2, SENTENCES[:1], heldout_fraction=0.5)
