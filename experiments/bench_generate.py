"""Time to answer and decode speed of `squeezed_jax.generate`: dense vs squeezed attention.

A LLaMA-2-7B-shaped model with random bf16 weights (shapes are what matter for speed) and a
synthetic clustered fixed context (`pallas_kernels.synthetic`: realistic cluster sizes) of S tokens;
per case: a batch of B random questions of `question_tokens` tokens, answered with `new_tokens`
greedy tokens (no stop token). Decode tokens/s = B * (N - 1) / (t(N) - t(1)), with t(n) the
wall time of one `generate` call producing n tokens, after a compile run of the same call.

  python -m experiments.bench_generate --seq_lens=32768 --batch_sizes=1,8 --output_json=out.jsonl
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from experiments.cli import launcher
from models.llama import PRESETS, Llama
from pallas_kernels import synthetic
from squeezed_jax.fixed_context import ContextConfig, FixedContext
from squeezed_jax.key_clustering import ClusteredKeys, num_clusters_for
from squeezed_jax.online import generate

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["32768"], "Fixed-context lengths S.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Questions answered together.")
_BUDGETS = flags.DEFINE_list("kv_budgets", ["0.125", "0.25"],
                             "Squeezed KV budgets (fractions of the clustered keys).")
_QUESTION_TOKENS = flags.DEFINE_integer("question_tokens", 512, "Tokens per question.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "Tokens generated per question.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 32, "Layers (32 = LLaMA-2-7B).")
_HIDDEN = flags.DEFINE_integer("hidden_size", 4096, "Model width (4096 = LLaMA-2-7B).")
_WINDOW = flags.DEFINE_integer("window", 100, "Observation window W.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Append one JSON line per case here.")


def _model(max_positions: int) -> Llama:
  config = PRESETS["llama2-7b"].replace(
      num_layers=_NUM_LAYERS.value, hidden_size=_HIDDEN.value, head_dim=128,
      num_heads=_HIDDEN.value // 128, num_kv_heads=_HIDDEN.value // 128,
      intermediate_size=_HIDDEN.value * 11008 // 4096, max_position_embeddings=max_positions,
      dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  return Llama(config, rngs=nnx.Rngs(0))


def _synthetic_context(model: Llama, num_tokens: int) -> FixedContext:
  """A clustered context in the binding layout; every layer gets its own random clusters."""
  config = model.config
  clustered = num_tokens - _WINDOW.value
  num_clusters = num_clusters_for(clustered, 5.0)
  layers = [synthetic.clustered_context(jax.random.key(layer), num_kv_heads=config.num_kv_heads,
                                        num_keys=clustered, num_clusters=num_clusters,
                                        head_dim=config.head_dim)
            for layer in range(config.num_layers)]
  stack = lambda name: jnp.stack([getattr(layer, name) for layer in layers])
  counts = stack("counts")
  labels = jax.vmap(jax.vmap(lambda c: jnp.repeat(jnp.arange(num_clusters), c,
                                                  total_repeat_length=clustered)))(counts)
  window_shape = (config.num_layers, config.num_kv_heads, _WINDOW.value, config.head_dim)
  percentiles = ContextConfig().percentiles
  return FixedContext(
      keys=stack("keys"), values=stack("values"),
      window_keys=jax.random.normal(jax.random.key(1), window_shape, jnp.bfloat16),
      window_values=jax.random.normal(jax.random.key(2), window_shape, jnp.bfloat16),
      clusters=ClusteredKeys(stack("centroids"), counts, stack("offsets"),
                             jnp.broadcast_to(jnp.arange(clustered, dtype=jnp.int32),
                                              labels.shape), labels.astype(jnp.int32)),
      thresholds=jnp.zeros((len(percentiles),)),
      kept_fraction=jnp.ones((len(percentiles), config.num_layers, config.num_kv_heads)),
      coarse_thresholds=None, token_ids=jnp.zeros((num_tokens,), jnp.int32),
      config=ContextConfig(observation_window=_WINDOW.value), model_config=config)


def _seconds(fn) -> float:
  fn()  # compile and warm up
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


@launcher
def main(argv):
  del argv
  for num_tokens in map(int, _SEQ_LENS.value):
    model = _model(num_tokens + _QUESTION_TOKENS.value + _NEW_TOKENS.value + 64)
    ctx = _synthetic_context(model, num_tokens)
    methods = [("dense", None)] + [("squeezed", float(b)) for b in _BUDGETS.value]
    for batch in map(int, _BATCH_SIZES.value):
      questions = np.random.default_rng(batch).integers(
          3, model.config.vocab_size, (batch, _QUESTION_TOKENS.value)).tolist()
      for method, budget in methods:
        run = lambda n: generate(model, ctx, questions, method=method, kv_budget=budget,
                                 max_new_tokens=n, stop_tokens=[])
        first = _seconds(lambda: run(1))
        answer = _seconds(lambda: run(_NEW_TOKENS.value))
        result = {
            "seq_len": num_tokens, "batch": batch, "method": method, "kv_budget": budget,
            "question_tokens": _QUESTION_TOKENS.value, "new_tokens": _NEW_TOKENS.value,
            "time_to_first_token_s": round(first, 4), "time_to_answer_s": round(answer, 4),
            "decode_tokens_per_s": round(batch * (_NEW_TOKENS.value - 1) / (answer - first), 1),
            "device": jax.devices()[0].device_kind,
        }
        print(json.dumps(result), flush=True)
        if _OUTPUT_JSON.value:
          with open(_OUTPUT_JSON.value, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  app.run(main)
