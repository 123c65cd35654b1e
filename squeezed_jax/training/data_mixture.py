"""Training batches: rows packed with essay text and retrieval examples, deterministic per step.

A row of a stage's `seq_len` is filled with documents, each starting with BOS: essay text (a window
of the training split) or a retrieval example (`retrieval_examples`), of a kind drawn by the
mixture weights and a length drawn up to the room left; a last stretch too short for a document
is essay text. Documents are not masked from each other (as in usual packed pre-training), and
positions run 0..seq_len-1 over the row.

The batch of step s is a pure function of (seed, s), so a resumed run sees the batches it would
have seen, and batches can be built ahead in worker processes (`Prefetcher`, `process_pool`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import multiprocessing
import os
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from squeezed_jax.training.curriculum import Curriculum
from squeezed_jax.training.essay_corpus import EssaySplit
from squeezed_jax.training.retrieval_examples import (RETRIEVAL_TASKS, DoesNotFit,
                                                      RetrievalExampleBuilder, Role)

ESSAY = "essay"
DOCUMENT_KINDS = (ESSAY,) + RETRIEVAL_TASKS
DEFAULT_WEIGHTS = {"essay": 0.3, "single_needle": 0.2, "multi_key_needle": 0.2,
                   "multi_value_needle": 0.1, "kv_lookup": 0.1, "variable_tracking": 0.1}


@dataclasses.dataclass(frozen=True)
class MixtureConfig:
  """What rows are made of.

  weights: per document kind (`DOCUMENT_KINDS`), its chance to be drawn for the next document.
  min_doc_tokens: the shortest document; a last stretch of a row shorter than this is essay text.
  full_length_share: the share of retrieval documents drawn as long as the room left in the row;
    the others have a length uniform in [min_doc_tokens, room].
  """

  weights: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
  min_doc_tokens: int = 256
  full_length_share: float = 0.5

  def __post_init__(self):
    unknown = sorted(set(self.weights) - set(DOCUMENT_KINDS))
    if unknown:
      raise ValueError(f"unknown document kinds {unknown}; expected some of {DOCUMENT_KINDS}")
    if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
      raise ValueError(f"mixture {self.weights=} must be non-negative with a positive sum")
    if self.min_doc_tokens < 2:
      raise ValueError(f"{self.min_doc_tokens=} must be at least 2 (BOS and one token)")
    if not 0.0 <= self.full_length_share <= 1.0:
      raise ValueError(f"{self.full_length_share=} must be in [0, 1]")


def parse_weights(text: str) -> dict[str, float]:
  """'essay=0.3,single_needle=0.7' -> {"essay": 0.3, "single_needle": 0.7}."""
  weights = {}
  for item in filter(None, (part.strip() for part in text.split(","))):
    name, sep, value = item.partition("=")
    try:
      weights[name.strip()] = float(value)
    except ValueError:
      sep = ""
    if not sep:
      raise ValueError(f"mixture weight {item!r} must look like kind=weight")
  return weights


@dataclasses.dataclass(frozen=True)
class Batch:
  """One training batch (numpy).

  inputs, targets: [B, T] int32, targets[:, t] is the token after inputs[:, t].
  text_mask, answer_mask: [B, T] bool, targets trained as language modelling / as answers.
  """

  inputs: np.ndarray
  targets: np.ndarray
  text_mask: np.ndarray
  answer_mask: np.ndarray

  def as_dict(self) -> dict[str, np.ndarray]:
    return dataclasses.asdict(self)


class BatchBuilder:
  """Builds the batch of any step from the curriculum, the mixture and a seed."""

  def __init__(self, essays: EssaySplit, examples: RetrievalExampleBuilder,
               curriculum: Curriculum, mixture: MixtureConfig, *, seed: int):
    self.essays, self.examples = essays, examples
    self.curriculum, self.mixture, self.seed = curriculum, mixture, seed
    self._kinds = [kind for kind, weight in mixture.weights.items() if weight > 0]
    weights = np.array([mixture.weights[kind] for kind in self._kinds], np.float64)
    self._probabilities = weights / weights.sum()

  def _essay_document(self, rng: np.random.Generator,
                      num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """BOS and `num_tokens - 1` essay ids from a random sentence on; roles HIDDEN then TEXT."""
    text = self.essays.window(self.essays.random_start(rng, num_tokens - 1), num_tokens - 1)
    tokens = np.concatenate([[self.examples.bos_id], text]).astype(np.int32)
    roles = np.full(num_tokens, Role.TEXT, np.int8)
    roles[0] = Role.HIDDEN
    return tokens, roles

  def _document(self, rng: np.random.Generator, room: int) -> tuple[np.ndarray, np.ndarray]:
    """One document of at most `room` (>= min_doc_tokens) tokens, of a drawn kind."""
    min_tokens = self.mixture.min_doc_tokens
    kind = self._kinds[rng.choice(len(self._kinds), p=self._probabilities)]
    if kind == ESSAY:
      return self._essay_document(rng, int(rng.integers(min_tokens, room + 1)))
    full = rng.random() < self.mixture.full_length_share
    num_tokens = room if full else int(rng.integers(min_tokens, room + 1))
    try:
      example = self.examples.build(kind, num_tokens=num_tokens, rng=rng)
    except DoesNotFit:
      return self._essay_document(rng, num_tokens)
    return example.tokens, example.roles

  def row(self, rng: np.random.Generator, num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, roles), each [num_tokens]: documents packed until the row is full."""
    tokens, roles, room = [], [], num_tokens
    while room >= self.mixture.min_doc_tokens:
      doc_tokens, doc_roles = self._document(rng, room)
      tokens.append(doc_tokens)
      roles.append(doc_roles)
      room -= len(doc_tokens)
    if room:
      doc_tokens, doc_roles = self._essay_document(rng, room)
      tokens.append(doc_tokens)
      roles.append(doc_roles)
    return np.concatenate(tokens), np.concatenate(roles)

  def batch(self, step: int) -> Batch:
    """The batch of `step`: [batch_size, seq_len] of the step's curriculum stage."""
    stage = self.curriculum.stage_at(step)
    rng = np.random.default_rng([self.seed, step])
    rows = [self.row(rng, stage.seq_len + 1) for _ in range(stage.batch_size)]
    tokens = np.stack([tokens for tokens, _ in rows])
    roles = np.stack([roles for _, roles in rows])[:, 1:]
    return Batch(inputs=tokens[:, :-1], targets=tokens[:, 1:], text_mask=roles == Role.TEXT,
                 answer_mask=roles == Role.ANSWER)


