"""Context-parallel squeezed attention: lookup, selection and sparse attention per shard of the
fixed context, merged exactly across the `context` mesh axis, inside `jax.shard_map`.

Each `context` device holds whole clusters of every head (`context_layout.ContextShards`), each
`heads` device a block of KV heads (with their query heads), each `data` device a block of
questions. Per device:

  1. lookup: logits q.C_j / sqrt(D) of its clusters; the normaliser
     log sum_m N_m exp(q.C_m / sqrt(D)) over *all* clusters of the head is the log-sum-exp
     all-reduce of the per-device ones over `context`, so s_j(q), sbar_j and the test
     sbar_j > tau are those of one device (up to float rounding of the normaliser).
  2. selection: threshold mode keeps its clusters above tau; budget mode all-gathers the
     per-cluster scores ([B, Hkv, K], small) and keeps the same top clusters as one device.
     The row cap R (`MethodConfig.max_rows`) applies to the global row list in cluster order:
     device p keeps the first R - (rows wanted by devices < p) of its rows, as one device would.
  3. sparse attention over its selected rows (`pallas_kernels.sparse_attention`, any backend),
     then the exact log-sum-exp merge of the partials across `context` (`lse_all_reduce`:
     out = sum_p exp(lse_p - lse) out_p, lse = log sum_p exp(lse_p)).
  4. the observation window (replicated over `context`) is attended once after that merge.

Only the flat `squeezed` method (threshold or budget) and `dense` are context-parallel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

import pallas_kernels
from pallas_kernels import queries, references
from pallas_kernels.selection import Selection, clusters_within_budget, rows_from_clusters
from squeezed_jax.attention_methods import MethodConfig, OnlineAttention
from squeezed_jax.kv_budget import LookupUsage
from squeezed_jax.sharding.context_layout import (CLUSTERED_SPEC, PER_CLUSTER_SPEC, WINDOW_SPEC,
                                                  ContextShards)
from squeezed_jax.sharding.mesh import CONTEXT, DATA, HEADS

CONTEXT_PARALLEL_METHODS = ("squeezed", "dense")
QUERY_SPEC = PartitionSpec(DATA, None, HEADS, None)  # q, out: [B, T, Hq, D]
LSE_SPEC = PartitionSpec(DATA, None, HEADS)          # lse: [B, T, Hq]
PER_HEAD_SPEC = PartitionSpec(DATA, HEADS)           # usage: [B, Hkv]


def shard_map(f, mesh: jax.sharding.Mesh, in_specs, out_specs):
  """`jax.shard_map` (jax >= 0.7), else `jax.experimental.shard_map.shard_map`; replication
  checks off (Pallas kernels inside do not declare them)."""
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map as experimental_shard_map
  return experimental_shard_map(f, mesh, in_specs=in_specs, out_specs=out_specs,
                                check_rep=False)


def lse_all_reduce(lse: jax.Array, axis_name: str) -> jax.Array:
  """log sum over the devices of `axis_name` of exp(lse) (-inf where all are -inf)."""
  top = jax.lax.pmax(lse, axis_name)
  safe_top = jnp.where(jnp.isfinite(top), top, 0.0)
  return safe_top + jnp.log(jax.lax.psum(jnp.exp(lse - safe_top), axis_name))


def merge_across(out: jax.Array, lse: jax.Array, axis_name: str) -> tuple[jax.Array, jax.Array]:
  """Exact log-sum-exp merge of attention partials over disjoint key sets, one per device of
  `axis_name` (`pallas_kernels.merge_stacked` across devices).

  out: [..., D]; lse: out.shape[:-1] float32 (-inf: empty set). Returns (out float32, lse).
  """
  total = lse_all_reduce(lse, axis_name)
  weight = jnp.where(jnp.isfinite(lse), jnp.exp(lse - total), 0.0)
  return jax.lax.psum(weight[..., None] * out.astype(jnp.float32), axis_name), total


def _scores(q: jax.Array, centroids: jax.Array, counts: jax.Array,
            weights: jax.Array) -> jax.Array:
  """sbar [B, Hkv, Kp] of this device's clusters, normalised over every device's clusters.

  q: [B, T, Hq, D]; centroids: [Hkv, Kp, D]; counts: [Hkv, Kp]; weights: [B, T].
  """
  logits = references.centroid_logits(q, centroids)                  # [B, Hkv, G, T, Kp]
  log_n = references.log_counts(counts)[None, :, None, None, :]
  normaliser = lse_all_reduce(jax.nn.logsumexp(logits + log_n, axis=-1), CONTEXT)
  probs = jnp.where(jnp.isfinite(log_n), jnp.exp(logits - normaliser[..., None]), 0.0)
  return references.block_scores(probs, weights)


def _kept_clusters(config: MethodConfig, q: jax.Array, centroids: jax.Array, counts: jax.Array,
                   query_mask: jax.Array, threshold: tuple[jax.Array, ...]) -> jax.Array:
  """[B, Hkv, Kp] bool, this device's clusters that one device would keep."""
  batch = q.shape[0]
  if config.name == "dense":
    return jnp.broadcast_to(counts[None] > 0, (batch,) + counts.shape)
  scores = _scores(q, centroids, counts, queries.query_weights(query_mask, *query_mask.shape))
  if config.key_budget is None:
    return scores > threshold[0]
  every_score = jax.lax.all_gather(scores, CONTEXT, axis=2, tiled=True)
  every_count = jax.lax.all_gather(counts, CONTEXT, axis=1, tiled=True)
  fits = clusters_within_budget(every_score, every_count, config.key_budget)
  per_device = counts.shape[1]
  return jax.lax.dynamic_slice_in_dim(fits, jax.lax.axis_index(CONTEXT) * per_device,
                                      per_device, axis=2)


