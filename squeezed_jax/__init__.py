"""squeezed-jax: Squeezed Attention for long-context LLM inference in JAX.

Public API:
  FixedContext, ContextConfig   the offline phase: prefill, key clustering, calibration, orbax I/O
  generate_tokens, GenerationResult, SamplingParams   batched generation with a KV cache
  generate, Answers, MethodOptions   questions against a FixedContext (dense, squeezed,
                                     squeezed_hierarchical, quest, oracle_topk, streaming)
  SqueezedAttention                  the flax.nnx attention module for one's own LLaMA-like model

Building blocks live in their modules, e.g. `squeezed_jax.kmeans.kmeans` (batched, jitted
mini-batch K-means), `squeezed_jax.key_clustering`, `squeezed_jax.calibration`.
"""

from squeezed_jax.fixed_context import ContextConfig, FixedContext
from squeezed_jax.generation import GenerationResult, generate_tokens
from squeezed_jax.nnx_attention import SqueezedAttention
from squeezed_jax.online import Answers, MethodOptions, generate
from squeezed_jax.sampling import SamplingParams

__all__ = [
    "Answers", "ContextConfig", "FixedContext", "GenerationResult", "MethodOptions",
    "SamplingParams", "SqueezedAttention", "generate", "generate_tokens",
]
