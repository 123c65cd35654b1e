"""Tests of the llama2.c checkpoint loader: the real stories260K model, a numpy llama2.c reference
forward (adjacent-pair RoPE) on tiny random files, and error messages for malformed files."""

from __future__ import annotations

import pathlib
import re
import string
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.llama import Llama, dense_attention, init_kv_caches
from models.llama.checkpoint import load_checkpoint
from models.llama.tokenizer import Llama2cTokenizer
from models.llama.weights_llama2c import load_llama2c_checkpoint

ASSETS = pathlib.Path(__file__).resolve().parent.parent / "assets" / "stories260K"
TINY = dict(dim=32, hidden_dim=40, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=37, seq_len=16)
TOL = 1e-4  # Max abs difference, float32 model vs float64 numpy reference.


def llama2c_tensors(dims: dict[str, int], shared: bool, seed: int = 0) -> dict[str, np.ndarray]:
  """Random weights in llama2.c's file order and [out, in] shapes (float64)."""
  rng = np.random.default_rng(seed)
  dim, hidden, layers, vocab = dims["dim"], dims["hidden_dim"], dims["n_layers"], dims["vocab_size"]
  head_size = dim // dims["n_heads"]
  kv_dim = dims["n_kv_heads"] * head_size

  def linear(*shape):
    return rng.normal(size=shape) * shape[-1] ** -0.5

  angles = np.arange(dims["seq_len"])[:, None] * rope_frequencies(head_size)[None]
  tensors = {
      "token_embedding": rng.normal(size=(vocab, dim)),
      "rms_att": 1 + 0.2 * rng.normal(size=(layers, dim)),
      "wq": linear(layers, dim, dim),
      "wk": linear(layers, kv_dim, dim),
      "wv": linear(layers, kv_dim, dim),
      "wo": linear(layers, dim, dim),
      "rms_ffn": 1 + 0.2 * rng.normal(size=(layers, dim)),
      "w1": linear(layers, hidden, dim),
      "w2": linear(layers, dim, hidden),
      "w3": linear(layers, hidden, dim),
      "rms_final": 1 + 0.2 * rng.normal(size=(dim,)),
      "freq_cis_real": np.cos(angles),
      "freq_cis_imag": np.sin(angles),
  }
  if not shared:
    tensors["wcls"] = linear(vocab, dim)
  # What the file holds: the reference computes with the float32-rounded weights.
  return {name: value.astype(np.float32).astype(np.float64) for name, value in tensors.items()}


def write_llama2c(path: pathlib.Path, dims: dict[str, int], tensors: dict[str, np.ndarray],
                  shared: bool) -> pathlib.Path:
  vocab = dims["vocab_size"] if shared else -dims["vocab_size"]
  header = [dims["dim"], dims["hidden_dim"], dims["n_layers"], dims["n_heads"],
            dims["n_kv_heads"], vocab, dims["seq_len"]]
  with open(path, "wb") as f:
    f.write(struct.pack("<7i", *header))
    for value in tensors.values():
      f.write(value.astype("<f4").tobytes())
  return path


def rope_frequencies(head_size: int) -> np.ndarray:
  """llama2.c's frequency of the pair starting at even dim i: 10000^(-i / head_size)."""
  return 10000.0 ** (-np.arange(0, head_size, 2) / head_size)


def rope_adjacent_pairs(x: np.ndarray, pos: int, head_size: int) -> np.ndarray:
  """llama2.c's RoPE on x [heads * head_size]: rotates dims (2i, 2i+1) of each head together."""
  pairs = x.reshape(-1, head_size // 2, 2)
  angle = pos * rope_frequencies(head_size)
  cos, sin = np.cos(angle), np.sin(angle)
  x0, x1 = pairs[..., 0], pairs[..., 1]
  return np.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1).reshape(x.shape)


def rmsnorm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
  return x / np.sqrt(np.mean(x * x) + 1e-5) * weight


def first_layer_qk(w: dict[str, np.ndarray], dims: dict[str, int], token: int,
                   pos: int) -> tuple[np.ndarray, np.ndarray]:
  """llama2.c's post-RoPE q [dim] and k [kv_dim] of layer 0."""
  head_size = dims["dim"] // dims["n_heads"]
  x = rmsnorm(w["token_embedding"][token], w["rms_att"][0])
  return (rope_adjacent_pairs(w["wq"][0] @ x, pos, head_size),
          rope_adjacent_pairs(w["wk"][0] @ x, pos, head_size))