def _capped_selection(kept: jax.Array, counts: jax.Array, offsets: jax.Array, max_rows: int,
                      rows_per_device: int) -> tuple[Selection, jax.Array]:
  """This device's part of the global row list capped at `max_rows` (one device's truncation:
  the first `max_rows` rows in cluster order, device after device).

  kept: [B, Hkv, Kp]; counts: [Hkv, Kp]; offsets: [Hkv, Kp + 1] group-relative.
  Returns (Selection of local rows, rows wanted over all devices [B, Hkv] int32).
  """
  selection = rows_from_clusters(kept, counts, offsets, min(max_rows, rows_per_device))
  wanted = jnp.where(selection.clusters, counts[None], 0).sum(axis=-1).astype(jnp.int32)
  every = jax.lax.all_gather(wanted, CONTEXT)                          # [P, B, Hkv]
  earlier = jnp.arange(every.shape[0])[:, None, None] < jax.lax.axis_index(CONTEXT)
  room = max_rows - jnp.where(earlier, every, 0).sum(axis=0)
  num_rows = jnp.minimum(jnp.maximum(room, 0), selection.num_rows)
  rows = jnp.where(jnp.arange(selection.max_rows) < num_rows[..., None], selection.rows, 0)
  return Selection(rows=rows, num_rows=num_rows, clusters=selection.clusters), every.sum(axis=0)


def _max_rows(config: MethodConfig, num_clustered: int, decode: bool) -> int:
  """R, the global row cap: `config.max_rows` (squeezed prefill) or every row (dense, and a
  decode token, which reads every kept cluster as `attention_methods` does on one device)."""
  return num_clustered if config.name == "dense" or decode else config.max_rows


def _device_attention(config: MethodConfig, num_clustered: int, q: jax.Array,
                      query_mask: jax.Array, keys: jax.Array, values: jax.Array,
                      window_keys: jax.Array, window_values: jax.Array, centroids: jax.Array,
                      counts: jax.Array, offsets: jax.Array, *threshold: jax.Array):
  """The per-device body of `sharded_context_attention` (local blocks of every argument).

  q: [B, T, Hq, D]; query_mask: [B, T]; keys, values: [Hkv, R, D]; window_*: [Hkv, W, D];
  centroids: [Hkv, Kp, D]; counts: [Hkv, Kp]; offsets: [Hkv, Kp + 1]; threshold: () or (tau,).
  Returns (out [B, T, Hq, D] float32, lse [B, T, Hq], rows [B, Hkv] f32, overflow [B, Hkv]).
  """
  decode = q.shape[1] == 1  # the kernels' decode layout [B, Hq, D], as context_attention
  kept = _kept_clusters(config, q, centroids, counts, query_mask, threshold)
  max_rows = _max_rows(config, num_clustered, decode)
  selection, wanted = _capped_selection(kept, counts, offsets, max_rows, keys.shape[1])
  out, lse = pallas_kernels.sparse_attention(q[:, 0] if decode else q, keys, values, selection,
                                             backend=config.backend)
  if decode:
    out, lse = out[:, None], lse[:, None]
  out, lse = merge_across(out, lse, CONTEXT)
  window_out, window_lse = references.attention(q, window_keys, window_values)
  out, lse = pallas_kernels.merge_partials(out, lse, window_out, window_lse)
  rows = jax.lax.psum(selection.num_rows, CONTEXT).astype(jnp.float32)
  return out, lse, rows, wanted > max_rows


