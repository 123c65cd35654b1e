"""Hugging Face LLaMA checkpoints (config.json + safetensors) to and from `models.llama.Llama`.

Loading builds the module abstractly (`nnx.eval_shape`, no memory) and fills it one tensor at a
time from memory-mapped safetensors files, so a checkpoint never needs twice its size in host
memory. Only safetensors are read: pickle-based `pytorch_model.bin` files are refused.

Hugging Face stores every linear layer as a PyTorch weight [out, in]; this port stores einsum
weights [in, ...out] with heads split out (q_proj [M, Hq, D], o_proj [Hq, D, M]), so each linear
weight is transposed and reshaped; the embedding [V, M] and the norm scales [M] are stored alike.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from contextlib import ExitStack
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from models.llama.config import LlamaConfig
from models.llama.model import Llama

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

# Stored by some exporters; recomputed by every LLaMA implementation, so safe to skip.
_HARMLESS_EXTRAS = re.compile(r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")
_DTYPES = {"F32": jnp.float32, "BF16": jnp.bfloat16, "F16": jnp.float16}

# Path of an nnx.Param inside `Llama`, e.g. ("layers", 3, "attn", "q_proj").
ParamPath = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One Hugging Face tensor and the `Llama` parameter it fills.

  hf_shape: the tensor's shape in the checkpoint. transpose: whether it is a PyTorch linear weight
  [out, in], which this port stores transposed as [in, out] (heads then split by a reshape).
  """

  name: str
  path: ParamPath
  hf_shape: tuple[int, ...]
  transpose: bool

  def to_param(self, tensor: np.ndarray, param_shape: tuple[int, ...]) -> np.ndarray:
    """Checkpoint layout `hf_shape` -> parameter layout `param_shape` (a view where possible)."""
    return (tensor.T if self.transpose else tensor).reshape(param_shape)

  def to_hf(self, param: np.ndarray) -> np.ndarray:
    """Parameter layout -> checkpoint layout `hf_shape`, C-contiguous."""
    if self.transpose:
      return np.ascontiguousarray(param.reshape(self.hf_shape[::-1]).T)
    return np.ascontiguousarray(param.reshape(self.hf_shape))


def hf_tensor_specs(config: LlamaConfig) -> list[TensorSpec]:
  """Every tensor of a Hugging Face `LlamaForCausalLM` checkpoint for `config`, in model order."""
  m, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  q_dim = config.num_heads * config.head_dim
  kv_dim = config.num_kv_heads * config.head_dim
  specs = [TensorSpec("model.embed_tokens.weight", ("embedder", "embedding"), (v, m), False)]
  for i in range(config.num_layers):
    prefix = f"model.layers.{i}."
    per_layer = [
        ("input_layernorm.weight", ("attn_norm", "scale"), (m,), False),
        ("self_attn.q_proj.weight", ("attn", "q_proj"), (q_dim, m), True),
        ("self_attn.k_proj.weight", ("attn", "k_proj"), (kv_dim, m), True),
        ("self_attn.v_proj.weight", ("attn", "v_proj"), (kv_dim, m), True),
        ("self_attn.o_proj.weight", ("attn", "o_proj"), (m, q_dim), True),
        ("post_attention_layernorm.weight", ("mlp_norm", "scale"), (m,), False),
        ("mlp.gate_proj.weight", ("mlp", "gate_proj"), (f, m), True),
        ("mlp.up_proj.weight", ("mlp", "up_proj"), (f, m), True),
        ("mlp.down_proj.weight", ("mlp", "down_proj"), (m, f), True),
    ]
    specs += [TensorSpec(prefix + name, ("layers", i) + path, shape, transpose)
              for name, path, shape, transpose in per_layer]
  specs.append(TensorSpec("model.norm.weight", ("final_norm", "scale"), (m,), False))
  if not config.tie_word_embeddings:
    specs.append(TensorSpec("lm_head.weight", ("lm_head",), (v, m), True))
  return specs


