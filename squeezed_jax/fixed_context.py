"""`FixedContext`: a long context processed once (prefill, key clustering, calibration), saved whole.

    ctx = FixedContext.build(model, token_ids, ContextConfig(percent_clusters=5.0))
    ctx.save("/path/ctx")
    ctx = FixedContext.load("/path/ctx", model=model)   # checks that the model matches

The saved artifact holds the reordered KV cache, the observation window's K/V, centroids, counts,
offsets, the permutation, the calibrated thresholds and budgets, the config and the model identity.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from models.llama import Llama, LlamaConfig
from squeezed_jax import atomic_checkpoint, calibration, key_clustering
from squeezed_jax.context_prefill import prefill_context

FORMAT = "squeezed-jax/fixed-context/1"
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

  keys, values: [L, Hkv, S', D] clustered part, rows reordered by fine cluster.
  window_keys, window_values: [L, Hkv, W, D] the observation window, always attended.
  clusters: `ClusteredKeys` or `HierarchicalClusteredKeys` ([L, Hkv, ...] fields).
  thresholds: [P] float32, tau per calibrated percentile (`config.percentiles`).
  kept_fraction: [P, L, Hkv] float32, fraction of each head's clustered keys above tau.
  coarse_thresholds: [P] float32 for the coarse level (hierarchical only, else None).
  token_ids: [S] int32, the context's tokens.
  """

  keys: jax.Array
  values: jax.Array
  window_keys: jax.Array
  window_values: jax.Array
  clusters: key_clustering.ClusteredKeys | key_clustering.HierarchicalClusteredKeys
  thresholds: jax.Array
  kept_fraction: jax.Array
  coarse_thresholds: jax.Array | None
  token_ids: jax.Array
  config: ContextConfig = flax.struct.field(pytree_node=False)
  model_config: LlamaConfig = flax.struct.field(pytree_node=False)

  @property
  def num_tokens(self) -> int:
    return self.token_ids.shape[0]

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
    clustered_len = len(token_ids) - window
    num_clusters = key_clustering.num_clusters_for(clustered_len, config.percent_clusters)
    keys = prefilled.keys[:, :, :clustered_len]
    key = jax.random.key(config.seed)
    started = time.perf_counter()
    if config.hierarchical:
      clusters = key_clustering.cluster_keys_hierarchical(
          keys, num_clusters=num_clusters, key=key,
          num_coarse_clusters=key_clustering.num_clusters_for(clustered_len,
                                                              config.percent_clusters_coarse))
    else:
      clusters = key_clustering.cluster_keys(keys, num_clusters=num_clusters, key=key)
    jax.block_until_ready(clusters)
    _LOG.info("fixed context: clustering %d keys x %d heads into %d clusters took %.1f s",
                 clustered_len, keys.shape[0] * keys.shape[1], num_clusters,
                 time.perf_counter() - started)
    thresholds = calibration.calibrate_thresholds(
        prefilled.window_queries, clusters.centroids, clusters.counts, config.percentiles)
    coarse_thresholds = None
    if config.hierarchical:
      coarse_thresholds = calibration.calibrate_coarse_thresholds(
          prefilled.window_queries, clusters.coarse_centroids, clusters.coarse_counts,
          config.percentiles).thresholds
    return cls(
        keys=key_clustering.reorder(keys, clusters.permutation),
        values=key_clustering.reorder(prefilled.values[:, :, :clustered_len], clusters.permutation),
        window_keys=prefilled.keys[:, :, clustered_len:],
        window_values=prefilled.values[:, :, clustered_len:],
        clusters=clusters,
        thresholds=thresholds.thresholds,
        kept_fraction=thresholds.kept_fraction,
        coarse_thresholds=coarse_thresholds,
        token_ids=jnp.asarray(token_ids, jnp.int32),
        config=config,
        model_config=model.config)

  def save(self, directory: str) -> None:
    """Writes the artifact atomically: an interrupted save leaves the previous one intact."""
    arrays = {name: getattr(self, name) for name in _ARRAY_FIELDS
              if getattr(self, name) is not None}
    arrays.update({f"clusters.{name}": value
                   for name, value in self.clusters._asdict().items()})
    metadata = {
        "format": FORMAT,
        "model_identity": self.model_config.identity_hash(),
        "model_config": self.model_config.to_hf_config(),
        "config": dataclasses.asdict(self.config),
    }
    atomic_checkpoint.save(directory, arrays, metadata)

  @classmethod
  def load(cls, directory: str, *, model: Llama | None = None) -> "FixedContext":
    """Reads an artifact; with `model`, first checks that it was built for that model."""
    _, record = atomic_checkpoint.read_metadata(directory)
    metadata = record["metadata"]
    if metadata.get("format") != FORMAT:
      raise atomic_checkpoint.CheckpointError(
          f"{directory!r} is not a fixed context ({metadata.get('format')=}, expected {FORMAT})")
    model_config = LlamaConfig.from_hf_config(metadata["model_config"])
    if model is not None:
      _check_built_for(model_config, model.config, f"fixed context {directory!r}")
      model_config = model.config
    arrays, _ = atomic_checkpoint.load(directory)
    config = ContextConfig(**{**metadata["config"],
                              "percentiles": tuple(metadata["config"]["percentiles"])})
    cluster_type = (key_clustering.HierarchicalClusteredKeys if config.hierarchical
                    else key_clustering.ClusteredKeys)
    clusters = cluster_type(**{name: arrays[f"clusters.{name}"]
                               for name in cluster_type._fields})
    return cls(**{name: arrays.get(name) for name in _ARRAY_FIELDS}, clusters=clusters,
               config=config, model_config=model_config)


_ARRAY_FIELDS = ("keys", "values", "window_keys", "window_values", "thresholds", "kept_fraction",
                 "coarse_thresholds", "token_ids")


def _check_built_for(built_for: LlamaConfig, given: LlamaConfig, what: str) -> None:
  if built_for.identity_hash() != given.identity_hash():
    raise atomic_checkpoint.CheckpointError(
        f"{what} was built for another model (identity {built_for.identity_hash()}: "
        f"{_describe(built_for)}), not for the given one (identity {given.identity_hash()}: "
        f"{_describe(given)})")


def _describe(config: LlamaConfig) -> str:
  return (f"{config.num_layers} layers, {config.num_heads} heads, {config.num_kv_heads} KV heads, "
          f"hidden {config.hidden_size}, vocab {config.vocab_size}")
