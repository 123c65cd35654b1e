"""Sharded-versus-one-device checks, run in a subprocess that sees 8 CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.sharding_checks attention

The pytest files `tests/test_sharding_*.py` run this script (jax must see 8 devices before it
initialises, which the main test process has already done with 1). Each check compares results
on several meshes with the unsharded library on one device, in float32:
  attention   context-parallel attention == attention_methods.context_attention (threshold,
              budget, capped row lists, dense; prefill and decode) for every mesh of MESHES.
  forward     model forward with sharded weights, caches and context == one-device forward.
  checkpoint  a sharded FixedContext saved from one mesh restores onto others, unchanged.
  rules       mesh errors and the PartitionSpecs of weights, contexts and caches.
Tolerance: ATOL / RTOL below; row counts and overflow flags must be equal.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from models.llama.checkpoint import load_checkpoint
from models.llama.tokenizer import load_tokenizer
import pallas_kernels
from squeezed_jax import online
from squeezed_jax.attention_methods import (MethodConfig, OnlineAttention,
                                            context_attention)
from squeezed_jax.context_layers import split_layers
from squeezed_jax.fixed_context import ContextConfig, FixedContext
from squeezed_jax.generation import pad_prompts
from squeezed_jax import sharding
from squeezed_jax.sharding import sharded_checkpoint

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "assets",
                      "stories260K")
STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
         "park with her big red ball. One day, Lily saw a small dog under a tree. The dog was sad "
         "because it was lost. Lily wanted to help the dog find its home. ") * 3
ATOL = RTOL = 2e-5
# (data, heads, context); stories260K has 8 query heads and 4 KV heads.
MESHES = ((1, 1, 1), (1, 1, 2), (1, 1, 4), (1, 1, 8), (2, 2, 2), (1, 4, 2))
BATCH, TOKENS = 4, 6


@functools.cache
def _setup():
  """(model, tokenizer, flat fixed context of STORY)."""
  model, _ = load_checkpoint(os.path.join(ASSETS, "stories260K.bin"))
  tokenizer = load_tokenizer(os.path.join(ASSETS, "tok512.bin"))
  config = ContextConfig(observation_window=24, prefill_chunk=128, percent_clusters=10.0)
  return model, tokenizer, FixedContext.build(model, tokenizer.encode(STORY, bos=True), config)


def _mesh(shape):
  """A (data, heads, context) mesh over the first devices."""
  config = sharding.MeshConfig(*shape)
  return sharding.make_mesh(config, jax.devices()[:config.num_devices])


def _close(name, got, want):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL, rtol=RTOL,
                             err_msg=name)


def _gap_threshold(scores: np.ndarray, quantile: float) -> float:
  """A tau halfway between two consecutive distinct scores near `quantile` (no score near it)."""
  values = np.unique(scores[scores > 0])
  index = int(quantile * (len(values) - 1))
  return float(values[index] + values[index + 1]) / 2


CASES = (("threshold", "prefill"), ("threshold", "decode"), ("threshold-capped", "prefill"),
         ("budget", "prefill"), ("budget", "decode"), ("dense", "prefill"))


def _all_cases(attention, configs, layer, prefill_q, prefill_mask):
  """{(config name, phase): attention(config, q, layer, mask)} for CASES; decode queries are
  the first token of each prefill block."""
  inputs = {"prefill": (prefill_q, prefill_mask),
            "decode": (prefill_q[:, :1], jnp.ones_like(prefill_mask[:, :1]))}
  return {case: attention(configs[case[0]], inputs[case[1]][0], layer, inputs[case[1]][1])
          for case in CASES}


def check_attention():
  model, _, ctx = _setup()
  config = model.config
  rng = np.random.default_rng(0)
  layer_index = 2
  layer = split_layers(ctx)[layer_index]
  prefill_q = jnp.asarray(rng.normal(size=(BATCH, TOKENS, config.num_heads, config.head_dim))
                          * 2.0, jnp.float32)
  prefill_mask = jnp.asarray(np.arange(TOKENS)[None] < np.array([[6], [3], [5], [1]]))
  scores = pallas_kernels.centroid_scores(prefill_q, layer.centroids, layer.counts,
                                          query_mask=prefill_mask)
  tau = _gap_threshold(np.asarray(scores), 0.6)
  configs = {
      "threshold": MethodConfig("squeezed", max_rows=ctx.num_clustered),
      "threshold-capped": MethodConfig("squeezed", max_rows=40),
      "budget": MethodConfig("squeezed", max_rows=60, key_budget=60),
      "dense": MethodConfig("dense"),
  }
  want = jax.jit(functools.partial(_all_cases, context_attention, configs))(
      layer.replace(threshold=jnp.float32(tau)), prefill_q, prefill_mask)
  overflowed = np.asarray(want["threshold-capped", "prefill"][2].overflow)
  assert overflowed.any() and not overflowed.all(), "the capped case must overflow sometimes"
  for shape in MESHES:
    mesh = _mesh(shape)
    shards = sharding.context_parallel_layers(ctx, mesh, threshold=tau)[layer_index]
    attention = functools.partial(sharding.sharded_context_attention, mesh=mesh)
    got = jax.jit(functools.partial(_all_cases, attention, configs))(shards, prefill_q,
                                                                      prefill_mask)
    for case, (out, lse, usage) in want.items():
      got_out, got_lse, got_usage = got[case]
      label = f"mesh {shape} {case}"
      _close(f"{label} out", got_out, out)
      _close(f"{label} lse", got_lse, lse)
      for field in ("rows", "overflow", "summary_vectors"):
        np.testing.assert_array_equal(getattr(got_usage, field), getattr(usage, field),
                                      err_msg=f"{label} {field}")
  print(f"attention: {len(MESHES)} meshes x {len(CASES)} cases equal to one device")


def _forward_steps(model, ctx, questions, layers, attention, caches, steps):
  """Prefill of `questions`, then `steps` teacher-forced decode steps: logits per call."""
  graphdef, state = nnx.split(model)
  tokens, lengths = pad_prompts(questions, 1)
  positions = ctx.num_tokens + jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  logits, caches = online.forward(graphdef, state, layers, jnp.asarray(tokens), positions,
                                  caches, attention)
  outputs = [logits]
  for step in range(steps):
    positions = jnp.asarray(ctx.num_tokens + lengths + step)[:, None]
    follow = jnp.asarray((lengths * 7 + step * 13) % model.config.vocab_size)[:, None]
    logits, caches = online.forward(graphdef, state, layers, follow, positions, caches,
                                    attention)
    outputs.append(logits)
  return [np.asarray(x) for x in outputs], caches


def check_forward():
  model, tokenizer, ctx = _setup()
  questions = [tokenizer.encode(text, bos=False) for text in
               (" Where did Lily find the dog?", " The ball", " Who was sad?", " Lily")]
  percentile = 0.7
  tau = float(ctx.threshold(percentile))
  method, _, _ = online.resolve_method(ctx, "squeezed", percentile=percentile)
  lengths = jnp.asarray([len(q) for q in questions])
  capacity = max(lengths) + 4
  reference_layers = split_layers(ctx, threshold=tau)
  want, want_caches = _forward_steps(
      model, ctx, questions, reference_layers, OnlineAttention(method),
      online.init_caches(reference_layers, lengths, capacity, jnp.float32), 3)
  for shape in ((2, 2, 2),):
    mesh = _mesh(shape)
    sharded_model = sharding.shard_model(nnx.clone(model), mesh)
    layers = sharding.context_parallel_layers(ctx, mesh, threshold=tau)
    caches = sharding.shard_caches(
        online.init_caches(reference_layers, lengths, capacity, jnp.float32), mesh)
    got, got_caches = _forward_steps(sharded_model, ctx, questions, layers,
                                     sharding.ShardedOnlineAttention(method, mesh), caches, 3)
    for step, (g, w) in enumerate(zip(got, want)):
      np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4,
                                 err_msg=f"mesh {shape} logits of call {step}")
    for layer, (g, w) in enumerate(zip(got_caches, want_caches)):
      np.testing.assert_array_equal(g.stats.rows, w.stats.rows,
                                    err_msg=f"mesh {shape} layer {layer} rows")
      np.testing.assert_array_equal(g.stats.overflows, w.stats.overflows,
                                    err_msg=f"mesh {shape} layer {layer} overflows")
  want_answers = online.generate(model, ctx, questions, percentile=percentile, max_new_tokens=6,
                                 stop_tokens=[])
  got_answers = online.generate(sharded_model, ctx, questions, percentile=percentile,
                                max_new_tokens=6, stop_tokens=[], mesh=mesh)
  assert got_answers.token_ids == want_answers.token_ids, (got_answers.token_ids,
                                                           want_answers.token_ids)
  np.testing.assert_allclose(got_answers.kv_budget, want_answers.kv_budget, rtol=1e-6)
  print("forward: sharded model + context + caches equal to one device, and generate(mesh=)")


def check_checkpoint():
  model, _, ctx = _setup()
  save_mesh = _mesh((1, 2, 4))
  saved = sharding.shard_fixed_context(ctx, save_mesh)
  assert saved.window_keys[0].sharding.spec == PartitionSpec("heads", None, None)
  with tempfile.TemporaryDirectory() as directory:
    path = os.path.join(directory, "ctx")
    saved.save(path)
    for shape in ((2, 2, 2), (1, 1, 8), (1, 4, 2), (1, 1, 1)):
      mesh = _mesh(shape)
      restored = sharded_checkpoint.load_fixed_context(path, mesh, model=model)
      for (_, want), (path_got, got) in zip(jax.tree_util.tree_leaves_with_path(ctx),
                                            jax.tree_util.tree_leaves_with_path(restored)):
        label = f"mesh {shape} {jax.tree_util.keystr(path_got)}"
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=label)
        assert got.sharding.mesh.shape == mesh.shape, label
      heads = shape[1]
      expected = PartitionSpec("heads" if heads > 1 else None, None, None)
      assert restored.window_keys[0].sharding.spec == expected, restored.window_keys[0].sharding
      assert restored.config == ctx.config and restored.model_config == ctx.model_config
  print("checkpoint: saved on mesh (1, 2, 4), restored equal on 4 meshes")


def check_rules():
  try:
    sharding.make_mesh(sharding.MeshConfig(2, 2, 1))
  except ValueError as error:
    assert "needs 4 devices, got len(devices)=8" in str(error), error
  else:
    raise AssertionError("a 4-device mesh over 8 devices must be refused")
  mesh = _mesh((2, 2, 2))
  model, _, ctx = _setup()
  model = sharding.shard_model(nnx.clone(model), mesh)
  attention = model.layers[0].attn
  assert attention.q_proj[...].sharding.spec == PartitionSpec(None, "heads", None)
  assert attention.o_proj[...].sharding.spec == PartitionSpec("heads", None, None)
  # 172 MLP units, split over heads=2.
  assert model.layers[0].mlp.down_proj[...].sharding.spec == PartitionSpec("heads", None)
  assert model.embedder.embedding[...].sharding.spec == PartitionSpec(None, None)
  # An axis that does not divide a dimension is replicated: 4 heads over 8 devices.
  assert sharding.logical_spec(("kv_heads",), (4,), _mesh((1, 8, 1))) == PartitionSpec(None)
  placed = sharding.shard_fixed_context(ctx, _mesh((1, 1, 8)))
  rows = ctx.num_clustered
  expected_rows = "context" if rows % 8 == 0 else None
  assert placed.keys[0].sharding.spec == PartitionSpec(None, expected_rows, None)
  lengths = jnp.asarray([3, 5])
  caches = sharding.shard_caches(online.init_caches(split_layers(ctx), lengths, 8, jnp.float32),
                                 mesh)
  assert caches[0].kv.keys.sharding.spec == PartitionSpec("data", None, "heads", None)
  assert caches[0].stats.rows.sharding.spec == PartitionSpec("data", "heads")
  print("rules: mesh errors and partition specs as documented")


CHECKS = {"attention": check_attention, "forward": check_forward,
          "checkpoint": check_checkpoint, "rules": check_rules}

if __name__ == "__main__":
  if jax.device_count() != 8:
    raise SystemExit(f"needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), "
                     f"got {jax.device_count()}")
  for check_name in sys.argv[1:] or CHECKS:
    CHECKS[check_name]()