def llama2c_forward(w: dict[str, np.ndarray], dims: dict[str, int],
                    tokens: list[int]) -> np.ndarray:
  """llama2.c's run.c forward, token by token with a KV cache, in float64 -> logits [T, V]."""
  heads, kv_heads = dims["n_heads"], dims["n_kv_heads"]
  head_size = dims["dim"] // heads
  keys, values = [[] for _ in range(dims["n_layers"])], [[] for _ in range(dims["n_layers"])]
  all_logits = []
  for pos, token in enumerate(tokens):
    x = w["token_embedding"][token]
    for layer in range(dims["n_layers"]):
      xb = rmsnorm(x, w["rms_att"][layer])
      keys[layer].append(rope_adjacent_pairs(w["wk"][layer] @ xb, pos, head_size)
                         .reshape(kv_heads, head_size))
      values[layer].append((w["wv"][layer] @ xb).reshape(kv_heads, head_size))
      q = rope_adjacent_pairs(w["wq"][layer] @ xb, pos, head_size).reshape(heads, head_size)
      k, v = np.stack(keys[layer]), np.stack(values[layer])  # [pos + 1, kv_heads, head_size]
      out = np.empty_like(q)
      for h in range(heads):
        kv_head = h // (heads // kv_heads)
        scores = k[:, kv_head] @ q[h] / np.sqrt(head_size)
        probs = np.exp(scores - scores.max())
        out[h] = (probs / probs.sum()) @ v[:, kv_head]
      x = x + w["wo"][layer] @ out.reshape(-1)
      xb = rmsnorm(x, w["rms_ffn"][layer])
      gate = w["w1"][layer] @ xb
      x = x + w["w2"][layer] @ (gate / (1 + np.exp(-gate)) * (w["w3"][layer] @ xb))
    classifier = w.get("wcls", w["token_embedding"])
    all_logits.append(classifier @ rmsnorm(x, w["rms_final"]))
  return np.stack(all_logits)


@nnx.jit
def greedy_step(model: Llama, tokens: jax.Array, positions: jax.Array, caches):
  """tokens, positions [B, 1] -> (argmax next tokens [B, 1], caches)."""
  logits, caches = model(tokens, positions, caches, attention_fn=dense_attention)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32), caches


def test_stories260k_loads_with_its_header_config():
  _, config = load_llama2c_checkpoint(ASSETS / "stories260K.bin")
  assert (config.hidden_size, config.intermediate_size, config.num_layers) == (64, 172, 5)
  assert (config.num_heads, config.num_kv_heads, config.head_dim) == (8, 4, 8)
  assert (config.vocab_size, config.max_position_embeddings) == (512, 512)
  assert config.tie_word_embeddings
  assert (config.rope_theta, config.rms_norm_eps) == (10000.0, 1e-5)
  assert (config.bos_token_id, config.eos_token_id) == (1, 2)


def test_stories260k_greedy_decoding_is_english():
  model, config = load_llama2c_checkpoint(ASSETS / "stories260K.bin")
  num_tokens = 100
  caches = init_kv_caches(config, batch_size=1, max_length=num_tokens + 1)
  sequence = [config.bos_token_id]
  for pos in range(num_tokens):
    token, caches = greedy_step(model, jnp.array([[sequence[-1]]], jnp.int32),
                                jnp.array([[pos]], jnp.int32), caches)
    sequence.append(int(token[0, 0]))
  text = Llama2cTokenizer(ASSETS / "tok512.bin").decode(sequence)
  words = re.findall(r"[A-Za-z']+", text)
  assert {"the", "was"} <= {word.lower() for word in words}, text
  assert "." in text, text
  letters_and_spaces = sum(char in string.ascii_letters + " " for char in text)
  assert letters_and_spaces >= 0.85 * len(text), text
  # Words look like English words; a broken RoPE layout soon gives run-ons like "lourownand".
  assert max(map(len, words)) <= 12, text
  assert sum(len(word) > 8 for word in words) <= 0.05 * len(words), text
  # The cached greedy tokens are the argmax of one cache-less forward over the whole sequence.
  tokens = jnp.array([sequence], jnp.int32)
  logits, _ = model(tokens, jnp.arange(len(sequence))[None])
  np.testing.assert_array_equal(np.argmax(logits[0, :-1], axis=-1), sequence[1:])


@pytest.mark.parametrize("shared", [True, False])
def test_logits_match_numpy_llama2c_forward(tmp_path, shared):
  weights = llama2c_tensors(TINY, shared)
  model, config = load_llama2c_checkpoint(
      write_llama2c(tmp_path / "tiny.bin", TINY, weights, shared))
  assert config.tie_word_embeddings == shared
  tokens = np.random.default_rng(1).integers(0, TINY["vocab_size"], TINY["seq_len"]).tolist()
  logits, _ = model(jnp.array([tokens], jnp.int32), jnp.arange(len(tokens))[None])
  expected = llama2c_forward(weights, TINY, tokens)
  np.testing.assert_allclose(np.asarray(logits[0]), expected, rtol=0, atol=TOL)


