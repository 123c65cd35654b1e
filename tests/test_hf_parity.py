"""Parity of `models.llama` (loaded by `weights_hf`) with transformers' LlamaForCausalLM on CPU."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from models.llama import Llama, RopeScaling, dense_attention, init_kv_caches
from models.llama.weights_hf import INDEX_FILE, load_hf_checkpoint, save_hf_checkpoint

VOCAB = 97
LENGTH = 16
OFFSET = 40  # First position: RoPE scaling matters more at larger angles.
TOL = 1e-4   # Max abs logit difference in float32; logits are O(1) to O(10).

BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
            rms_norm_eps=1e-5, tie_word_embeddings=False)
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=128, rope_theta=10000.0)
VARIANTS = {
    "mha": {},
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "linear_rope": dict(rope_parameters=dict(rope_type="linear", factor=4.0, rope_theta=10000.0)),
    "llama3_rope": dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE),
    "tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "head_dim": dict(hidden_size=48, head_dim=16, num_key_value_heads=2),
}


def make_hf_model(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
  """A random transformers LLaMA with O(1) activations (norm scales near 1, not exactly 1)."""
  config = transformers.LlamaConfig(**{**BASE, **overrides}, attn_implementation="eager")
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("norm.weight"):
        param.copy_(1.0 + 0.2 * torch.randn_like(param))
      elif "embed_tokens" in name:
        param.normal_()
      else:
        param.normal_(std=param.shape[1] ** -0.5)
  return model


def random_tokens(batch: int, length: int = LENGTH, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length), dtype=np.int32)


def hf_logits(model: transformers.LlamaForCausalLM, tokens: np.ndarray) -> np.ndarray:
  """tokens [B, T] at positions OFFSET + t -> float32 logits [B, T, V]."""
  position_ids = OFFSET + torch.arange(tokens.shape[1])[None].expand(tokens.shape[0], -1)
  with torch.no_grad():
    out = model(torch.as_tensor(tokens, dtype=torch.long), position_ids=position_ids)
  return out.logits.float().numpy()


@nnx.jit
def forward(model: Llama, tokens: jax.Array, positions: jax.Array, caches=None):
  """tokens, positions [B, T] -> (logits [B, T, V], caches)."""
  return model(tokens, positions, caches, attention_fn=dense_attention)


def our_logits(model: Llama, tokens: np.ndarray, offset: int = OFFSET) -> np.ndarray:
  """tokens [B, T] at positions offset + t -> float32 logits [B, T, V] (no cache)."""
  positions = offset + jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  logits, _ = forward(model, jnp.asarray(tokens), positions)
  return np.asarray(logits, np.float32)


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.max(np.abs(a - b)))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prefill_logits_match_transformers(tmp_path, variant):
  hf = make_hf_model(**VARIANTS[variant])
  hf.save_pretrained(tmp_path)
  model, config = load_hf_checkpoint(tmp_path)
  assert config.num_kv_heads == hf.config.num_key_value_heads
  assert config.head_dim == hf.config.head_dim
  assert config.tie_word_embeddings == hf.config.tie_word_embeddings
  assert (config.rope_scaling.rope_type
          == (hf.config.rope_parameters or {}).get("rope_type", "default"))
  tokens = random_tokens(batch=2)
  assert max_diff(our_logits(model, tokens), hf_logits(hf, tokens)) <= TOL


def test_old_style_rope_config_loads_to_same_rope(tmp_path):
  hf = make_hf_model(rope_parameters=dict(rope_type="linear", factor=4.0, rope_theta=5000.0))
  hf.save_pretrained(tmp_path)
  config_path = tmp_path / "config.json"
  hf_config = json.loads(config_path.read_text())
  del hf_config["rope_parameters"]
  hf_config.update(rope_scaling={"type": "linear", "factor": 4.0}, rope_theta=5000.0)
  config_path.write_text(json.dumps(hf_config))
  model, config = load_hf_checkpoint(tmp_path)
  assert config.rope_scaling == RopeScaling("linear", factor=4.0)
  assert config.rope_theta == 5000.0
  tokens = random_tokens(batch=1)
  assert max_diff(our_logits(model, tokens), hf_logits(hf, tokens)) <= TOL


@pytest.mark.parametrize("variant", ["gqa", "llama3_rope"])
def test_cached_decode_matches_full_recompute(tmp_path, variant):
  make_hf_model(**VARIANTS[variant]).save_pretrained(tmp_path)
  model, config = load_hf_checkpoint(tmp_path)
  tokens = random_tokens(batch=2, seed=1)
  prefill = 6
  # The dense cache holds position j in slot j, so a cached sequence starts at position 0.
  full = our_logits(model, tokens, offset=0)
  caches = init_kv_caches(config, batch_size=2, max_length=LENGTH + 4)
  positions = jnp.broadcast_to(jnp.arange(LENGTH), tokens.shape)
  logits, caches = forward(model, jnp.asarray(tokens[:, :prefill]), positions[:, :prefill], caches)
  steps = [np.asarray(logits)]
  for t in range(prefill, LENGTH):
    logits, caches = forward(model, jnp.asarray(tokens[:, t:t + 1]), positions[:, t:t + 1], caches)
    steps.append(np.asarray(logits))
  assert max_diff(np.concatenate(steps, axis=1), full) <= TOL


def test_right_padded_batch_matches_each_prompt_alone(tmp_path):
  make_hf_model(**VARIANTS["gqa"]).save_pretrained(tmp_path)
  model, _ = load_hf_checkpoint(tmp_path)
  lengths = (LENGTH, 9)
  prompts = [random_tokens(1, length, seed=length)[0] for length in lengths]
  batch = np.zeros((2, LENGTH), np.int32)
  for row, prompt in enumerate(prompts):
    batch[row, :len(prompt)] = prompt
  batched = our_logits(model, batch)
  for row, prompt in enumerate(prompts):
    alone = our_logits(model, prompt[None])[0]
    assert max_diff(batched[row, :len(prompt)], alone) <= TOL


def test_sharded_transformers_checkpoint_loads(tmp_path):
  hf = make_hf_model(**VARIANTS["gqa"])
  hf.save_pretrained(tmp_path, max_shard_size="40KB")
  assert len(list(tmp_path.glob("model-*.safetensors"))) >= 2
  assert (tmp_path / INDEX_FILE).is_file()
  model, _ = load_hf_checkpoint(tmp_path)
  tokens = random_tokens(batch=2)
  assert max_diff(our_logits(model, tokens), hf_logits(hf, tokens)) <= TOL


@pytest.mark.parametrize("variant", ["gqa", "tied"])
def test_saved_checkpoint_loads_in_transformers(tmp_path, variant):
  hf = make_hf_model(**VARIANTS[variant])
  hf.save_pretrained(tmp_path / "hf")
  model, _ = load_hf_checkpoint(tmp_path / "hf")
  save_hf_checkpoint(model, tmp_path / "ours", max_shard_bytes=40_000)
  assert len(list((tmp_path / "ours").glob("model-*.safetensors"))) >= 2
  reloaded = transformers.LlamaForCausalLM.from_pretrained(
      tmp_path / "ours", attn_implementation="eager").eval()
  assert reloaded.dtype == torch.float32
  tokens = random_tokens(batch=2)
  assert max_diff(hf_logits(reloaded, tokens), hf_logits(hf, tokens)) <= TOL


@pytest.mark.parametrize("torch_dtype, jax_dtype", [(torch.bfloat16, jnp.bfloat16),
                                                    (torch.float16, jnp.float16)])
def test_half_precision_checkpoint_loads(tmp_path: pathlib.Path, torch_dtype, jax_dtype):
  make_hf_model(**VARIANTS["gqa"]).to(torch_dtype).save_pretrained(tmp_path)
  # The checkpoint's rounded weights, computed in float32 (a fresh model: casting a model to
  # half precision also rounds its RoPE frequencies).
  reference_model = transformers.LlamaForCausalLM.from_pretrained(
      tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
  tokens = random_tokens(batch=2)
  reference = hf_logits(reference_model, tokens)

  # Parameters keep the stored dtype; computing in float32 reproduces the rounded weights exactly.
  model, config = load_hf_checkpoint(tmp_path, dtype=jnp.float32)
  assert config.param_dtype == jax_dtype
  assert model.layers[0].attn.q_proj[...].dtype == jax_dtype
  assert max_diff(our_logits(model, tokens), reference) <= TOL

  # Computing in the checkpoint's dtype is close: within 3% of the largest |logit| (bfloat16 has
  # an 8-bit significand; the observed error is about 1%).
  model, config = load_hf_checkpoint(tmp_path)
  assert config.dtype == jax_dtype
  assert max_diff(our_logits(model, tokens), reference) <= 0.03 * np.abs(reference).max()
