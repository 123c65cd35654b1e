"""LLaMA configuration: one frozen dataclass for every model this project runs.

Covers LLaMA-2-7B, LLaMA-2-7B-32K (linear RoPE scaling), Longchat-7B-v1.5-32K, LWM-Text-Chat-1M
(large rope_theta), llama3-style RoPE scaling, and small test configs. `from_hf_config` reads a
Hugging Face `config.json` as older checkpoints write it (`rope_theta`, `rope_scaling`) and as
current transformers writes it (`rope_parameters`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping

import jax.numpy as jnp

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """How rotary frequencies are stretched for contexts longer than training.

  rope_type: "default" (plain RoPE), "linear" (positions divided by `factor`), or "llama3"
    (low frequencies divided by `factor`, high ones kept, smooth in between).
  """

  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"unsupported {self.rope_type=}; expected one of {ROPE_TYPES}")
    if self.factor <= 0:
      raise ValueError(f"RoPE scaling {self.factor=} must be positive")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shapes and numerics of a LLaMA-family decoder.

  `dtype` is the compute dtype, `param_dtype` the dtype parameters are stored in.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None
  max_position_embeddings: int = 4096
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  bos_token_id: int = 1
  eos_token_id: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(f"{self.num_heads=} must divide {self.hidden_size=}")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"{self.num_kv_heads=} must divide {self.num_heads=}")
    if self.head_dim % 2:
      raise ValueError(f"RoPE needs an even {self.head_dim=}")

  @property
  def num_groups(self) -> int:
    """Query heads per KV head (1 = multi-head, num_heads = multi-query)."""
    return self.num_heads // self.num_kv_heads

  def replace(self, **changes) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  def identity_hash(self) -> str:
    """A short hash of the shape-defining fields (not dtypes): ties artifacts to a model."""
    fields = dataclasses.asdict(self)
    for name in ("dtype", "param_dtype"):
      fields.pop(name)
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], **overrides) -> "LlamaConfig":
    """Builds a config from a Hugging Face LLaMA `config.json` dictionary."""
    model_type = hf.get("model_type", "llama")
    if model_type != "llama":
      raise ValueError(f"unsupported {model_type=}: only LLaMA checkpoints are supported")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    missing = [k for k in required if k not in hf]
    if missing:
      raise ValueError(f"config.json lacks required fields {missing}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
      raise ValueError("attention_bias / mlp_bias LLaMA variants are not supported")
    rope = dict(hf.get("rope_parameters") or {})
    rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if not rope:
      rope = dict(hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling_fields = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                           "original_max_position_embeddings") if k in rope}
    eos = hf.get("eos_token_id", 2)
    kwargs = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rope_theta=float(rope_theta),
        rope_scaling=RopeScaling(rope_type=rope_type, **scaling_fields),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id", 1) if hf.get("bos_token_id") is not None else 1,
        eos_token_id=(eos[0] if isinstance(eos, list) else eos) if eos is not None else 2,
    )
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf_config(self) -> dict[str, Any]:
    """The Hugging Face `config.json` dictionary for this config (current `rope_parameters` form)."""
    rope = {"rope_type": self.rope_scaling.rope_type, "rope_theta": self.rope_theta}
    if self.rope_scaling.rope_type != "default":
      rope["factor"] = self.rope_scaling.factor
    if self.rope_scaling.rope_type == "llama3":
      rope.update(low_freq_factor=self.rope_scaling.low_freq_factor,
                  high_freq_factor=self.rope_scaling.high_freq_factor,
                  original_max_position_embeddings=self.rope_scaling.original_max_position_embeddings)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "max_position_embeddings": self.max_position_embeddings,
        "rope_parameters": rope,
        "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
        "hidden_act": "silu",
    }


_LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                  num_heads=32, num_kv_heads=32, rms_norm_eps=1e-5)

PRESETS: dict[str, LlamaConfig] = {
    "llama2-7b": LlamaConfig(**_LLAMA2_7B, max_position_embeddings=4096),
    # togethercomputer/LLaMA-2-7B-32K: linear RoPE interpolation by 8.
    "llama2-7b-32k": LlamaConfig(**_LLAMA2_7B, max_position_embeddings=32768,
                                 rope_scaling=RopeScaling("linear", factor=8.0)),
    # lmsys/longchat-7b-v1.5-32k: linear RoPE scaling by 8.
    "longchat-7b-v1.5-32k": LlamaConfig(**_LLAMA2_7B, max_position_embeddings=32768,
                                        rope_scaling=RopeScaling("linear", factor=8.0)),
    # LargeWorldModel/LWM-Text-Chat-1M: plain RoPE with a very large base.
    "lwm-text-chat-1m": LlamaConfig(**_LLAMA2_7B, max_position_embeddings=1048576,
                                    rope_theta=50_000_000.0),
    # Small configs for tests.
    "tiny": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=512),
    "tiny-mqa": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                            num_heads=4, num_kv_heads=1, max_position_embeddings=512,
                            tie_word_embeddings=True),
}
