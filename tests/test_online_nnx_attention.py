"""Tests for squeezed_jax.nnx_attention: the drop-in module inside a model equals dense."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.llama.checkpoint import load_checkpoint
from models.llama.tokenizer import load_tokenizer
from squeezed_jax.fixed_context import ContextConfig, FixedContext
from squeezed_jax.nnx_attention import SqueezedAttention
from squeezed_jax.online import MethodOptions

ASSETS = os.path.join(os.path.dirname(__file__), os.pardir, "assets", "stories260K")
STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
         "park with her big red ball. One day, Lily saw a small dog under a tree. ") * 2


@pytest.fixture(scope="module")
def setup():
  model, _ = load_checkpoint(os.path.join(ASSETS, "stories260K.bin"))
  tokenizer = load_tokenizer(os.path.join(ASSETS, "tok512.bin"))
  ctx = FixedContext.build(model, tokenizer.encode(STORY),
                           ContextConfig(observation_window=16, prefill_chunk=128))
  return model, ctx, tokenizer.encode(" The dog and the ball", bos=False)


def test_module_in_the_model_keeping_everything_equals_dense(setup):
  model, ctx, question = setup
  follow = [37, 211, 90]
  attention = SqueezedAttention(ctx, method="squeezed", options=MethodOptions(
      threshold=-1.0, max_rows=ctx.num_clustered))
  caches = attention.init_caches(jnp.array([len(question)]), capacity=16)
  start = ctx.num_tokens
  logits, caches = model(jnp.array([question]), start + jnp.arange(len(question))[None], caches,
                         attention_fn=attention)
  got = [np.asarray(logits[0])]
  caches = attention.start_decode(caches)
  for step, token in enumerate(follow):
    logits, caches = model(jnp.array([[token]]), jnp.array([[start + len(question) + step]]),
                           caches, attention_fn=attention)
    got.append(np.asarray(logits[0]))
  full = np.concatenate([np.asarray(ctx.token_ids), question, follow])
  want, _ = model(jnp.asarray(full)[None], jnp.arange(len(full))[None])
  np.testing.assert_allclose(np.concatenate(got), np.asarray(want[0, start:start + len(got[0])
                                                                 + len(follow)]), atol=1e-4)
  assert float(caches[0].stats.lookups[0]) == 1 + len(follow)


def test_module_state_holds_the_context_arrays(setup):
  _, ctx, _ = setup
  attention = SqueezedAttention(ctx, method="quest", kv_budget=0.5)
  _, state = nnx.split(attention)
  leaves = [leaf for leaf in nnx.to_flat_state(state)]
  assert len(leaves) >= 8 * ctx.num_layers  # K, V, window, clusters, pages of every layer
  pages = -(-ctx.num_clustered // 16)  # each a min and a max vector: half a KV row each
  assert attention.attention.config.key_budget == int(0.5 * ctx.num_clustered - pages)
