"""Tests of the Hugging Face checkpoint reader/writer (layout, round trip, error messages).

Parity with transformers itself is tested in tests/test_hf_parity.py.
"""

from __future__ import annotations

import json
import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from models.llama import Llama, LlamaConfig
from models.llama.checkpoint import load_checkpoint
from models.llama.weights_hf import (CONFIG_FILE, INDEX_FILE, SINGLE_FILE, load_hf_checkpoint,
                                     save_hf_checkpoint)

CONFIG = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, max_position_embeddings=64)


def random_llama(config: LlamaConfig, seed: int = 0) -> Llama:
  """A Llama whose every parameter, norm scales included, is random (numpy: no JAX RNG compiles)."""
  model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(seed)))
  rng = np.random.default_rng(seed)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Param):
      node.set_value(jnp.asarray(rng.normal(size=node.shape), config.param_dtype))
  return model


def flat_params(model: Llama) -> dict[tuple, np.ndarray]:
  return {path: np.asarray(state.get_value())
          for path, state in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def saved(tmp_path: pathlib.Path, config: LlamaConfig = CONFIG, **kwargs) -> pathlib.Path:
  """Saves a random model for `config` to tmp_path/ckpt and returns that directory."""
  directory = tmp_path / "ckpt"
  save_hf_checkpoint(random_llama(config), directory, **kwargs)
  return directory


def edit_tensors(directory: pathlib.Path, edit) -> None:
  """Applies `edit` to the tensor dict of a single-file checkpoint and writes it back."""
  tensors = load_file(directory / SINGLE_FILE)
  edit(tensors)
  save_file(tensors, directory / SINGLE_FILE, metadata={"format": "pt"})


def edit_config(directory: pathlib.Path, **changes) -> None:
  path = directory / CONFIG_FILE
  path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("tied, param_dtype, max_shard_bytes", [
    (False, jnp.float32, 10_000),
    (True, jnp.float32, 10**9),
    (False, jnp.bfloat16, 10**9),
    (True, jnp.bfloat16, 5_000),
])
def test_save_then_load_round_trips(tmp_path, tied, param_dtype, max_shard_bytes):
  config = CONFIG.replace(tie_word_embeddings=tied, param_dtype=param_dtype, dtype=param_dtype)
  model = random_llama(config)
  save_hf_checkpoint(model, tmp_path, max_shard_bytes=max_shard_bytes)
  shards = sorted(tmp_path.glob("model-*.safetensors"))
  if max_shard_bytes < 10**9:
    assert len(shards) >= 2 and (tmp_path / INDEX_FILE).is_file()
    assert not (tmp_path / SINGLE_FILE).exists()
  else:
    assert not shards and (tmp_path / SINGLE_FILE).is_file()
  loaded, loaded_config = load_hf_checkpoint(tmp_path)
  assert loaded_config == config
  expected, actual = flat_params(model), flat_params(loaded)
  assert expected.keys() == actual.keys()
  for path in expected:
    assert actual[path].dtype == expected[path].dtype, path
    np.testing.assert_array_equal(actual[path], expected[path], err_msg=str(path))


def test_saved_tensors_use_hugging_face_layout(tmp_path):
  model = random_llama(CONFIG)
  save_hf_checkpoint(model, tmp_path)
  tensors = load_file(tmp_path / SINGLE_FILE)
  attn, mlp = model.layers[1].attn, model.layers[1].mlp
  m, h, kv, d = CONFIG.hidden_size, CONFIG.num_heads, CONFIG.num_kv_heads, CONFIG.head_dim
  # PyTorch linear weights are [out, in], with the output index of head h, dim j at h * D + j.
  q = tensors["model.layers.1.self_attn.q_proj.weight"]
  np.testing.assert_array_equal(q.reshape(h, d, m).transpose(2, 0, 1), attn.q_proj[...])
  k = tensors["model.layers.1.self_attn.k_proj.weight"]
  np.testing.assert_array_equal(k.reshape(kv, d, m).transpose(2, 0, 1), attn.k_proj[...])
  o = tensors["model.layers.1.self_attn.o_proj.weight"]
  np.testing.assert_array_equal(o.reshape(m, h, d).transpose(1, 2, 0), attn.o_proj[...])
  np.testing.assert_array_equal(tensors["model.layers.1.mlp.down_proj.weight"].T,
                                mlp.down_proj[...])
  np.testing.assert_array_equal(tensors["lm_head.weight"].T, model.lm_head[...])
  np.testing.assert_array_equal(tensors["model.embed_tokens.weight"],
                                model.embedder.embedding[...])


def test_dtypes_default_to_the_checkpoint_and_can_be_overridden(tmp_path):
  directory = saved(tmp_path, CONFIG.replace(param_dtype=jnp.bfloat16))
  model, config = load_hf_checkpoint(directory)
  assert (config.param_dtype, config.dtype) == (jnp.bfloat16, jnp.bfloat16)
  assert model.layers[0].mlp.up_proj[...].dtype == jnp.bfloat16
  model, config = load_hf_checkpoint(directory, dtype=jnp.float32, param_dtype=jnp.float16)
  assert (config.param_dtype, config.dtype) == (jnp.float16, jnp.float32)
  assert model.layers[0].mlp.up_proj[...].dtype == jnp.float16
  logits, _ = model(jnp.zeros((1, 3), jnp.int32), jnp.arange(3)[None])
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_harmless_extra_tensors_are_ignored(tmp_path):
  config = CONFIG.replace(tie_word_embeddings=True)
  directory = saved(tmp_path, config)
  rng = np.random.default_rng(1)

  def add_extras(tensors):
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = rng.normal(size=4).astype("f4")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()

  edit_tensors(directory, add_extras)
  _, loaded_config = load_hf_checkpoint(directory)
  assert loaded_config.tie_word_embeddings


def test_missing_tensor_is_named(tmp_path):
  directory = saved(tmp_path)
  edit_tensors(directory, lambda tensors: tensors.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"lacks tensors \['model\.layers\.1\.mlp\.up_proj\.weight"):
    load_hf_checkpoint(directory)


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
  directory = saved(tmp_path)
  name = "model.layers.0.self_attn.k_proj.weight"
  edit_tensors(directory, lambda tensors: tensors.update({name: tensors[name][:8]}))
  with pytest.raises(ValueError, match=re.escape(f"{name!r} has shape (8, 32), expected (16, 32)")):
    load_hf_checkpoint(directory)


def test_unexpected_tensor_is_named(tmp_path):
  directory = saved(tmp_path)
  name = "model.layers.0.self_attn.q_proj.bias"
  edit_tensors(directory, lambda tensors: tensors.update({name: np.ones(32, "f4")}))
  with pytest.raises(ValueError, match=re.escape(f"unexpected tensors [{name!r}]")):
    load_hf_checkpoint(directory)


def test_unsupported_tensor_dtype_is_named(tmp_path):
  directory = saved(tmp_path)
  name = "model.norm.weight"
  edit_tensors(directory, lambda tensors: tensors.update({name: np.ones(32, np.int8)}))
  with pytest.raises(ValueError, match=re.escape(f"{name!r} has unsupported dtype I8")):
    load_hf_checkpoint(directory)


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="mistral"), "unsupported model_type='mistral'"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "unsupported hidden_act='gelu'"),
    (dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4)), "'yarn'"),
    (dict(num_attention_heads=3), "must divide"),
])
def test_unsupported_config_is_rejected(tmp_path, changes, message):
  directory = saved(tmp_path)
  edit_config(directory, **changes)
  with pytest.raises(ValueError, match=re.escape(message)) as error:
    load_hf_checkpoint(directory)
  assert CONFIG_FILE in str(error.value)