def _param(model: Llama, path: ParamPath) -> nnx.Param:
  node: Any = model
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


def llama_from_hf_tensors(config: LlamaConfig, get_tensor: Callable[[str], np.ndarray], *,
                          source: str) -> Llama:
  """Builds `Llama(config)` abstractly and fills it tensor by tensor.

  get_tensor: returns the named checkpoint tensor in Hugging Face layout (see `hf_tensor_specs`);
    it is called once per tensor and the result dropped once placed on the device.
  source: names the checkpoint in error messages.
  """
  model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  for spec in hf_tensor_specs(config):
    tensor = get_tensor(spec.name)
    if tuple(tensor.shape) != spec.hf_shape:
      raise ValueError(f"{source}: tensor {spec.name!r} has shape {tuple(tensor.shape)}, "
                       f"expected {spec.hf_shape} for this config")
    param = _param(model, spec.path)
    value = spec.to_param(np.asarray(tensor), param.shape).astype(config.param_dtype)
    param.set_value(jax.device_put(value))
  unfilled = [path for path, state in nnx.to_flat_state(nnx.state(model))
              if isinstance(state.get_value(), jax.ShapeDtypeStruct)]
  if unfilled:
    raise RuntimeError(f"hf_tensor_specs does not cover the parameters {unfilled}")
  return model


def _shard_files(directory: pathlib.Path) -> list[pathlib.Path]:
  """The safetensors files of a checkpoint directory: the single file or the index's shards."""
  if (directory / SINGLE_FILE).is_file():
    return [directory / SINGLE_FILE]
  index_path = directory / INDEX_FILE
  if not index_path.is_file():
    pickles = sorted(p.name for p in directory.glob("*.bin"))
    hint = (f"; pickle checkpoints such as {pickles} are not loaded, convert them to safetensors"
            if pickles else "")
    raise FileNotFoundError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")
  weight_map = json.loads(index_path.read_text()).get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise ValueError(f"{index_path} has no 'weight_map'")
  shards = []
  for tensor_name, shard in weight_map.items():
    shard_path = directory / shard
    if not shard_path.is_file():
      raise FileNotFoundError(f"{index_path} puts {tensor_name!r} in shard {shard!r}, "
                              f"but {shard_path} does not exist")
    if shard_path not in shards:
      shards.append(shard_path)
  return shards


def _check_tensor_names(names: Iterable[str], config: LlamaConfig, source: str) -> None:
  """Raises on missing tensors and on extra tensors other than known-harmless ones."""
  expected = {spec.name for spec in hf_tensor_specs(config)}
  names = set(names)
  missing = sorted(expected - names)
  if missing:
    raise ValueError(f"{source} lacks tensors {missing}")
  # A tied model's stored lm_head.weight is a copy; transformers also ties it to the embedding.
  harmless = {"lm_head.weight"} if config.tie_word_embeddings else set()
  unexpected = sorted(name for name in names - expected
                      if name not in harmless and not _HARMLESS_EXTRAS.fullmatch(name))
  if unexpected:
    raise ValueError(f"{source} has unexpected tensors {unexpected} (unsupported LLaMA variant?)")


def _check_supported(hf: dict[str, Any], source: pathlib.Path) -> None:
  """Rejects config.json features `LlamaConfig.from_hf_config` does not model."""
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"{source}: unsupported hidden_act={act!r}; LLaMA uses 'silu'")
  tp = hf.get("pretraining_tp", 1)
  if tp != 1:
    raise ValueError(f"{source}: unsupported pretraining_tp={tp}; only 1 is supported")


def load_hf_config(directory: str | pathlib.Path) -> LlamaConfig:
  """Reads `directory/config.json` into a `LlamaConfig` (float32 dtypes)."""
  path = pathlib.Path(directory) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}")
  hf = json.loads(path.read_text())
  _check_supported(hf, path)
  try:
    return LlamaConfig.from_hf_config(hf)
  except (ValueError, TypeError) as error:
    raise ValueError(f"{path}: {error}") from error


