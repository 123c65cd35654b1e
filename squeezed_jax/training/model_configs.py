"""The configs of models trained here, looked up by name beside `models.llama.PRESETS`."""

from __future__ import annotations

from models.llama import PRESETS, LlamaConfig

# 32000 x 224 bf16 = 14.3 MB: the tied embedding, the largest tensor, fits a 15 MB shard, which
# 32000 x 256 (16.4 MB) would not. Four 64-wide heads (q_proj 224 -> 256), as in larger LLaMAs.
# rope_theta 1e6 (as long-context LLaMA variants use) keeps rotations distinct up to 32K tokens.
NEEDLE_LLAMA_15M = LlamaConfig(
    vocab_size=32000, hidden_size=224, intermediate_size=1024, num_layers=8, num_heads=4,
    num_kv_heads=4, head_dim=64, max_position_embeddings=32768, rope_theta=1_000_000.0,
    tie_word_embeddings=True)

TRAINING_CONFIGS: dict[str, LlamaConfig] = {"needle-llama-15m": NEEDLE_LLAMA_15M}


def config_by_name(name: str) -> LlamaConfig:
  """A config of `TRAINING_CONFIGS` or of `models.llama.PRESETS`, by name."""
  configs = {**PRESETS, **TRAINING_CONFIGS}
  if name not in configs:
    raise ValueError(f"unknown model config {name=}; expected one of {sorted(configs)}")
  return configs[name]


def num_parameters(config: LlamaConfig) -> int:
  """Number of parameters of a `Llama(config)` (tied embeddings counted once)."""
  m, f, d = config.hidden_size, config.intermediate_size, config.head_dim
  attention = m * d * (2 * config.num_heads + 2 * config.num_kv_heads)
  per_layer = attention + 3 * m * f + 2 * m
  head = 0 if config.tie_word_embeddings else m * config.vocab_size
  return config.vocab_size * m + config.num_layers * per_layer + m + head