def test_missing_config_is_reported(tmp_path):
  directory = saved(tmp_path)
  (directory / CONFIG_FILE).unlink()
  with pytest.raises(FileNotFoundError, match="no config.json"):
    load_hf_checkpoint(directory)


def test_missing_shard_is_named(tmp_path):
  directory = saved(tmp_path, max_shard_bytes=10_000)
  shard = sorted(directory.glob("model-*.safetensors"))[-1]
  shard.unlink()
  with pytest.raises(FileNotFoundError, match=re.escape(f"shard '{shard.name}'")):
    load_hf_checkpoint(directory)


def test_tensor_stored_in_two_shards_is_named(tmp_path):
  directory = saved(tmp_path, max_shard_bytes=10_000)
  shards = sorted(directory.glob("model-*.safetensors"))
  first, last = shards[0], shards[-1]
  tensors = load_file(last)
  tensors["model.embed_tokens.weight"] = load_file(first)["model.embed_tokens.weight"]
  save_file(tensors, last, metadata={"format": "pt"})
  with pytest.raises(ValueError, match="'model.embed_tokens.weight' is stored twice"):
    load_hf_checkpoint(directory)


def test_index_without_weight_map_is_reported(tmp_path):
  directory = saved(tmp_path, max_shard_bytes=10_000)
  (directory / INDEX_FILE).write_text(json.dumps({"metadata": {}}))
  with pytest.raises(ValueError, match="has no 'weight_map'"):
    load_hf_checkpoint(directory)


def test_pickle_checkpoints_are_refused(tmp_path):
  directory = saved(tmp_path)
  (directory / SINGLE_FILE).rename(directory / "pytorch_model.bin")
  message = "pickle checkpoints such as ['pytorch_model.bin'] are not loaded"
  with pytest.raises(FileNotFoundError, match=re.escape(message)):
    load_hf_checkpoint(directory)


def test_missing_directory_is_reported(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_hf_checkpoint(tmp_path / "nowhere")


def test_save_refuses_to_overwrite_a_checkpoint(tmp_path):
  directory = saved(tmp_path)
  with pytest.raises(FileExistsError, match=SINGLE_FILE):
    save_hf_checkpoint(random_llama(CONFIG), directory)


def test_load_checkpoint_dispatches_directories_to_hugging_face(tmp_path):
  directory = saved(tmp_path)
  model, config = load_checkpoint(directory)
  assert config == CONFIG
  expected = flat_params(random_llama(CONFIG))
  for path, value in flat_params(model).items():
    np.testing.assert_array_equal(value, expected[path], err_msg=str(path))
  with pytest.raises(ValueError, match="cannot tell the checkpoint format"):
    load_checkpoint(tmp_path)
