"""The `make demo` job: needles in an essay haystack, answered with dense and squeezed attention.

  python -m experiments.demo

With the model trained here (assets/needle-llama-15m, see experiments/train_llama.py), hides
--num_needles magic numbers in a --context_tokens essay haystack (the multi-question setting of
`squeezed_jax.eval.multiquery`), processes that fixed context
once (`FixedContext.build`: prefill, key clustering, threshold calibration), then asks for every
number with dense attention and with squeezed attention pruning --percentile of the keys, and
prints the answers, the gold values, the KV budget and the speed. Without that model, it tells a
story with the embedded stories260K model instead.
"""

from __future__ import annotations

import os
import re
import time

import jax.numpy as jnp
from absl import app, flags

from experiments.cli import launcher
from models.llama.checkpoint import load_checkpoint
from models.llama.tokenizer import load_tokenizer
from squeezed_jax import ContextConfig, FixedContext, generate, generate_tokens
from squeezed_jax.eval.multiquery import multiquery_example

_MODEL_DIR = flags.DEFINE_string("model_dir", "assets/needle-llama-15m",
                                 "The needle model (Hugging Face directory); if it does not "
                                 "exist, the stories260K demo runs instead.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "assets/tokenizers/llama2_tokenizer.model",
                                 "The needle model's tokenizer.")
_CONTEXT_TOKENS = flags.DEFINE_integer(
    "context_tokens", 8192, "Tokens of the fixed context and a question (of up to 128 tokens).")
_NUM_NEEDLES = flags.DEFINE_integer("num_needles", 4, "Magic numbers hidden and asked for.")
_PERCENTILE = flags.DEFINE_float("percentile", 0.9, "Fraction of keys squeezed attention prunes.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 12, "Most tokens per answer.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the haystack, keys and numbers.")
_STORIES_CHECKPOINT = flags.DEFINE_string("stories_checkpoint",
                                          "assets/stories260K/stories260K.bin",
                                          "The fallback story model (llama2.c).")
_STORIES_TOKENIZER = flags.DEFINE_string("stories_tokenizer", "assets/stories260K/tok512.bin",
                                         "The fallback model's tokenizer.")
_STORY_TOKENS = flags.DEFINE_integer("story_tokens", 200, "Tokens of the fallback story.")

# The key of a `ruler_tasks.magic_number_question`.
_ASKED_KEY = re.compile(r"special magic number for (\S+) mentioned")


def _needle_demo() -> None:
  tokenizer = load_tokenizer(_TOKENIZER.value)
  # float32 on CPU: XLA's bf16 matrix products there are slow.
  model, config = load_checkpoint(_MODEL_DIR.value, dtype=jnp.float32, param_dtype=jnp.float32)
  example = multiquery_example(tokenizer, example_id="demo", num_tokens=_CONTEXT_TOKENS.value,
                               num_questions=_NUM_NEEDLES.value, seed=_SEED.value,
                               max_new_tokens=_MAX_NEW_TOKENS.value)
  print(f"model {_MODEL_DIR.value}: {config.num_layers} layers, {config.num_heads} heads of "
        f"{config.head_dim}, vocabulary {config.vocab_size}")
  print(f"fixed context: {len(example.context)} tokens of essays hiding "
        f"{len(example.questions)} magic numbers")
  started = time.perf_counter()
  ctx = FixedContext.build(model, example.context, ContextConfig())
  print(f"offline phase (prefill, clustering, calibration): {time.perf_counter() - started:.1f} s")
  keys = [_ASKED_KEY.search(tokenizer.decode(q)).group(1) for q in example.questions]

  def ask(method, percentile):
    return generate(model, ctx, example.questions, method=method, percentile=percentile,
                    max_new_tokens=example.max_new_tokens)

  for method, percentile in (("dense", None), ("squeezed", _PERCENTILE.value)):
    answers = ask(method, percentile)  # The first call compiles; the second one is timed.
    started = time.perf_counter()
    ask(method, percentile)
    seconds = time.perf_counter() - started
    title = method if percentile is None else f"{method}, {percentile:.0%} of keys pruned"
    print(f"\n{title}:")
    correct = 0
    for key, (gold,), ids in zip(keys, example.answers, answers.token_ids):
      text = tokenizer.decode(ids).strip()
      correct += gold in text
      print(f"  {key:>28}: {text[:24]!r:26} gold {gold} {'ok' if gold in text else 'WRONG'}")
    generated = sum(len(ids) for ids in answers.token_ids)
    print(f"  {correct}/{len(keys)} correct; KV budget {answers.mean_kv_budget:.3f} of the "
          f"fixed context; {generated} tokens in {seconds:.2f} s ({generated / seconds:.1f} "
          f"tokens/s once compiled)")


def _story_demo() -> None:
  print(f"no needle model at {_MODEL_DIR.value} (train one with experiments.train_llama); "
        f"telling a story with {_STORIES_CHECKPOINT.value} instead\n")
  tokenizer = load_tokenizer(_STORIES_TOKENIZER.value)
  model, config = load_checkpoint(_STORIES_CHECKPOINT.value)
  prompt = "Once upon a time"
  started = time.perf_counter()
  result = generate_tokens(model, [tokenizer.encode(prompt, bos=True)],
                           max_new_tokens=_STORY_TOKENS.value,
                           stop_tokens=[config.eos_token_id, config.bos_token_id])
  seconds = time.perf_counter() - started
  ids = result.token_ids[0]
  print(prompt + tokenizer.decode(ids))
  print(f"[{len(ids)} tokens in {seconds:.2f} s, {len(ids) / seconds:.1f} tokens/s, "
        f"compilation included]")


@launcher
def main(argv):
  del argv
  if os.path.isdir(_MODEL_DIR.value):
    _needle_demo()
  else:
    _story_demo()


if __name__ == "__main__":
  app.run(main)
