"""Fixtures shared by test files: the embedded stories260K model and a fixed context built on it."""

import os

import pytest

from models.llama.checkpoint import load_checkpoint
from models.llama.tokenizer import load_tokenizer
from squeezed_jax.fixed_context import ContextConfig, FixedContext

STORIES_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "assets", "stories260K")
STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
         "park with her big red ball. One day, Lily saw a small dog under a tree. The dog was sad "
         "because it was lost. Lily wanted to help the dog find its home. She asked her mom, and "
         "her mom said they could look together. They walked around the park and asked everyone "
         "they met. ") * 3


@pytest.fixture(scope="session")
def stories():
  """(model, tokenizer, ids): stories260K, its tokenizer, and STORY encoded with BOS (~400 ids)."""
  model, _ = load_checkpoint(os.path.join(STORIES_DIR, "stories260K.bin"))
  tokenizer = load_tokenizer(os.path.join(STORIES_DIR, "tok512.bin"))
  return model, tokenizer, tokenizer.encode(STORY, bos=True)


@pytest.fixture(scope="session")
def stories_context(stories):
  """A flat FixedContext of STORY (observation window 32)."""
  model, _, ids = stories
  return FixedContext.build(model, ids, ContextConfig(observation_window=32, prefill_chunk=128))
