"""A Flax NNX port of LLaMA (LLaMA-2, long-context variants, llama3 RoPE scaling)."""

from models.llama.attention import AttentionFn
from models.llama.config import PRESETS, LlamaConfig, RopeScaling
from models.llama.dense_attention import dense_attention, grouped_attention
from models.llama.kv_cache import KVCache, init_kv_caches
from models.llama.model import Llama

__all__ = [
    "AttentionFn", "KVCache", "Llama", "LlamaConfig", "PRESETS", "RopeScaling",
    "dense_attention", "grouped_attention", "init_kv_caches",
]
