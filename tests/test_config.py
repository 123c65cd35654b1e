"""Tests for models.llama.config."""

import pytest

from models.llama import PRESETS, LlamaConfig, RopeScaling


def test_presets_have_the_published_shapes():
  base = PRESETS["llama2-7b"]
  assert (base.hidden_size, base.num_layers, base.num_heads, base.head_dim) == (4096, 32, 32, 128)
  assert PRESETS["llama2-7b-32k"].rope_scaling == RopeScaling("linear", factor=8.0)
  assert PRESETS["longchat-7b-v1.5-32k"].max_position_embeddings == 32768
  assert PRESETS["lwm-text-chat-1m"].rope_theta == 50_000_000.0
  assert PRESETS["tiny-mqa"].num_groups == 4


def test_hf_config_round_trip_and_old_style_rope():
  config = PRESETS["llama2-7b-32k"]
  assert LlamaConfig.from_hf_config(config.to_hf_config()) == config
  old_style = {k: v for k, v in config.to_hf_config().items() if k != "rope_parameters"}
  old_style.update(rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 8.0})
  assert LlamaConfig.from_hf_config(old_style) == config


def test_llama3_rope_parameters():
  hf = PRESETS["tiny"].to_hf_config()
  hf["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}
  config = LlamaConfig.from_hf_config(hf)
  assert config.rope_theta == 500000.0
  assert config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)


def test_identity_hash_tracks_shapes_not_dtypes():
  import jax.numpy as jnp
  tiny = PRESETS["tiny"]
  assert tiny.identity_hash() == tiny.replace(dtype=jnp.bfloat16).identity_hash()
  assert tiny.identity_hash() != tiny.replace(num_layers=3).identity_hash()


@pytest.mark.parametrize("hf, match", [
    ({"model_type": "mistral"}, "model_type"),
    ({"vocab_size": 10}, "lacks required fields"),
    (dict(PRESETS["tiny"].to_hf_config(), attention_bias=True), "attention_bias"),
    (dict(PRESETS["tiny"].to_hf_config(), rope_parameters={"rope_type": "yarn"}), "rope_type"),
    (dict(PRESETS["tiny"].to_hf_config(), num_key_value_heads=3), "num_kv_heads"),
])
def test_bad_hf_configs_raise(hf, match):
  with pytest.raises(ValueError, match=match):
    LlamaConfig.from_hf_config(hf)
