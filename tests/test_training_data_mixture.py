"""Tests of `squeezed_jax.training.data_mixture`: packed rows, deterministic batches, prefetch."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest

from models.llama.tokenizer import load_tokenizer
from squeezed_jax.training import data_mixture, essay_corpus, retrieval_examples
from squeezed_jax.training.curriculum import Curriculum

LLAMA2 = load_tokenizer("assets/tokenizers/llama2_tokenizer.model")
CURRICULUM = Curriculum.from_fractions([512, 1024], [1, 1], tokens_per_batch=2048, total_steps=4)


def _builder(seed=0, **mixture):
  corpus = essay_corpus.essay_corpus_for(LLAMA2)
  examples = retrieval_examples.RetrievalExampleBuilder(LLAMA2, corpus, bos_id=LLAMA2.bos_id,
                                                        eos_id=LLAMA2.eos_id)
  return data_mixture.BatchBuilder(corpus.train, examples, CURRICULUM,
                                   data_mixture.MixtureConfig(**mixture), seed=seed)


@pytest.fixture(scope="module")
def builder():
  return _builder(min_doc_tokens=128)


def test_batches_follow_the_curriculum_and_are_deterministic(builder):
  for step, shape in ((0, (4, 512)), (1, (4, 512)), (2, (2, 1024)), (3, (2, 1024))):
    batch = builder.batch(step)
    assert batch.inputs.shape == batch.targets.shape == batch.answer_mask.shape == shape
    again = builder.batch(step)
    for name, value in batch.as_dict().items():
      np.testing.assert_array_equal(value, getattr(again, name))
  assert not np.array_equal(builder.batch(0).inputs, builder.batch(1).inputs)
  assert not np.array_equal(builder.batch(0).inputs, _builder(seed=1, min_doc_tokens=128)
                            .batch(0).inputs)


def test_rows_are_packed_documents(builder):
  batch = builder.batch(2)
  np.testing.assert_array_equal(batch.inputs[:, 1:], batch.targets[:, :-1])
  assert np.all(batch.inputs[:, 0] == LLAMA2.bos_id)
  # No target is both text and answer, BOS targets are neither, answers exist and end with EOS.
  assert not np.any(batch.text_mask & batch.answer_mask)
  bos_targets = batch.targets == LLAMA2.bos_id
  assert not np.any((batch.text_mask | batch.answer_mask) & bos_targets)
  assert batch.answer_mask.sum() > 0
  eos = batch.targets == LLAMA2.eos_id
  assert np.all(batch.answer_mask[eos])
  # Each answer run is what the question before it asks: its text occurs earlier in the row.
  row = int(np.argmax(batch.answer_mask.sum(axis=1)))
  mask = batch.answer_mask[row]
  end = int(np.flatnonzero(mask)[0])
  while end < mask.size and mask[end]:
    end += 1
  start = int(np.flatnonzero(mask[:end])[0])
  while start > 0 and mask[start - 1]:
    start -= 1
  answer = LLAMA2.decode(batch.targets[row, start:end].tolist()).strip(" .\"")
  first_answer = answer.split(",")[0].strip()
  assert first_answer in LLAMA2.decode(batch.inputs[row, :start].tolist())


def test_mixture_weights_choose_the_documents():
  essay_only = _builder(weights={"essay": 1.0}, min_doc_tokens=128).batch(0)
  assert essay_only.answer_mask.sum() == 0
  assert essay_only.text_mask.mean() > 0.95
  needles_only = _builder(weights={"single_needle": 1.0}, min_doc_tokens=128,
                          full_length_share=1.0).batch(0)
  # One full-length example per row (plus at most a short essay stretch): 10 answer targets.
  assert needles_only.answer_mask.sum() == 10 * needles_only.inputs.shape[0]


def test_mixture_config_errors():
  with pytest.raises(ValueError, match="unknown document kinds"):
    data_mixture.MixtureConfig(weights={"poems": 1.0})
  with pytest.raises(ValueError, match="positive sum"):
    data_mixture.MixtureConfig(weights={"essay": 0.0})
  with pytest.raises(ValueError, match="min_doc_tokens=1"):
    data_mixture.MixtureConfig(min_doc_tokens=1)
  with pytest.raises(ValueError, match="full_length_share=2"):
    data_mixture.MixtureConfig(full_length_share=2)


def test_parse_weights():
  assert data_mixture.parse_weights("essay=0.3, kv_lookup=1") == {"essay": 0.3, "kv_lookup": 1.0}
  for bad in ("essay", "essay=x"):
    with pytest.raises(ValueError, match="kind=weight"):
      data_mixture.parse_weights(bad)


def test_prefetcher_yields_in_order_and_raises_worker_errors(builder):
  executor = concurrent.futures.ThreadPoolExecutor(2)
  with data_mixture.Prefetcher(builder.batch, range(1, 4), executor=executor, depth=2) as batches:
    steps = []
    for step, batch in batches:
      steps.append(step)
      np.testing.assert_array_equal(batch.inputs, builder.batch(step).inputs)
  assert steps == [1, 2, 3]
  executor = concurrent.futures.ThreadPoolExecutor(1)
  with data_mixture.Prefetcher(builder.batch, [0, 7], executor=executor) as batches:
    next(batches)
    with pytest.raises(ValueError, match="step=7 is outside"):
      next(batches)


def test_process_pool_builds_the_same_batches(builder):
  with data_mixture.Prefetcher(data_mixture.build_in_worker, [3],
                               executor=data_mixture.process_pool(builder, 1)) as batches:
    step, batch = next(batches)
  assert step == 3
  np.testing.assert_array_equal(batch.inputs, builder.batch(3).inputs)
  with pytest.raises(RuntimeError, match="only in a process_pool worker"):
    data_mixture.build_in_worker(0)
