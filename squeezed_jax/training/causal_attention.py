"""The training attention function: cache-less causal attention by `jax.nn.dot_product_attention`.

It plugs into the model as `attention_fn` (see models/llama/dense_attention.py for the signature).
Unlike `dense_attention`, it never materialises the [T, T] logits on GPU: with
implementation="cudnn" it runs cuDNN's fused flash attention (bf16/fp16 inputs). Causality is by
index within the row, so rows must hold positions 0..T-1 (as `data_mixture` batches do).
"""

from __future__ import annotations

import functools

import jax

from models.llama import AttentionFn

IMPLEMENTATIONS = ("cudnn", "xla")


def default_implementation() -> str:
  """cuDNN flash attention on GPU, XLA elsewhere."""
  return "cudnn" if jax.default_backend() == "gpu" else "xla"


def _causal_attention(q, k, v, positions, cache, layer, *, implementation: str):
  """q: [B, T, Hq, D], k, v: [B, T, Hkv, D] -> ([B, T, Hq, D], None); positions must be 0..T-1."""
  del positions, layer  # Causal by index; every layer alike.
  if cache is not None:
    raise ValueError("the training attention keeps no KV cache; call the model with caches=None")
  out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
  return out, None


@functools.lru_cache(maxsize=None)
def causal_attention(implementation: str | None = None) -> AttentionFn:
  """The attention function of `implementation` (None: `default_implementation()`).

  Cached, so the same implementation gives the same (hashable, jit-static) function.
  """
  implementation = implementation or default_implementation()
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{implementation=} must be one of {IMPLEMENTATIONS}")
  return functools.partial(_causal_attention, implementation=implementation)