# The BatchBuilder of a batch-building worker process (see `process_pool`).
_WORKER_BUILDER: BatchBuilder | None = None


def _install_builder(builder: BatchBuilder) -> None:
  global _WORKER_BUILDER
  os.environ["JAX_PLATFORMS"] = "cpu"  # A worker never needs the accelerator.
  _WORKER_BUILDER = builder


def build_in_worker(step: int) -> Batch:
  """The batch of `step` from the worker's builder (a process of `process_pool`)."""
  if _WORKER_BUILDER is None:
    raise RuntimeError("build_in_worker runs only in a process_pool worker")
  return _WORKER_BUILDER.batch(step)


def process_pool(builder: BatchBuilder, num_workers: int) -> concurrent.futures.Executor:
  """`num_workers` spawned processes, each holding a copy of `builder` (for `build_in_worker`).

  Processes, not threads: building a batch is mostly Python, which threads would serialise.
  """
  return concurrent.futures.ProcessPoolExecutor(
      num_workers, mp_context=multiprocessing.get_context("spawn"),
      initializer=_install_builder, initargs=(builder,))


class Prefetcher:
  """Yields (step, make_batch(step)) for `steps` in order, submitted up to `depth` steps ahead.

  make_batch runs on `executor` (e.g. `process_pool` with `build_in_worker`); an exception in it
  is raised where its batch is taken. The executor is shut down on close.
  """

  def __init__(self, make_batch: Callable[[int], Batch], steps: Iterable[int], *,
               executor: concurrent.futures.Executor, depth: int = 16):
    if depth < 1:
      raise ValueError(f"{depth=} must be positive")
    self._make_batch = make_batch
    self._steps = iter(steps)
    self._executor = executor
    self._pending: collections.deque = collections.deque()
    for _ in range(depth):
      self._submit_next()

  def _submit_next(self) -> None:
    step = next(self._steps, None)
    if step is not None:
      self._pending.append((step, self._executor.submit(self._make_batch, step)))

  def __iter__(self) -> Iterator[tuple[int, Batch]]:
    return self

  def __next__(self) -> tuple[int, Batch]:
    if not self._pending:
      raise StopIteration
    step, future = self._pending.popleft()
    self._submit_next()
    return step, future.result()

  def close(self) -> None:
    """Stops building: pending batches are dropped and the executor shut down."""
    self._pending.clear()
    self._executor.shutdown(wait=False, cancel_futures=True)

  def __enter__(self) -> "Prefetcher":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
