"""llama2.c checkpoints (the legacy version-0 `.bin` format) to `models.llama.Llama`.

The file is a header of 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
seq_len; a negative vocab_size means a separate classifier is stored at the end) followed by
float32 tensors, each a PyTorch weight [out, in], in this order:

    token_embedding [V, dim], rms_att [L, dim], wq [L, dim, dim], wk [L, kv_dim, dim],
    wv [L, kv_dim, dim], wo [L, dim, dim], rms_ffn [L, dim], w1 [L, hidden, dim],
    w2 [L, dim, hidden], w3 [L, hidden, dim], rms_final [dim],
    freq_cis_real [seq_len, head_size/2], freq_cis_imag [seq_len, head_size/2], (wcls [V, dim])

llama2.c rotates adjacent pairs (2i, 2i+1) of each head; this port rotates (i, i + head_size/2)
("rotate half"). Permuting the rows of wq and wk within each head (as Hugging Face's conversion
does) makes the two agree exactly. The tensors are read from a memory map, renamed to their Hugging
Face names, and placed by `weights_hf.llama_from_hf_tensors`.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax.numpy as jnp
import numpy as np

from models.llama.config import LlamaConfig
from models.llama.model import Llama
from models.llama.weights_hf import llama_from_hf_tensors

HEADER_BYTES = 7 * 4
# The first int32 of llama2.c's versioned formats (version 1 and 2): "ak42" in ASCII.
VERSIONED_MAGIC = 0x616B3432


@dataclasses.dataclass(frozen=True)
class Llama2cHeader:
  """The version-0 header; `shared_classifier` is the sign of the stored vocab_size."""

  dim: int
  hidden_dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  vocab_size: int
  seq_len: int
  shared_classifier: bool

  @property
  def head_size(self) -> int:
    return self.dim // self.n_heads

  @property
  def kv_dim(self) -> int:
    return self.n_kv_heads * self.head_size

  def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
    """The stored float32 tensors in file order, by their llama2.c names."""
    layers, dim, hidden, kv_dim = self.n_layers, self.dim, self.hidden_dim, self.kv_dim
    shapes = {
        "token_embedding": (self.vocab_size, dim),
        "rms_att": (layers, dim),
        "wq": (layers, dim, dim),
        "wk": (layers, kv_dim, dim),
        "wv": (layers, kv_dim, dim),
        "wo": (layers, dim, dim),
        "rms_ffn": (layers, dim),
        "w1": (layers, hidden, dim),
        "w2": (layers, dim, hidden),
        "w3": (layers, hidden, dim),
        "rms_final": (dim,),
        "freq_cis_real": (self.seq_len, self.head_size // 2),
        "freq_cis_imag": (self.seq_len, self.head_size // 2),
    }
    if not self.shared_classifier:
      shapes["wcls"] = (self.vocab_size, dim)
    return shapes

  def file_bytes(self) -> int:
    return HEADER_BYTES + 4 * sum(int(np.prod(shape)) for shape in self.tensor_shapes().values())

  def to_config(self, *, dtype, param_dtype) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=self.vocab_size, hidden_size=self.dim, intermediate_size=self.hidden_dim,
        num_layers=self.n_layers, num_heads=self.n_heads, num_kv_heads=self.n_kv_heads,
        max_position_embeddings=self.seq_len, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=self.shared_classifier, bos_token_id=1, eos_token_id=2,
        dtype=dtype, param_dtype=param_dtype)


def read_header(path: pathlib.Path) -> Llama2cHeader:
  """Reads and validates the header of a version-0 llama2.c file."""
  with open(path, "rb") as f:
    raw = f.read(HEADER_BYTES)
  if len(raw) >= 4 and int(np.frombuffer(raw[:4], "<u4")[0]) == VERSIONED_MAGIC:
    raise ValueError(f"{path} is a llama2.c version-1/2 checkpoint (magic 'ak42'); unsupported "
                     "version: export it with llama2.c's legacy version 0")
  if len(raw) < HEADER_BYTES:
    raise ValueError(f"{path} has {len(raw)} bytes, fewer than the {HEADER_BYTES}-byte header")
  dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = (
      int(x) for x in np.frombuffer(raw, "<i4"))
  sizes = dict(dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads,
               n_kv_heads=n_kv_heads, vocab_size=abs(vocab_size), seq_len=seq_len)
  non_positive = {name: value for name, value in sizes.items() if value <= 0}
  if non_positive:
    raise ValueError(f"{path}: implausible llama2.c header, non-positive {non_positive}")
  if dim % n_heads or (dim // n_heads) % 2:
    raise ValueError(f"{path}: implausible llama2.c header, {n_heads=} must divide {dim=} "
                     "into heads of even size")
  if n_heads % n_kv_heads:
    raise ValueError(f"{path}: implausible llama2.c header, {n_kv_heads=} must divide {n_heads=}")
  return Llama2cHeader(**sizes, shared_classifier=vocab_size > 0)


def rotate_half_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Reorders the output rows of a q/k weight [H * D, M] from adjacent-pair to rotate-half RoPE.

  Within each head, rows (0, 2, 4, ..., D-2) come first, then rows (1, 3, ..., D-1): the pair
  (2i, 2i+1) llama2.c rotates together becomes the pair (i, i + D/2).
  """
  out_dim, in_dim = weight.shape
  half = out_dim // num_heads // 2
  return weight.reshape(num_heads, half, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


def _hf_tensor_names(header: Llama2cHeader) -> dict[str, tuple[str, int | None]]:
  """Hugging Face tensor name -> (llama2.c tensor name, layer index or None)."""
  names = {"model.embed_tokens.weight": ("token_embedding", None),
           "model.norm.weight": ("rms_final", None)}
  per_layer = {"input_layernorm.weight": "rms_att", "self_attn.q_proj.weight": "wq",
               "self_attn.k_proj.weight": "wk", "self_attn.v_proj.weight": "wv",
               "self_attn.o_proj.weight": "wo", "post_attention_layernorm.weight": "rms_ffn",
               "mlp.gate_proj.weight": "w1", "mlp.down_proj.weight": "w2",
               "mlp.up_proj.weight": "w3"}
  for layer in range(header.n_layers):
    for hf_name, name in per_layer.items():
      names[f"model.layers.{layer}.{hf_name}"] = (name, layer)
  if not header.shared_classifier:
    names["lm_head.weight"] = ("wcls", None)
  return names


def load_llama2c_checkpoint(path: str | pathlib.Path, *, dtype=jnp.float32,
                            param_dtype=jnp.float32) -> tuple[Llama, LlamaConfig]:
  """Loads a llama2.c version-0 `.bin` checkpoint (RoPE theta 10000, RMSNorm eps 1e-5)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"llama2.c checkpoint {path} does not exist")
  header = read_header(path)
  actual, expected = path.stat().st_size, header.file_bytes()
  if actual != expected:
    problem = "truncated" if actual < expected else "has trailing data"
    raise ValueError(f"{path} is {problem}: the header {header} implies {expected} bytes, "
                     f"the file has {actual}")
  data = np.memmap(path, dtype="<f4", mode="r", offset=HEADER_BYTES)
  tensors, start = {}, 0
  for name, shape in header.tensor_shapes().items():
    size = int(np.prod(shape))
    tensors[name] = data[start:start + size].reshape(shape)
    start += size
  heads = {"wq": header.n_heads, "wk": header.n_kv_heads}
  names = _hf_tensor_names(header)

  def get_tensor(hf_name: str) -> np.ndarray:
    name, layer = names[hf_name]
    tensor = tensors[name] if layer is None else tensors[name][layer]
    return rotate_half_rows(tensor, heads[name]) if name in heads else tensor

  config = header.to_config(dtype=dtype, param_dtype=param_dtype)
  return llama_from_hf_tensors(config, get_tensor, source=str(path)), config
