"""Hugging Face export of a trained model (bf16 shards), checked by reloading it."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.llama import Llama
from models.llama.checkpoint import load_checkpoint
from models.llama.weights_hf import save_hf_checkpoint

MAX_SHARD_BYTES = 15_000_000


def cast_model(graphdef: nnx.GraphDef, params: nnx.State, dtype=jnp.bfloat16) -> Llama:
  """The model of (graphdef, params) with parameters and compute in `dtype`."""
  config = nnx.merge(graphdef, params).config.replace(dtype=dtype, param_dtype=dtype)
  cast_graphdef, _ = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
  return nnx.merge(cast_graphdef, jax.tree.map(lambda p: p.astype(dtype), params))


def export_hf(model: Llama, path: str | pathlib.Path, *,
              max_shard_bytes: int = MAX_SHARD_BYTES) -> list[pathlib.Path]:
  """Writes `model` (in its param_dtype) as a Hugging Face checkpoint; returns the files written."""
  path = pathlib.Path(path)
  save_hf_checkpoint(model, path, max_shard_bytes=max_shard_bytes)
  return sorted(p for p in path.iterdir() if p.name == "config.json" or "safetensors" in p.name)


def reload_and_compare(model: Llama, path: str | pathlib.Path,
                       tokens: np.ndarray) -> tuple[Llama, float]:
  """Loads the export at `path` and compares its logits with `model`'s on `tokens` [B, T].

  Returns (the reloaded model, the largest absolute logit difference). RuntimeError unless the
  logits are identical: an export must reload bit for bit.
  """
  reloaded, _ = load_checkpoint(path)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  expected, _ = model(jnp.asarray(tokens), positions)
  got, _ = reloaded(jnp.asarray(tokens), positions)
  difference = float(jnp.max(jnp.abs(expected - got)))
  if difference != 0.0:
    raise RuntimeError(f"the export at {path} reloads with different logits ({difference=})")
  return reloaded, difference
