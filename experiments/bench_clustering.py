"""Benchmark of the offline key clustering at LLaMA-2-7B shapes (32 layers x 32 KV heads, D = 128).

Keys are synthetic but structured: per (layer, head), a Gaussian mixture with `--num_modes` modes
(random directions and norms), plus a few outlier channels scaled up as in real post-RoPE keys.
For each sequence length the clustering (`cluster_keys`, or `cluster_keys_hierarchical`) is
compiled once, then timed; one JSON line per case is printed (and appended to --output_json).
Memory: `resident_before_gib` is what the device holds before clustering (the keys, mostly),
`peak_memory_gib` the allocator's peak since the process started (so run sequence lengths in
increasing order, as by default), both from `memory_stats()` (null on CPU).

  python -m experiments.bench_clustering --seq_lens=32768,131072
  python -m experiments.bench_clustering --seq_lens=256 --num_layers=2 --num_kv_heads=2  # CPU
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from squeezed_jax import key_clustering

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["32768", "131072"], "Keys per head to cluster.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 32, "Layers L.")
_NUM_KV_HEADS = flags.DEFINE_integer("num_kv_heads", 32, "KV heads per layer.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension D.")
_PERCENT_CLUSTERS = flags.DEFINE_float("percent_clusters", 5.0, "Fine clusters, % of keys.")
_PERCENT_COARSE = flags.DEFINE_float("percent_coarse_clusters", 1.0,
                                     "Coarse clusters, % of keys (with --hierarchical).")
_HIERARCHICAL = flags.DEFINE_bool("hierarchical", False, "Also build coarse clusters.")
_DTYPE = flags.DEFINE_enum("dtype", "bf16", ["bf16", "f32"], "Key dtype.")
_NUM_MODES = flags.DEFINE_integer("num_modes", 2048, "Gaussian-mixture modes per head.")
_NUM_RUNS = flags.DEFINE_integer("num_runs", 3, "Timed runs after the compile.")
# K-means options; None keeps the library's default.
_MAX_ITERS = flags.DEFINE_integer("max_iters", None, "Lloyd steps at most.")
_TOL = flags.DEFINE_float("tol", None, "Lloyd relative-inertia tolerance.")
_HEADS_PER_STEP = flags.DEFINE_integer("heads_per_step", None, "Heads per K-means group.")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", None, "Keys per distance block.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Append the JSON lines to this file.")

_DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}
_NUM_OUTLIER_CHANNELS = 4
_OUTLIER_SCALE = 8.0


def synthetic_keys(key: jax.Array, num_layers: int, num_heads: int, seq_len: int,
                   head_dim: int, num_modes: int, dtype: Any) -> jax.Array:
  """Gaussian-mixture keys [L, Hkv, S, D] with a few large-magnitude channels per head.

  Built one layer at a time so that only one layer's float32 temporaries exist at once.
  """

  def layer_keys(layer_key: jax.Array) -> jax.Array:
    mode_key, norm_key, pick_key, noise_key, channel_key = jax.random.split(layer_key, 5)
    modes = jax.random.normal(mode_key, (num_heads, num_modes, head_dim))
    modes *= jax.random.uniform(norm_key, (num_heads, num_modes, 1), minval=0.5, maxval=2.0)
    picks = jax.random.randint(pick_key, (num_heads, seq_len), 0, num_modes)
    keys = jnp.take_along_axis(modes, picks[..., None], axis=1)
    keys += 0.3 * jax.random.normal(noise_key, keys.shape)
    outliers = jax.random.choice(channel_key, head_dim, (_NUM_OUTLIER_CHANNELS,), replace=False)
    scale = jnp.ones((head_dim,)).at[outliers].set(_OUTLIER_SCALE)
    return (keys * scale).astype(dtype)

  return jax.lax.map(layer_keys, jax.random.split(key, num_layers))


def bench_case(seq_len: int) -> dict[str, Any]:
  """Compiles and times the clustering of [L, Hkv, seq_len, D] keys; returns the JSON record."""
  dtype = _DTYPES[_DTYPE.value]
  keys = jax.jit(synthetic_keys, static_argnums=range(1, 7))(
      jax.random.key(0), _NUM_LAYERS.value, _NUM_KV_HEADS.value, seq_len, _HEAD_DIM.value,
      _NUM_MODES.value, dtype)
  keys.block_until_ready()
  num_clusters = key_clustering.num_clusters_for(seq_len, _PERCENT_CLUSTERS.value)
  kmeans_options = {flag.name: flag.value
                    for flag in (_MAX_ITERS, _TOL, _HEADS_PER_STEP, _CHUNK_SIZE)
                    if flag.value is not None}
  options = dict(num_clusters=num_clusters, **kmeans_options)
  if _HIERARCHICAL.value:
    options["num_coarse_clusters"] = key_clustering.num_clusters_for(seq_len,
                                                                     _PERCENT_COARSE.value)
    fn = key_clustering.cluster_keys_hierarchical
  else:
    fn = key_clustering.cluster_keys
  clustering = jax.jit(functools.partial(fn, **options))
  rng = jax.random.key(1)
  resident = _memory_stats().get("bytes_in_use")

  start = time.perf_counter()
  compiled = clustering.lower(keys, key=rng).compile()
  compile_s = time.perf_counter() - start
  run_s = []
  for _ in range(_NUM_RUNS.value):
    start = time.perf_counter()
    result = jax.block_until_ready(compiled(keys, key=rng))
    run_s.append(time.perf_counter() - start)
  counts = result.counts
  peak = _memory_stats().get("peak_bytes_in_use")
  return {
      "seq_len": seq_len, "num_layers": _NUM_LAYERS.value, "num_kv_heads": _NUM_KV_HEADS.value,
      "head_dim": _HEAD_DIM.value, "dtype": _DTYPE.value, "num_clusters": num_clusters,
      "hierarchical": _HIERARCHICAL.value, "num_coarse_clusters": options.get(
          "num_coarse_clusters"), "kmeans_options": kmeans_options,
      "compile_s": round(compile_s, 3), "median_run_s": round(statistics.median(run_s), 3),
      "run_s": [round(t, 3) for t in run_s],
      "keys_gib": _gib(keys.nbytes), "resident_before_gib": _gib(resident),
      "peak_memory_gib": _gib(peak),
      "empty_cluster_fraction": float(jnp.mean(counts == 0)),
      "device": jax.devices()[0].device_kind,
  }


def _memory_stats() -> dict[str, int]:
  """The device allocator's statistics ({} where the backend has none, e.g. CPU)."""
  return jax.devices()[0].memory_stats() or {}


def _gib(num_bytes: int | None) -> float | None:
  return None if num_bytes is None else round(num_bytes / 2**30, 3)


def main(argv: list[str]) -> None:
  del argv
  seq_lens = list(map(int, _SEQ_LENS.value))
  for seq_len in seq_lens:
    line = json.dumps(bench_case(seq_len))
    print(line, flush=True)
    if _OUTPUT_JSON.value:
      with open(_OUTPUT_JSON.value, "a") as f:
        f.write(line + "\n")
  if _OUTPUT_JSON.value:
    print(f"appended {len(seq_lens)} JSON lines to {os.path.abspath(_OUTPUT_JSON.value)}")


if __name__ == "__main__":
  app.run(main)
