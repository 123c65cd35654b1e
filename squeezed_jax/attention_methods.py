"""The model's attention function for questions asked of a fixed context, one per method.

Each question token attends to (a) the fixed context, through the chosen method, and (b) the
question's own tokens and the generated ones, densely and causally; the two partials merge
exactly by log-sum-exp (`pallas_kernels.merge_partials`). Methods for (a):

  dense                  every fixed-context key: the sparse kernel with every row selected, the
                         batch's queries folded so that the context is read once per batch.
  squeezed               centroid lookup, clusters above tau (or the top clusters within a key
                         budget), sparse attention over their rows (`pallas_kernels`). A decode
                         token goes through `pallas_kernels.squeezed_decode_attention` (on the
                         GPU the selection is a Pallas kernel, no global row list).
  squeezed_hierarchical  coarse lookup above the coarse tau, then only the fine centroids inside
                         the kept coarse clusters, then as `squeezed`.
  quest, oracle_topk, streaming   the baselines of `squeezed_jax.baselines` (XLA).

The observation window is always attended in full. At decode, dense and the squeezed methods hand
(b) to the same kernel call as (a) (`pallas_kernels.OwnRows`: on the GPU the reduce kernel
attends the own rows and merges everything), where XLA's attention and merge took about ten small
kernels per layer. The per-layer cache (`OnlineCache`) holds the
question's dense KV cache (slot = position - S, S = context tokens), the budget statistics, and a
reference to that layer's shared `ContextLayer` (never copied per question or per step).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp

import pallas_kernels
from models.llama import KVCache, grouped_attention
from pallas_kernels import hierarchical, queries
from pallas_kernels.selection import rows_from_clusters
from squeezed_jax import baselines
from squeezed_jax.context_layers import ContextLayer
from squeezed_jax.kv_budget import ROWS_PER_SUMMARY_VECTOR, BudgetStats, LookupUsage

METHODS = ("dense", "squeezed", "squeezed_hierarchical", "quest", "oracle_topk", "streaming")
# Methods whose decode kernels also attend the question's own rows (`context_attention(own=)`).
OWN_ROWS_METHODS = ("dense", "squeezed", "squeezed_hierarchical")
SQUEEZED_METHODS = ("squeezed", "squeezed_hierarchical")


@dataclasses.dataclass(frozen=True)
class MethodConfig:
  """The static settings of a method (hashable: part of the jit cache key).

  name: one of METHODS.
  max_rows: squeezed methods: static row capacity R of a question prefill's selection (selected
    rows beyond R are dropped and counted as an overflow); a decode token reads every kept cluster.
  key_budget: keys per (sequence, KV head): the squeezed methods' fixed-budget mode (None =
    threshold mode) and the baselines' budget.
  max_fine_clusters: squeezed_hierarchical: static number of fine centroids scored.
  page_size: quest page size. sinks: streaming's sink keys.
  measure_mass: also measure the attention mass captured by the attended rows (a dense pass).
  backend: kernel backend for the squeezed methods (None = from the platform).
  """

  name: str
  max_rows: int | None = None
  key_budget: int | None = None
  max_fine_clusters: int | None = None
  page_size: int = 16
  sinks: int = 4
  measure_mass: bool = False
  backend: str | None = None

  def __post_init__(self):
    if self.name not in METHODS:
      raise ValueError(f"method {self.name!r} must be one of {METHODS}")
    if self.name in SQUEEZED_METHODS and (self.max_rows is None or self.max_rows < 1):
      raise ValueError(f"{self.name} needs {self.max_rows=} >= 1")
    if self.name == "squeezed_hierarchical" and not (self.max_fine_clusters or 0) >= 1:
      raise ValueError(f"{self.name} needs {self.max_fine_clusters=} >= 1")
    if self.name in ("quest", "oracle_topk", "streaming") and not (self.key_budget or 0) >= 1:
      raise ValueError(f"{self.name} needs {self.key_budget=} >= 1")


@flax.struct.dataclass
class OnlineCache:
  """One layer's cache while questions are answered against a fixed context.

  kv: [B, T_max, Hkv, D] keys/values of question + generated tokens, slot = position - S.
  stats: budget statistics of this layer's lookups.
  real_until: [B] int32, slots >= this are not real queries (prompt padding at prefill; a
    stopped sequence at decode): they are left out of the lookup's mean and of the statistics.
  context: the layer's shared fixed context (bound inside the jitted step, see `online`).
  """

  kv: KVCache
  stats: BudgetStats
  real_until: jax.Array
  context: ContextLayer | None = None


def _rows_mask(selection: pallas_kernels.Selection, num_keys: int) -> jax.Array:
  """The selection's rows as [B, Hkv, S'] bool."""
  valid = jnp.arange(selection.max_rows) < selection.num_rows[..., None]
  mark = lambda rows, ok: jnp.zeros(num_keys, bool).at[rows].max(ok)
  return jax.vmap(jax.vmap(mark))(selection.rows, valid)


def _captured_mass(q: jax.Array, layer: ContextLayer, mask: jax.Array,
                   weights: jax.Array) -> jax.Array:
  """Share of the clustered part's attention mass on the `mask` [B, Hkv, S'] rows: [B, Hkv]."""
  probs = baselines.attention_weights(q, layer.keys)
  captured = jnp.where(mask[:, :, None, None, :], probs, 0.0).sum(axis=-1)
  return jnp.einsum("BKGT,BT->BK", captured, weights) / probs.shape[2]


def _selection_mode(config: MethodConfig, layer: ContextLayer,
                    kept_coarse: jax.Array | None = None) -> dict:
  """The selection's keyword: the layer's threshold, or the method's key budget (less the fine
  centroids that a hierarchical lookup with these kept coarse clusters scored)."""
  if config.key_budget is None:
    return {"threshold": layer.threshold}
  if kept_coarse is None:
    return {"key_budget": config.key_budget}
  return {"key_budget": hierarchical.key_budget_after_fine_lookup(
      config.key_budget, kept_coarse, layer.coarse_offsets, ROWS_PER_SUMMARY_VECTOR,
      config.max_fine_clusters)}


def _hierarchical_summary(layer: ContextLayer, kept_coarse: jax.Array,
                          max_fine_clusters: int) -> tuple[jax.Array, jax.Array]:
  """Centroids a hierarchical lookup read, [B, Hkv] float32 (all coarse ones + the scored fine
  ones), and whether its candidates overflowed `max_fine_clusters`, [B, Hkv] bool."""
  candidates = hierarchical.fine_candidates(kept_coarse, layer.coarse_offsets)
  summary = layer.coarse_centroids.shape[1] + jnp.minimum(candidates, max_fine_clusters)
  return summary.astype(jnp.float32), candidates > max_fine_clusters


def _squeezed_selection(config: MethodConfig, q: jax.Array, layer: ContextLayer,
                        query_mask: jax.Array):
  """Lookup and selection. Returns (Selection, summary vectors [B, Hkv], overflow [B, Hkv])."""
  kept_coarse = None
  if config.name == "squeezed":
    scores = pallas_kernels.centroid_scores(q, layer.centroids, layer.counts,
                                            query_mask=query_mask, backend=config.backend)
    summary = jnp.full(scores.shape[:2], layer.centroids.shape[1], jnp.float32)
    overflow = jnp.zeros(scores.shape[:2], bool)
  else:
    scores, kept_coarse = pallas_kernels.hierarchical_centroid_scores(
        q, layer.centroids, layer.counts, layer.coarse_centroids, layer.coarse_counts,
        layer.coarse_offsets, coarse_threshold=layer.coarse_threshold,
        max_fine_clusters=config.max_fine_clusters, query_mask=query_mask)
    summary, overflow = _hierarchical_summary(layer, kept_coarse, config.max_fine_clusters)
  selection = pallas_kernels.select_clusters(scores, layer.counts, layer.offsets,
                                             max_rows=config.max_rows,
                                             **_selection_mode(config, layer, kept_coarse))
  wanted = jnp.where(selection.clusters, layer.counts[None], 0).sum(axis=-1)
  return selection, summary, overflow | (wanted > config.max_rows)


def _squeezed_decode(config: MethodConfig, q: jax.Array, layer: ContextLayer,
                     query_mask: jax.Array, own: pallas_kernels.OwnRows | None):
  """One decode token per sequence through `pallas_kernels.squeezed_decode_attention` (on the
  GPU the selection is a Pallas kernel; every kept cluster is read: no row cap,
  and the hierarchical lookup scores every candidate).

  q: [B, 1, Hq, D]; query_mask: [B, 1] (a sequence whose token is not real keeps no cluster);
  own: the sequences' own rows, merged into the result, or None.
  Returns (out [B, 1, Hq, D], lse [B, 1, Hq], KeptClusters, summary vectors
  [B, Hkv]).
  """
  mode = _selection_mode(config, layer)
  if config.name == "squeezed_hierarchical":
    mode.update(coarse_centroids=layer.coarse_centroids, coarse_counts=layer.coarse_counts,
                coarse_offsets=layer.coarse_offsets, coarse_threshold=layer.coarse_threshold)
    if config.key_budget is not None:  # the fine lookup is paid from the budget
      mode["fine_centroid_cost"] = ROWS_PER_SUMMARY_VECTOR
  out, lse, kept = pallas_kernels.squeezed_decode_attention(
      q[:, 0], layer.keys, layer.values, layer.centroids, layer.counts, layer.offsets,
      window_keys=layer.window_keys, window_values=layer.window_values, own=own,
      active=query_mask[:, 0], backend=config.backend, **mode)
  if kept.coarse_clusters is None:
    summary = jnp.full(kept.num_rows.shape, layer.centroids.shape[1], jnp.float32)
  else:
    summary, _ = _hierarchical_summary(layer, kept.coarse_clusters, layer.centroids.shape[1])
  return out[:, None], lse[:, None], kept, summary


def _every_row_attention(config: MethodConfig, q: jax.Array, layer: ContextLayer,
                         own: pallas_kernels.OwnRows | None) -> tuple[jax.Array, jax.Array]:
  """Attention to every fixed-context key through the sparse kernel with all rows selected, the
  batch's queries folded so that the context is read once for all of them: at decode into extra
  query heads of each KV head (`pallas_kernels.shared_selection_attention`: each K/V row read
  once per KV head for the whole batch, the own rows merged), at prefill into one sequence of
  B x T queries.

  q: [B, T, Hq, D]; own: decode only, or None. Returns (out [B, T, Hq, D], lse [B, T, Hq]).
  """
  batch, tokens, num_heads, head_dim = q.shape
  num_kv_heads, num_keys, _ = layer.keys.shape
  every_row = pallas_kernels.Selection(
      rows=jnp.broadcast_to(jnp.arange(num_keys, dtype=jnp.int32), (1, num_kv_heads, num_keys)),
      num_rows=jnp.full((1, num_kv_heads), num_keys, jnp.int32),
      clusters=jnp.ones((1,) + layer.counts.shape, bool))
  window = {"window_keys": layer.window_keys, "window_values": layer.window_values,
            "backend": config.backend}
  if tokens > 1:
    out, lse = pallas_kernels.sparse_attention(
        q.reshape(1, batch * tokens, num_heads, head_dim), layer.keys, layer.values,
        every_row, **window)
    return out.reshape(q.shape), lse.reshape(batch, tokens, num_heads)
  out, lse = pallas_kernels.shared_selection_attention(
      q[:, 0], layer.keys, layer.values, every_row, own=own, **window)
  return out[:, None], lse[:, None]


def _baseline_mask(config: MethodConfig, q: jax.Array, layer: ContextLayer,
                   weights: jax.Array) -> tuple[jax.Array, int]:
  """(key mask [B, Hkv, S'], summary vectors per lookup) of quest, oracle_topk or streaming."""
  if config.name == "quest":
    mask = baselines.quest_mask(q, layer, weights, page_size=config.page_size,
                                key_budget=config.key_budget)
    return mask, 2 * layer.page_max.shape[1]
  if config.name == "oracle_topk":
    return baselines.oracle_topk_mask(q, layer, weights, key_budget=config.key_budget), 0
  return baselines.streaming_mask(layer, q.shape[0], sinks=config.sinks,
                                  key_budget=config.key_budget), 0


def context_attention(config: MethodConfig, q: jax.Array, layer: ContextLayer,
                      query_mask: jax.Array, own: pallas_kernels.OwnRows | None = None
                      ) -> tuple[jax.Array, jax.Array, LookupUsage]:
  """Attention of a query block over one layer's fixed context (selected rows + window).

  q: [B, T, Hq, D] post-RoPE; query_mask: [B, T] bool real queries (T = 1 at decode);
  own: the sequences' own rows (a decode token of an OWN_ROWS_METHODS method), attended too and
  merged into the result, or None.
  Returns (out [B, T, Hq, D], lse [B, T, Hq] float32, the lookup's `LookupUsage`).
  """
  batch, num_kv_heads = q.shape[0], layer.keys.shape[0]
  if own is not None and (q.shape[1] != 1 or config.name not in OWN_ROWS_METHODS):
    raise ValueError(f"own rows are for decode tokens of {OWN_ROWS_METHODS}: got "
                     f"{config.name}, {q.shape=}")
  weights = queries.query_weights(query_mask, *query_mask.shape)
  if config.name in SQUEEZED_METHODS and q.shape[1] == 1:
    out, lse, kept, summary = _squeezed_decode(config, q, layer, query_mask, own)
    rows = kept.num_rows.astype(jnp.float32)
    overflow = jnp.zeros(rows.shape, bool)
    mask = None
    if config.measure_mass:
      every_row = rows_from_clusters(
          kept.clusters, layer.counts, layer.offsets, layer.num_clustered)
      mask = _rows_mask(every_row, layer.num_clustered)
  elif config.name in SQUEEZED_METHODS:
    selection, summary, overflow = _squeezed_selection(config, q, layer, query_mask)
    out, lse = pallas_kernels.sparse_attention(
        q, layer.keys, layer.values, selection, window_keys=layer.window_keys,
        window_values=layer.window_values, backend=config.backend)
    rows = selection.num_rows.astype(jnp.float32)
    mask = _rows_mask(selection, layer.num_clustered) if config.measure_mass else None
  else:
    if config.name == "dense":
      mask, num_summary = None, 0
      out, lse = _every_row_attention(config, q, layer, own)
    else:
      mask, num_summary = _baseline_mask(config, q, layer, weights)
      clustered = baselines.masked_attention(q, layer.keys, layer.values, mask)
      window = baselines.masked_attention(q, layer.window_keys, layer.window_values, None)
      out, lse = pallas_kernels.merge_partials(*clustered, *window)
    rows = (jnp.full((batch, num_kv_heads), layer.num_clustered, jnp.float32) if mask is None
            else mask.sum(axis=-1).astype(jnp.float32))
    summary = jnp.full((batch, num_kv_heads), num_summary, jnp.float32)
    overflow = jnp.zeros((batch, num_kv_heads), bool)
    if mask is None and config.measure_mass:
      mask = jnp.ones((batch, num_kv_heads, layer.num_clustered), bool)
  mass = _captured_mass(q, layer, mask, weights) if config.measure_mass else None
  return out, lse, LookupUsage(rows=rows, summary_vectors=summary, overflow=overflow, mass=mass)


@dataclasses.dataclass(frozen=True)
class OnlineAttention:
  """The model's attention function `(q, k, v, positions, cache, layer) -> (out, cache)` for
  question tokens against a fixed context (cache: that layer's `OnlineCache`, context bound).

  Hashable, so it can be a static argument of jitted steps.
  """

  config: MethodConfig
  # Whether a decode token's own rows go to `context_attention` (a subclass that distributes the
  # context must not merge them once per shard).
  attends_own_rows_with_context: ClassVar[bool] = True

  def context_attention(self, q: jax.Array, context: ContextLayer, query_mask: jax.Array,
                        own: pallas_kernels.OwnRows | None = None
                        ) -> tuple[jax.Array, jax.Array, LookupUsage]:
    """The fixed-context part (`context_attention`); a subclass may distribute it."""
    return context_attention(self.config, q, context, query_mask, own)

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
               cache: OnlineCache, layer: int) -> tuple[jax.Array, OnlineCache]:
    """q: [B, T, Hq, D]; k, v: [B, T, Hkv, D]; positions: [B, T] (>= S) -> out [B, T, Hq, D]."""
    del layer  # The cache holds this layer's context.
    context = cache.context
    slots = positions - context.num_tokens
    kv = cache.kv.write(slots, k, v)
    query_mask = slots < cache.real_until[:, None]
    if (q.shape[1] == 1 and self.config.name in OWN_ROWS_METHODS
        and self.attends_own_rows_with_context):
      own = pallas_kernels.OwnRows(kv.keys, kv.values, slots[:, 0] + 1)
      out, _, usage = self.context_attention(q, context, query_mask, own)
    else:
      context_out, context_lse, usage = self.context_attention(q, context, query_mask)
      causal = jnp.arange(kv.capacity)[None, None, :] <= slots[:, :, None]
      own_out, own_lse = grouped_attention(q, kv.keys, kv.values, causal)
      out, _ = pallas_kernels.merge_partials(context_out.astype(jnp.float32), context_lse,
                                             own_out, own_lse)
    stats = cache.stats.add(usage, query_mask.any(axis=1))
    return out.astype(q.dtype), cache.replace(kv=kv, stats=stats)
