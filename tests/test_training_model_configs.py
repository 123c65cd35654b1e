"""Tests of `squeezed_jax.training.model_configs`."""

from __future__ import annotations

import jax
import pytest
from flax import nnx

from models.llama import PRESETS, Llama
from squeezed_jax.training import model_configs


@pytest.mark.parametrize("name", ["needle-llama-15m", "tiny", "tiny-mqa"])
def test_num_parameters_counts_the_model(name):
  config = model_configs.config_by_name(name)
  model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  assert model_configs.num_parameters(config) == sum(
      p.size for p in jax.tree.leaves(nnx.state(model)))


def test_needle_config_fits_the_brief():
  config = model_configs.config_by_name("needle-llama-15m")
  assert 14e6 < model_configs.num_parameters(config) < 16e6
  assert (config.vocab_size, config.head_dim, config.tie_word_embeddings) == (32000, 64, True)
  assert config.max_position_embeddings == 32768
  # The largest tensor, the embedding, must fit one 15 MB bf16 shard.
  assert config.vocab_size * config.hidden_size * 2 <= 15_000_000


def test_config_by_name_knows_presets_and_rejects_unknown():
  assert model_configs.config_by_name("llama2-7b") == PRESETS["llama2-7b"]
  with pytest.raises(ValueError, match="unknown model config name='nope'"):
    model_configs.config_by_name("nope")