def check_shardable(config: MethodConfig, q: jax.Array, layer: ContextShards,
                    mesh: jax.sharding.Mesh) -> None:
  """Raises ValueError when `config`, the query block or the mesh cannot run context-parallel."""
  if config.name not in CONTEXT_PARALLEL_METHODS:
    raise ValueError(f"method {config.name!r} is not context-parallel; use one of "
                     f"{CONTEXT_PARALLEL_METHODS}")
  if config.measure_mass:
    raise ValueError("measure_mass is not supported by the context-parallel attention")
  if config.name == "squeezed" and config.key_budget is None and layer.threshold is None:
    raise ValueError("threshold mode needs ContextShards with a threshold "
                     "(context_parallel_layers(..., threshold=tau))")
  batch, num_kv_heads = q.shape[0], layer.keys.shape[0]
  if batch % mesh.shape[DATA]:
    raise ValueError(f"mesh axis data={mesh.shape[DATA]} must divide the {batch=}")
  if num_kv_heads % mesh.shape[HEADS]:
    raise ValueError(f"mesh axis heads={mesh.shape[HEADS]} must divide {num_kv_heads=}")
  if layer.keys.shape[1] % mesh.shape[CONTEXT]:
    raise ValueError(f"{layer.keys.shape=} is not laid out for mesh axis "
                     f"context={mesh.shape[CONTEXT]} (use context_parallel_layers)")


def sharded_context_attention(config: MethodConfig, q: jax.Array, layer: ContextShards,
                              query_mask: jax.Array, mesh: jax.sharding.Mesh
                              ) -> tuple[jax.Array, jax.Array, LookupUsage]:
  """`attention_methods.context_attention` over a context-parallel layer, on `mesh`.

  q: [B, T, Hq, D] post-RoPE; query_mask: [B, T] bool real queries; layer: from
  `context_parallel_layers` for this mesh. B is split over `data`, heads over `heads`, the
  clusters over `context`. Returns (out [B, T, Hq, D] float32, lse [B, T, Hq] float32,
  `LookupUsage` with rows / summary vectors / overflow [B, Hkv] and mass None).
  """
  check_shardable(config, q, layer, mesh)
  threshold = ((layer.threshold,) if config.name == "squeezed" and config.key_budget is None
               else ())
  body = functools.partial(_device_attention, config, layer.num_clustered)
  in_specs = (QUERY_SPEC, PartitionSpec(DATA, None), CLUSTERED_SPEC, CLUSTERED_SPEC,
              WINDOW_SPEC, WINDOW_SPEC, CLUSTERED_SPEC, PER_CLUSTER_SPEC, PER_CLUSTER_SPEC
              ) + (PartitionSpec(),) * len(threshold)
  out_specs = (QUERY_SPEC, LSE_SPEC, PER_HEAD_SPEC, PER_HEAD_SPEC)
  out, lse, rows, overflow = shard_map(body, mesh, in_specs, out_specs)(
      q, query_mask, layer.keys, layer.values, layer.window_keys, layer.window_values,
      layer.centroids, layer.counts, layer.offsets, *threshold)
  summary = layer.num_clusters if config.name == "squeezed" else 0
  return out, lse, LookupUsage(rows=rows, summary_vectors=jnp.full(rows.shape, summary,
                                                                   jnp.float32),
                               overflow=overflow, mass=None)


@dataclasses.dataclass(frozen=True)
class ShardedOnlineAttention(OnlineAttention):
  """`attention_methods.OnlineAttention` with the fixed-context part context-parallel on
  `mesh` (the cache's bound context is a `ContextShards`). The question's own dense part runs
  under jit's automatic sharding of the caches (`rules.shard_caches`). Hashable (static
  argument of the jitted steps of `online`).
  """

  mesh: jax.sharding.Mesh
  # Each shard's partial is merged across the mesh: the own rows are attended once, after.
  attends_own_rows_with_context = False

  def context_attention(self, q: jax.Array, context, query_mask: jax.Array):
    """`sharded_context_attention` on `mesh`."""
    return sharded_context_attention(self.config, q, context, query_mask, self.mesh)
