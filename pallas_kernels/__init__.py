"""Kernels of Squeezed Attention's online phase, with pure-jnp references.

Public entry points (one fixed context shared by a batch of B questions, one
layer at a time; K/V have no batch axis):

* `centroid_scores(q, centroids, counts)` -> sbar [B, Hkv, K] (the lookup).
* `select_clusters(scores, counts, offsets, max_rows=, threshold=|key_budget=)`
  -> `Selection` (padded per-(sequence, KV head) row list + count).
* `hierarchical_centroid_scores(...)`: the two-level lookup (XLA).
* `sparse_attention(q, keys, values, selection)` -> (out, lse).
* `merge_partials(out1, lse1, out2, lse2)`: exact log-sum-exp merge.
* `squeezed_lookup_attention(...)`: all of the above, plus the observation
  window, in one call.
* `squeezed_decode_attention(...)`: one decode step with the threshold
  selection on the GPU (flat or hierarchical lookup; no global row list, no
  row cap) -> (out, lse, `KeptClusters`): on the GPU four Pallas kernels
  (lookup pass, selection into per-chunk lists of kept rows, attention over
  them, window + own rows + merge of the partials; one more for the
  hierarchical lookup, one more for a key budget).
* `shared_selection_attention(q, keys, values, selection)`: decode attention
  of a batch sharing one selection (e.g. every row: dense attention), each
  selected row read once for the whole batch.

The decode entry points take `own=OwnRows(keys, values, lengths)`: each
sequence's own K/V rows (its question and generated tokens), attended and
merged in the same call (on the GPU inside the reduce kernel).

`backend=None` picks from `jax.default_backend()`: "gpu" (Pallas Triton
kernels) on GPUs, "tpu" (Pallas Mosaic sparse attention over whole K/V blocks;
its lookup is the XLA one) on TPUs, "xla" (pure jnp) elsewhere. The TPU kernel
is tested in the Pallas TPU interpreter only; it has never run on a TPU.
This package has no model knowledge and imports nothing from the library.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import hierarchical as hierarchical_lib
from pallas_kernels import own_rows
from pallas_kernels import queries
from pallas_kernels import references
from pallas_kernels import selection as selection_lib
from pallas_kernels import xla_fallback
from pallas_kernels.gpu import centroid_scores as gpu_scores
from pallas_kernels.gpu import decode_attention as gpu_decode
from pallas_kernels.gpu import sparse_attention as gpu_attention
from pallas_kernels.tpu import block_selection as tpu_block_selection
from pallas_kernels.tpu import sparse_attention as tpu_attention
from pallas_kernels.block_sizes import AttentionBlockSizes
from pallas_kernels.block_sizes import DecodeBlockSizes
from pallas_kernels.block_sizes import LookupBlockSizes
from pallas_kernels.hierarchical import hierarchical_centroid_scores
from pallas_kernels.merge import merge_partials
from pallas_kernels.merge import merge_stacked
from pallas_kernels.own_rows import OwnRows
from pallas_kernels.selection import KeptClusters
from pallas_kernels.selection import Selection
from pallas_kernels.selection import select_clusters

BACKENDS = ("xla", "gpu", "tpu")
# Rows per K/V block read by the TPU kernel (a (8, 128)-tiling multiple).
TPU_BLOCK_ROWS = 128

_xla_centroid_scores = jax.jit(references.centroid_scores,
                               static_argnames="sm_scale")


def resolve_backend(backend: str | None) -> str:
  """The backend to run: `backend`, or the platform's default if None."""
  if backend is None:
    platform = jax.default_backend()
    return {"gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}.get(platform, "xla")
  if backend not in BACKENDS:
    raise ValueError(f"{backend=} must be one of {BACKENDS}")
  return backend


def centroid_scores(q: jax.Array, centroids: jax.Array, counts: jax.Array, *,
                    query_mask: jax.Array | None = None,
                    sm_scale: float | None = None, backend: str | None = None,
                    block_sizes: LookupBlockSizes | None = None,
                    interpret: bool = False) -> jax.Array:
  """Counts-weighted centroid scores of a query block.

  Args:
    q: [B, Hq, D] (decode) or [B, T, Hq, D] (prefill), post-RoPE.
    centroids: [Hkv, K, D] (float32, or bfloat16 to halve the lookup's reads).
    counts: [Hkv, K] int keys per cluster.
    query_mask: [B, T] bool, real prefill tokens; None = all.
    sm_scale: softmax scale, 1 / sqrt(D) if None.
    backend: None (from the platform), "xla", "gpu" or "tpu" (= "xla").
    block_sizes: GPU tiles (None = defaults).
    interpret: run GPU kernels in the Pallas interpreter.

  Returns:
    sbar [B, Hkv, K] float32 (max over the GQA group of the mean over queries
    of s_j; 0 for empty clusters).
  """
  if resolve_backend(backend) == "gpu":
    return gpu_scores.centroid_scores(q, centroids, counts,
                                      query_mask=query_mask, sm_scale=sm_scale,
                                      block_sizes=block_sizes,
                                      interpret=interpret)
  return _xla_centroid_scores(q, centroids, counts, query_mask=query_mask,
                              sm_scale=sm_scale)


def sparse_attention(q: jax.Array, keys: jax.Array, values: jax.Array,
                     selection: Selection, *,
                     window_keys: jax.Array | None = None,
                     window_values: jax.Array | None = None,
                     sm_scale: float | None = None, backend: str | None = None,
                     block_sizes: AttentionBlockSizes | None = None,
                     interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """Exact softmax attention over the fixed context: selected rows + window.

  Covers the selected rows of the clustered part and, if given, the whole
  observation window (the GPU kernel reads it in the same call). Merge the
  result with the dense user-input / generated-token part through
  `merge_partials`.

  Args:
    q: [B, Hq, D] (decode) or [B, T, Hq, D] (prefill).
    keys, values: [Hkv, S', D] cluster-contiguous.
    selection: from `select_clusters`, [B, Hkv, R] rows.
    window_keys, window_values: [Hkv, W, D] observation window, or None.
    sm_scale: softmax scale, 1 / sqrt(D) if None.
    backend: None (from the platform), "xla", "gpu" or "tpu".
    block_sizes: GPU tiles (None = decode / prefill defaults).
    interpret: run the GPU / TPU kernels in the Pallas interpreter.

  Returns:
    out: like q, in q.dtype (0 for an empty selection).
    lse: [B, (T,) Hq] float32 (-inf for an empty selection).
  """
  resolved = resolve_backend(backend)
  if resolved == "gpu":
    return gpu_attention.sparse_attention(
        q, keys, values, selection, window_keys=window_keys,
        window_values=window_values, sm_scale=sm_scale,
        block_sizes=block_sizes, interpret=interpret)
  if resolved == "tpu":
    blocks = tpu_block_selection.block_selection(
        selection_lib.key_mask(selection, keys.shape[1]),
        block_rows=TPU_BLOCK_ROWS)
    out, lse = tpu_attention.sparse_attention(q, keys, values, blocks,
                                              sm_scale=sm_scale,
                                              interpret=interpret)
    if window_keys is None:
      return out, lse
    window_out, window_lse = references.attention(
        q, window_keys, window_values, sm_scale=sm_scale)
    return merge_partials(out, lse, window_out, window_lse)
  return xla_fallback.sparse_attention(
      q, keys, values, selection, window_keys=window_keys,
      window_values=window_values, sm_scale=sm_scale)


def squeezed_lookup_attention(
    q: jax.Array, keys: jax.Array, values: jax.Array, centroids: jax.Array,
    counts: jax.Array, offsets: jax.Array, *, max_rows: int,
    threshold: float | jax.Array | None = None, key_budget: int | None = None,
    window_keys: jax.Array | None = None,
    window_values: jax.Array | None = None,
    query_mask: jax.Array | None = None, sm_scale: float | None = None,
    backend: str | None = None,
    interpret: bool = False) -> tuple[jax.Array, jax.Array, Selection]:
  """Lookup, selection and attention over the fixed context of one layer.

  The observation window (W rows, every query sees all of them) is attended
  in the same sparse call. The result merges
  exactly with the caller's dense attention over the user input and generated
  tokens through `merge_partials`.

  Args:
    q: [B, Hq, D] (decode) or [B, T, Hq, D] (prefill), post-RoPE.
    keys, values: [Hkv, S', D] cluster-contiguous clustered part.
    centroids, counts, offsets: [Hkv, K, D], [Hkv, K], [Hkv, K + 1].
    max_rows: static row budget of the selection.
    threshold: keep clusters with sbar > threshold; or
    key_budget: keep the top clusters up to this many keys.
    window_keys, window_values: [Hkv, W, D] observation window, or None.
    query_mask: [B, T] bool real prefill tokens (for the lookup's mean).
    sm_scale: softmax scale, 1 / sqrt(D) if None.
    backend: None (from the platform), "xla", "gpu" or "tpu".
    interpret: run the GPU / TPU kernels in the Pallas interpreter.

  Returns:
    (out like q, lse [B, (T,) Hq] float32, the Selection).
  """
  scores = centroid_scores(q, centroids, counts, query_mask=query_mask,
                           sm_scale=sm_scale, backend=backend,
                           interpret=interpret)
  selection = select_clusters(scores, counts, offsets, max_rows=max_rows,
                              threshold=threshold, key_budget=key_budget)
  out, lse = sparse_attention(q, keys, values, selection,
                              window_keys=window_keys,
                              window_values=window_values, sm_scale=sm_scale,
                              backend=backend, interpret=interpret)
  return out, lse, selection


def squeezed_decode_attention(
    q: jax.Array, keys: jax.Array, values: jax.Array, centroids: jax.Array,
    counts: jax.Array, offsets: jax.Array, *,
    threshold: float | jax.Array | None = None,
    key_budget: int | jax.Array | None = None, fine_centroid_cost: float = 0.0,
    active: jax.Array | None = None,
    window_keys: jax.Array | None = None,
    window_values: jax.Array | None = None,
    own: OwnRows | None = None,
    coarse_centroids: jax.Array | None = None,
    coarse_counts: jax.Array | None = None,
    coarse_offsets: jax.Array | None = None,
    coarse_threshold: float | jax.Array | None = None,
    sm_scale: float | None = None, backend: str | None = None,
    block_sizes: DecodeBlockSizes | None = None,
    interpret: bool = False) -> tuple[jax.Array, jax.Array, KeptClusters]:
  """One decode step over the fixed context: lookup, selection, attention.

  Every kept cluster is read (no `max_rows` cap, unlike
  `squeezed_lookup_attention`). With a key budget, the top clusters within it
  are kept through per-(sequence, KV head) thresholds
  (`selection.budget_thresholds`; on the GPU found without a sort by
  `gpu/budget_cut.py`). With the coarse level given, the
  lookup is hierarchical (`references.hierarchical_centroid_scores`, every
  candidate scored: no `max_fine_clusters` cap). On the GPU (B x G <=
  `block_sizes.lookup.single_pass_max_rows`) a selection kernel lists
  each chunk of clusters' kept rows for the attention kernel
  (`gpu/decode_attention.py`); elsewhere it is the row-list path with R = S'.

  Args:
    q: [B, Hq, D] one token per sequence, post-RoPE.
    keys, values: [Hkv, S', D] cluster-contiguous clustered part.
    centroids, counts, offsets: [Hkv, K, D], [Hkv, K], [Hkv, K + 1].
    threshold: keep fine clusters with sbar > threshold; or
    key_budget: keep the top fine clusters up to this many keys per
      (sequence, KV head): an int or [B, Hkv].
    fine_centroid_cost: with a key budget and the coarse level: keys of the
      budget charged per fine centroid scored (0.5 counts a centroid as half
      a K/V row, as `Answers.kv_budget` does), so that the query-dependent
      fine lookup is paid from the budget
      (`hierarchical.key_budget_after_fine_lookup`).
    active: [B] bool sequences whose query is real, or None (all); the others
      keep no cluster (their partial is the window's alone).
    window_keys, window_values: [Hkv, W, D] observation window, or None.
    own: each sequence's own rows (`OwnRows`: keys, values [B, T, Hkv, D],
      lengths [B]), merged into the result, or None.
    coarse_centroids, coarse_counts, coarse_offsets: [Hkv, Kc, D], [Hkv, Kc],
      [Hkv, Kc + 1] coarse level, or None (flat lookup).
    coarse_threshold: keep coarse clusters with sbar > this (hierarchical).
    sm_scale: softmax scale, 1 / sqrt(D) if None.
    backend: None (from the platform), "xla", "gpu" or "tpu".
    block_sizes: GPU tiles (None = defaults).
    interpret: run the GPU / TPU kernels in the Pallas interpreter.

  Returns:
    (out [B, Hq, D] in q.dtype, lse [B, Hq] float32, `KeptClusters`).
  """
  if not queries.is_decode(q):
    raise ValueError(f"{q.shape=} must be decode queries [B, Hq, D]")
  selection_lib.check_one_mode(threshold, key_budget)
  coarse = (coarse_centroids, coarse_counts, coarse_offsets, coarse_threshold)
  hierarchical = coarse_centroids is not None
  if any((level is None) == hierarchical for level in coarse):
    raise ValueError("give all or none of coarse_centroids, coarse_counts, "
                     "coarse_offsets and coarse_threshold")
  if fine_centroid_cost and not (hierarchical and key_budget is not None):
    raise ValueError(f"{fine_centroid_cost=} needs a key_budget and the "
                     "coarse level (it charges the fine lookup to the budget)")
  if own is not None:
    own_rows.check(own, q, keys.shape[0])
  resolved = resolve_backend(backend)
  block_sizes = block_sizes or DecodeBlockSizes()
  query_rows = q.shape[0] * q.shape[1] // keys.shape[0]  # B x G
  if (resolved == "gpu"
      and query_rows <= block_sizes.lookup.single_pass_max_rows):
    out, lse, kept, num_rows, kept_coarse = (
        gpu_decode.squeezed_decode_attention(
            q, keys, values, centroids, counts, offsets, threshold,
            key_budget=key_budget, fine_centroid_cost=fine_centroid_cost,
            active=active, window_keys=window_keys,
            window_values=window_values, own=own,
            coarse_centroids=coarse_centroids, coarse_counts=coarse_counts,
            coarse_offsets=coarse_offsets, coarse_threshold=coarse_threshold,
            sm_scale=sm_scale, block_sizes=block_sizes, interpret=interpret))
    return out, lse, KeptClusters(kept, num_rows, kept_coarse)
  kept_coarse = None
  if hierarchical:
    scores, kept_coarse = hierarchical_centroid_scores(
        q, centroids, counts, coarse_centroids, coarse_counts, coarse_offsets,
        coarse_threshold=coarse_threshold,
        max_fine_clusters=centroids.shape[1], sm_scale=sm_scale)
    if key_budget is not None:
      key_budget = hierarchical_lib.key_budget_after_fine_lookup(
          key_budget, kept_coarse, coarse_offsets, fine_centroid_cost)
  else:
    scores = centroid_scores(q, centroids, counts, sm_scale=sm_scale,
                             backend=resolved, interpret=interpret)
  clusters = selection_lib.kept_clusters(scores, counts, threshold=threshold,
                                         key_budget=key_budget)
  if active is not None:
    clusters &= active[:, None, None]
  selection = selection_lib.rows_from_clusters(clusters, counts, offsets,
                                               keys.shape[1])
  out, lse = sparse_attention(q, keys, values, selection,
                              window_keys=window_keys,
                              window_values=window_values, sm_scale=sm_scale,
                              backend=resolved, interpret=interpret)
  out, lse = own_rows.merge_with(q, out, lse, own, sm_scale)
  return out, lse, KeptClusters(selection.clusters, selection.num_rows,
                                kept_coarse)


def shared_selection_attention(
    q: jax.Array, keys: jax.Array, values: jax.Array, selection: Selection, *,
    window_keys: jax.Array | None = None,
    window_values: jax.Array | None = None, own: OwnRows | None = None,
    sm_scale: float | None = None, backend: str | None = None,
    block_sizes: AttentionBlockSizes | None = None,
    interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """Decode attention of a batch whose sequences share one selection.

  The B queries are folded into the query heads of each KV head (one
  sequence of B x Hq heads), so each selected K/V row is read once for the
  whole batch, not once per sequence: dense attention at decode is this with
  every row selected. Each sequence still attends its own rows (`own`).

  Args:
    q: [B, Hq, D] one token per sequence.
    keys, values: [Hkv, S', D].
    selection: [1, Hkv, R] rows, shared by the batch.
    window_keys, window_values: [Hkv, W, D] observation window, or None.
    own: each sequence's own rows, merged into the result, or None.
    sm_scale: softmax scale, 1 / sqrt(D) if None.
    backend: None (from the platform), "xla", "gpu" or "tpu".
    block_sizes: GPU tiles (None = `AttentionBlockSizes.for_decode()`).
    interpret: run the GPU / TPU kernels in the Pallas interpreter.

  Returns:
    (out [B, Hq, D] in q.dtype, lse [B, Hq] float32).
  """
  if not queries.is_decode(q):
    raise ValueError(f"{q.shape=} must be decode queries [B, Hq, D]")
  if selection.rows.shape[0] != 1:
    raise ValueError(f"{selection.rows.shape=} must have batch 1 (one "
                     "selection shared by the batch)")
  batch, num_heads, head_dim = q.shape
  num_kv_heads = keys.shape[0]
  group = num_heads // num_kv_heads
  if own is not None:
    own_rows.check(own, q, num_kv_heads)
  by_head = jnp.swapaxes(queries.group_heads(q[:, None], num_kv_heads)[:, 0],
                         0, 1)  # [Hkv, B, G, D]
  folded = by_head.reshape(1, num_kv_heads * batch * group, head_dim)
  resolved = resolve_backend(backend)
  if resolved == "gpu":
    out, lse = gpu_attention.sparse_attention(
        folded, keys, values, selection, window_keys=window_keys,
        window_values=window_values, own=own, own_rows_per_sequence=group,
        sm_scale=sm_scale, block_sizes=block_sizes, interpret=interpret)
  else:
    out, lse = sparse_attention(folded, keys, values, selection,
                                window_keys=window_keys,
                                window_values=window_values,
                                sm_scale=sm_scale, backend=resolved,
                                interpret=interpret)
  unfold = lambda x: jnp.swapaxes(
      x.reshape(num_kv_heads, batch, group, *x.shape[2:]), 0, 1).reshape(
          batch, num_heads, *x.shape[2:])
  out, lse = unfold(out), unfold(lse)
  if resolved != "gpu":
    out, lse = own_rows.merge_with(q, out, lse, own, sm_scale)
  return out, lse