def load_hf_checkpoint(path: str | pathlib.Path, *, dtype=None,
                       param_dtype=None) -> tuple[Llama, LlamaConfig]:
  """Loads a Hugging Face LLaMA checkpoint directory.

  path: a directory with config.json and either model.safetensors or model.safetensors.index.json
    plus its shards. Tensors may be float32, bfloat16 or float16.
  param_dtype: the parameters' dtype; None keeps the checkpoint's (that of the embedding).
  dtype: the compute dtype; None means param_dtype.
  """
  directory = pathlib.Path(path)
  if not directory.is_dir():
    raise FileNotFoundError(f"Hugging Face checkpoint directory {directory} does not exist")
  config = load_hf_config(directory)
  with ExitStack() as stack:
    handles, dtypes = {}, {}
    for shard in _shard_files(directory):
      handle = stack.enter_context(safe_open(shard, framework="numpy"))
      for name in handle.keys():
        if name in handles:
          raise ValueError(f"tensor {name!r} is stored twice in {directory}")
        code = handle.get_slice(name).get_dtype()
        if code not in _DTYPES:
          raise ValueError(f"{shard}: tensor {name!r} has unsupported dtype {code}; "
                           f"expected one of {sorted(_DTYPES)}")
        handles[name], dtypes[name] = handle, _DTYPES[code]
    _check_tensor_names(handles, config, str(directory))
    param_dtype = param_dtype or dtypes["model.embed_tokens.weight"]
    config = config.replace(param_dtype=param_dtype, dtype=dtype or param_dtype)
    model = llama_from_hf_tensors(config, lambda name: handles[name].get_tensor(name),
                                  source=str(directory))
  return model, config


def _plan_shards(specs: list[TensorSpec], itemsize: int,
                 max_shard_bytes: int) -> list[list[TensorSpec]]:
  """Groups tensors in order into shards of at most `max_shard_bytes` (a larger tensor alone)."""
  shards, size = [[]], 0
  for spec in specs:
    nbytes = math.prod(spec.hf_shape) * itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += nbytes
  return shards


def save_hf_checkpoint(model: Llama, path: str | pathlib.Path, *,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
  """Writes `model` as a Hugging Face checkpoint transformers' `LlamaForCausalLM` loads.

  Writes config.json and, if every tensor fits in `max_shard_bytes`, model.safetensors; otherwise
  model-0000i-of-0000n.safetensors shards and model.safetensors.index.json. Tensors are written in
  `config.param_dtype`. Only one shard's tensors are copied to host memory at a time.
  """
  directory = pathlib.Path(path)
  existing = sorted(p.name for p in directory.glob("model*.safetensors*"))
  if existing:
    raise FileExistsError(f"{directory} already holds checkpoint files {existing}")
  directory.mkdir(parents=True, exist_ok=True)
  config = model.config
  specs = hf_tensor_specs(config)
  param_dtype = jnp.dtype(config.param_dtype)
  shards = _plan_shards(specs, param_dtype.itemsize, max_shard_bytes)
  weight_map, total_size = {}, 0
  for number, shard in enumerate(shards, start=1):
    file_name = (SINGLE_FILE if len(shards) == 1
                 else f"model-{number:05d}-of-{len(shards):05d}.safetensors")
    tensors = {spec.name: spec.to_hf(np.asarray(_param(model, spec.path)[...], param_dtype))
               for spec in shard}
    save_file(tensors, directory / file_name, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, file_name))
    total_size += sum(tensor.nbytes for tensor in tensors.values())
  if len(shards) > 1:
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
  hf_config = config.to_hf_config()
  hf_config["dtype"] = param_dtype.name
  (directory / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
