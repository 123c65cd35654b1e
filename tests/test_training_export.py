"""Tests of `squeezed_jax.training.export`: bf16 Hugging Face shards that reload identically."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.llama import LlamaConfig
from models.llama.checkpoint import load_checkpoint
from squeezed_jax.training import export, train_step

CONFIG = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=2, num_kv_heads=1, head_dim=16, tie_word_embeddings=True,
                     max_position_embeddings=1024, rope_theta=1e6, dtype=jnp.bfloat16)


def _trained_like(seed=0):
  graphdef, params = nnx.split(train_step.init_model(CONFIG, seed))
  return graphdef, params


def test_cast_model_is_bf16_with_the_same_values():
  graphdef, params = _trained_like()
  model = export.cast_model(graphdef, params)
  assert model.config.param_dtype == model.config.dtype == jnp.bfloat16
  for cast, master in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(params)):
    assert cast.dtype == jnp.bfloat16 and master.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(cast), np.asarray(master.astype(jnp.bfloat16)))


def test_export_shards_and_reloads_with_identical_logits(tmp_path):
  graphdef, params = _trained_like()
  model = export.cast_model(graphdef, params)
  files = export.export_hf(model, tmp_path, max_shard_bytes=20_000)
  names = sorted(f.name for f in files)
  shards = [n for n in names if n.startswith("model-")]
  assert len(shards) > 1 and all(n.endswith(f"-of-{len(shards):05d}.safetensors") for n in shards)
  assert {"config.json", "model.safetensors.index.json"} <= set(names)
  biggest = CONFIG.vocab_size * CONFIG.hidden_size * 2
  assert all((tmp_path / n).stat().st_size <= max(20_000, biggest) + 1_000 for n in shards)
  hf_config = json.loads((tmp_path / "config.json").read_text())
  assert hf_config["dtype"] == "bfloat16" and hf_config["tie_word_embeddings"] is True
  tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 40)).astype(np.int32)
  reloaded, difference = export.reload_and_compare(model, tmp_path, tokens)
  assert difference == 0.0
  assert reloaded.config.identity_hash() == model.config.identity_hash()
  again, _ = load_checkpoint(tmp_path)
  assert again.config.param_dtype == jnp.bfloat16


def test_a_different_export_is_caught(tmp_path):
  model = export.cast_model(*_trained_like(seed=0))
  export.export_hf(export.cast_model(*_trained_like(seed=1)), tmp_path)
  tokens = np.arange(16, dtype=np.int32)[None]
  with pytest.raises(RuntimeError, match="reloads with different logits"):
    export.reload_and_compare(model, tmp_path, tokens)
