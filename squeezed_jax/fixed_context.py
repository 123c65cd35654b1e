"""`FixedContext`: a long context processed once (prefill, key clustering, calibration), saved whole.

    ctx = FixedContext.build(model, token_ids, ContextConfig(percent_clusters=5.0))
    ctx.save("/path/ctx")
    ctx = FixedContext.load("/path/ctx", model=model)   # checks that the model matches

The saved artifact holds the reordered KV cache, the observation window's K/V, centroids, counts,
offsets, the permutation, the calibrated thresholds and budgets, the config and the model identity.

The K/V (the bulk: 64 GB for LLaMA-2-7B at 128K tokens) are kept as one buffer per layer, so the
online phase hands each layer its own arrays without a copy, and the build never holds two copies
of the whole cache: each layer's prefilled K/V is dropped once reordered. The cluster arrays are
small and stacked over layers.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from models.llama import Llama, LlamaConfig
from squeezed_jax import atomic_checkpoint, calibration, key_clustering
from squeezed_jax.context_prefill import prefill_context
from squeezed_jax.progress import progress

FORMAT = "squeezed-jax/fixed-context/2"
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ContextConfig:
  """How a fixed context is processed offline.

  percent_clusters: fine clusters as a percentage of the clustered keys (K = ceil(pct% * S')).
  hierarchical: also build coarse clusters over the fine centroids.
  percent_clusters_coarse: coarse clusters as a percentage of the clustered keys.
  observation_window: W last tokens, never clustered, always attended, used for calibration.
  percentiles: fractions of keys to prune that thresholds are calibrated for.
  prefill_chunk: tokens per prefill step.
  seed: K-means seed.
  """

  percent_clusters: float = 5.0
  hierarchical: bool = False
  percent_clusters_coarse: float = 1.0
  observation_window: int = 100
  percentiles: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9)
  prefill_chunk: int = 512
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "percentiles", tuple(sorted(set(float(p) for p in self.percentiles))))
    if not all(0.0 < p < 1.0 for p in self.percentiles):
      raise ValueError(f"{self.percentiles=} must lie in (0, 1)")
    if not 0.0 < self.percent_clusters <= 100.0:
      raise ValueError(f"{self.percent_clusters=} must be in (0, 100]")
    if self.hierarchical and not 0.0 < self.percent_clusters_coarse <= self.percent_clusters:
      raise ValueError(f"{self.percent_clusters_coarse=} must be in (0, "
                       f"{self.percent_clusters=}]")
    if self.observation_window < 1:
      raise ValueError(f"{self.observation_window=} must be >= 1")


@flax.struct.dataclass
class FixedContext:
  """A processed fixed context (a pytree: pass it into jitted functions).

  keys, values: L-tuples of [Hkv, S', D], the clustered part, rows reordered by fine cluster.
  window_keys, window_values: L-tuples of [Hkv, W, D], the observation window, always attended.
  clusters: `ClusteredKeys` or `HierarchicalClusteredKeys` ([L, Hkv, ...] fields).
  thresholds: [P] float32, tau per calibrated percentile (`config.percentiles`).
  kept_fraction: [P, L, Hkv] float32, fraction of each head's clustered keys above tau.
  coarse_thresholds: [P] float32 for the coarse level (hierarchical only, else None).
  token_ids: [S] int32, the context's tokens.
  """

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  window_keys: tuple[jax.Array, ...]
  window_values: tuple[jax.Array, ...]
  clusters: key_clustering.ClusteredKeys | key_clustering.HierarchicalClusteredKeys
  thresholds: jax.Array
  kept_fraction: jax.Array
  coarse_thresholds: jax.Array | None
  token_ids: jax.Array
  config: ContextConfig = flax.struct.field(pytree_node=False)
  model_config: LlamaConfig = flax.struct.field(pytree_node=False)

  @property
  def num_tokens(self) -> int:
    """S, tokens of the fixed context."""
    return self.token_ids.shape[0]

  @property
  def num_layers(self) -> int:
    return len(self.keys)

  @property
  def num_clustered(self) -> int:
    """S' = S - W, keys of the clustered part per (layer, KV head)."""
    return self.keys[0].shape[1]

  def threshold(self, percentile: float) -> jax.Array:
    """tau for a calibrated percentile (fraction of keys pruned)."""
    return self.thresholds[self.percentile_index(percentile)]

  def percentile_index(self, percentile: float) -> int:
    """Index of a calibrated percentile in `thresholds` / `kept_fraction` (ValueError if absent)."""
    for index, p in enumerate(self.config.percentiles):
      if abs(p - percentile) < 1e-9:
        return index
    raise ValueError(f"{percentile=} was not calibrated; this context has "
                     f"{self.config.percentiles}")

  def check_model(self, model: Llama) -> None:
    """Raises CheckpointError (a ValueError) when this context was built for another model."""
    _check_built_for(self.model_config, model.config, "the fixed context")

  @classmethod
  def build(cls, model: Llama, token_ids: Sequence[int],
            config: ContextConfig = ContextConfig()) -> "FixedContext":
    """Prefills `token_ids` in chunks, clusters every head's keys, calibrates thresholds."""
    window = config.observation_window
    started = time.perf_counter()
    prefilled = prefill_context(model, token_ids, window=window, chunk_size=config.prefill_chunk)
    _LOG.info("fixed context: prefill of %d tokens took %.1f s", len(token_ids),
              time.perf_counter() - started)
    window_queries = prefilled.window_queries
    keys, values = list(prefilled.keys), list(prefilled.values)
    del prefilled
    clustered_len = len(token_ids) - window
    started = time.perf_counter()
    clusters = _cluster_layers(keys, clustered_len, config)
    _LOG.info("fixed context: clustering %d keys x %d heads into %d clusters took %.1f s",
              clustered_len, len(keys) * keys[0].shape[0], clusters.centroids.shape[2],
              time.perf_counter() - started)
    thresholds = calibration.calibrate_thresholds(
        window_queries, clusters.centroids, clusters.counts, config.percentiles)
    coarse_thresholds = None
    if config.hierarchical:
      coarse_thresholds = calibration.calibrate_coarse_thresholds(
          window_queries, clusters.coarse_centroids, clusters.coarse_counts,
          config.percentiles).thresholds
    cache = {name: [] for name in _LAYER_FIELDS}
    for layer in range(len(keys)):
      permutation = clusters.permutation[layer]
      for name, prefilled_layer in (("keys", keys), ("values", values)):
        clustered, window_part = _split_window(prefilled_layer[layer], permutation)
        prefilled_layer[layer] = None  # free this layer's prefilled buffer now
        cache[name].append(clustered)
        cache[f"window_{name}"].append(window_part)
    return cls(**{name: tuple(arrays) for name, arrays in cache.items()},
               clusters=clusters,
               thresholds=thresholds.thresholds,
               kept_fraction=thresholds.kept_fraction,
               coarse_thresholds=coarse_thresholds,
               token_ids=jnp.asarray(token_ids, jnp.int32),
               config=config,
               model_config=model.config)

  def arrays_by_name(self) -> dict[str, Any]:
    """The leaves by their saved name ("keys.<layer>", "clusters.<field>", "thresholds", ...);
    also for FixedContext-shaped trees of other leaves (shapes, shardings)."""
    named = {name: getattr(self, name) for name in _ARRAY_FIELDS
             if getattr(self, name) is not None}
    named.update({f"{name}.{layer}": leaf for name in _LAYER_FIELDS
                  for layer, leaf in enumerate(getattr(self, name))})
    named.update({f"clusters.{name}": leaf for name, leaf in self.clusters._asdict().items()})
    return named

  @classmethod
  def from_arrays_by_name(cls, arrays: Mapping[str, Any], config: ContextConfig,
                          model_config: LlamaConfig) -> "FixedContext":
    """The inverse of `arrays_by_name`."""
    cluster_type = (key_clustering.HierarchicalClusteredKeys if config.hierarchical
                    else key_clustering.ClusteredKeys)
    clusters = cluster_type(**{name: arrays[f"clusters.{name}"]
                               for name in cluster_type._fields})
    per_layer = {name: tuple(arrays[f"{name}.{layer}"] for layer in range(model_config.num_layers))
                 for name in _LAYER_FIELDS}
    return cls(**{name: arrays.get(name) for name in _ARRAY_FIELDS}, **per_layer,
               clusters=clusters, config=config, model_config=model_config)

  def save(self, directory: str) -> None:
    """Writes the artifact atomically: an interrupted save leaves the previous one intact."""
    metadata = {
        "format": FORMAT,
        "model_identity": self.model_config.identity_hash(),
        "model_config": self.model_config.to_hf_config(),
        "config": dataclasses.asdict(self.config),
    }
    atomic_checkpoint.save(directory, self.arrays_by_name(), metadata)

  @classmethod
  def read_abstract(cls, directory: str, *, model: Llama | None = None) -> "FixedContext":
    """The artifact's FixedContext with jax.ShapeDtypeStruct leaves (reads its metadata only);
    with `model`, first checks that it was built for that model."""
    _, record = atomic_checkpoint.read_metadata(directory)
    metadata = record["metadata"]
    if metadata.get("format") != FORMAT:
      raise atomic_checkpoint.CheckpointError(
          f"{directory!r} is not a fixed context ({metadata.get('format')=}, expected {FORMAT})")
    model_config = LlamaConfig.from_hf_config(metadata["model_config"])
    if model is not None:
      _check_built_for(model_config, model.config, f"fixed context {directory!r}")
      model_config = model.config
    config = ContextConfig(**{**metadata["config"],
                              "percentiles": tuple(metadata["config"]["percentiles"])})
    shapes = {name: jax.ShapeDtypeStruct(tuple(spec["shape"]), spec["dtype"])
              for name, spec in record["arrays"].items()}
    return cls.from_arrays_by_name(shapes, config, model_config)

  @classmethod
  def load(cls, directory: str, *, model: Llama | None = None,
           shardings: "FixedContext | None" = None) -> "FixedContext":
    """Reads an artifact; with `model`, first checks that it was built for that model.

    shardings: a FixedContext-shaped tree of jax.sharding.Sharding to restore every array onto
    (e.g. from `read_abstract` and sharding rules); None restores the arrays as saved.
    """
    abstract = cls.read_abstract(directory, model=model)
    targets = None
    if shardings is not None:
      targets = {name: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
                 for (name, leaf), sharding in zip(abstract.arrays_by_name().items(),
                                                   shardings.arrays_by_name().values())}
    arrays, _ = atomic_checkpoint.load(directory, targets)
    return cls.from_arrays_by_name(arrays, abstract.config, abstract.model_config)


_LAYER_FIELDS = ("keys", "values", "window_keys", "window_values")
_ARRAY_FIELDS = ("thresholds", "kept_fraction", "coarse_thresholds", "token_ids")


def _cluster_layers(keys: Sequence[jax.Array], clustered_len: int, config: ContextConfig
                    ) -> key_clustering.ClusteredKeys | key_clustering.HierarchicalClusteredKeys:
  """Clusters the first `clustered_len` keys of each layer's [Hkv, S, D] buffer, layer by layer
  (one compiled shape; no stacked copy of all layers' keys), stacked over layers ([L, Hkv, ...])."""
  num_clusters = key_clustering.num_clusters_for(clustered_len, config.percent_clusters)
  if config.hierarchical:
    cluster = functools.partial(
        key_clustering.cluster_keys_hierarchical, num_clusters=num_clusters,
        num_coarse_clusters=key_clustering.num_clusters_for(clustered_len,
                                                            config.percent_clusters_coarse))
  else:
    cluster = functools.partial(key_clustering.cluster_keys, num_clusters=num_clusters)
  seed = jax.random.key(config.seed)
  per_layer = [jax.block_until_ready(
      cluster(layer_keys[None, :, :clustered_len], key=jax.random.fold_in(seed, layer)))
               for layer, layer_keys in enumerate(progress(keys, desc="clustering",
                                                           unit="layer"))]
  return type(per_layer[0])(*(jnp.concatenate(field) for field in zip(*per_layer)))


def _split_window(prefilled: jax.Array, permutation: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One layer's [Hkv, S, D] prefilled K or V -> (clustered part [Hkv, S', D] reordered by
  `permutation` [Hkv, S'], observation window [Hkv, W, D])."""
  clustered_len = permutation.shape[-1]
  clustered = key_clustering.reorder(prefilled[None, :, :clustered_len], permutation[None])[0]
  return clustered, prefilled[:, clustered_len:]


def _check_built_for(built_for: LlamaConfig, given: LlamaConfig, what: str) -> None:
  if built_for.identity_hash() != given.identity_hash():
    raise atomic_checkpoint.CheckpointError(
        f"{what} was built for another model (identity {built_for.identity_hash()}: "
        f"{_describe(built_for)}), not for the given one (identity {given.identity_hash()}: "
        f"{_describe(given)})")


def _describe(config: LlamaConfig) -> str:
  return (f"{config.num_layers} layers, {config.num_heads} heads, {config.num_kv_heads} KV heads, "
          f"hidden {config.hidden_size}, vocab {config.vocab_size}")