def test_rope_permutation_preserves_llama2c_query_key_products(tmp_path):
  weights = llama2c_tensors(TINY, shared=True)
  model, _ = load_llama2c_checkpoint(write_llama2c(tmp_path / "tiny.bin", TINY, weights, True))
  tokens, positions = [5, 17, 3, 30], [0, 3, 7, 11]
  captured = {}

  def capture_layer0(q, k, v, pos, cache, layer):
    if layer == 0:
      captured.update(q=np.asarray(q[0]), k=np.asarray(k[0]))  # [T, Hq, D], [T, Hkv, D]
    return dense_attention(q, k, v, pos, cache, layer)

  model(jnp.array([tokens], jnp.int32), jnp.array([positions], jnp.int32),
        attention_fn=capture_layer0)
  heads, kv_heads = TINY["n_heads"], TINY["n_kv_heads"]
  head_size = TINY["dim"] // heads
  q_ref, k_ref = zip(*(first_layer_qk(weights, TINY, t, p) for t, p in zip(tokens, positions)))
  q_ref = np.stack(q_ref).reshape(len(tokens), heads, head_size)
  k_ref = np.stack(k_ref).reshape(len(tokens), kv_heads, head_size)
  k_ref, ours_k = (np.repeat(k, heads // kv_heads, axis=1) for k in (k_ref, captured["k"]))
  expected = np.einsum("THD,SHD->HTS", q_ref, k_ref)
  actual = np.einsum("THD,SHD->HTS", captured["q"], ours_k)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=TOL)


def test_load_checkpoint_dispatches_bin_files_to_llama2c(tmp_path):
  path = write_llama2c(tmp_path / "tiny.bin", TINY, llama2c_tensors(TINY, True), True)
  _, config = load_checkpoint(path)
  assert (config.hidden_size, config.num_kv_heads) == (TINY["dim"], TINY["n_kv_heads"])
  other = tmp_path / "tiny.pt"
  other.write_bytes(path.read_bytes())
  with pytest.raises(ValueError, match="cannot tell the checkpoint format"):
    load_checkpoint(other)


@pytest.mark.parametrize("cut", [4, 1000])
def test_truncated_file_states_expected_and_actual_size(tmp_path, cut):
  path = write_llama2c(tmp_path / "tiny.bin", TINY, llama2c_tensors(TINY, False), False)
  size = path.stat().st_size
  path.write_bytes(path.read_bytes()[:-cut])
  message = f"truncated.* implies {size} bytes, the file has {size - cut}"
  with pytest.raises(ValueError, match=message):
    load_llama2c_checkpoint(path)


def test_trailing_data_is_rejected(tmp_path):
  path = write_llama2c(tmp_path / "tiny.bin", TINY, llama2c_tensors(TINY, True), True)
  size = path.stat().st_size
  path.write_bytes(path.read_bytes() + b"\0" * 8)
  message = f"trailing data.* implies {size} bytes, the file has {size + 8}"
  with pytest.raises(ValueError, match=message):
    load_llama2c_checkpoint(path)


def test_versioned_format_is_unsupported(tmp_path):
  path = tmp_path / "v1.bin"
  path.write_bytes(struct.pack("<Ii", 0x616B3432, 1) + bytes(256))
  with pytest.raises(ValueError, match="unsupported version"):
    load_llama2c_checkpoint(path)


@pytest.mark.parametrize("changes, message", [
    (dict(dim=0), "non-positive {'dim': 0}"),
    (dict(n_layers=-2), "non-positive {'n_layers': -2}"),
    (dict(n_heads=5), "n_heads=5 must divide dim=32"),
    (dict(dim=36), "n_heads=4 must divide dim=36 into heads of even size"),
    (dict(n_kv_heads=3), "n_kv_heads=3 must divide n_heads=4"),
])
def test_implausible_header_is_rejected(tmp_path, changes, message):
  path = tmp_path / "bad.bin"
  dims = {**TINY, **changes}
  path.write_bytes(struct.pack("<7i", *dims.values()) + bytes(64))
  with pytest.raises(ValueError, match="implausible llama2.c header.*" + re.escape(message)):
    load_llama2c_checkpoint(path)


def test_short_and_missing_files_are_reported(tmp_path):
  path = tmp_path / "short.bin"
  path.write_bytes(bytes(10))
  with pytest.raises(ValueError, match="has 10 bytes, fewer than the 28-byte header"):
    load_llama2c_checkpoint(path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_llama2c_checkpoint(tmp_path / "missing.bin")
