"""Decode attention with the threshold selection done on the GPU, Pallas GPU.

Decode re-selects clusters at every token and layer, so what happens between
the lookup and the attention is paid per token: the row-list path
(`select_clusters`, then `sparse_attention`) spends 12 small XLA kernels
(~35 us at S = 128K, batch 1: benchmarks/RESULTS.md) on the normaliser, the
comparison and the compaction (cumulative sums and a scatter over the R-slot
list). Here four Pallas kernels (five with the hierarchical lookup) do the
lookup, the selection, the attention and its reduce, after XLA's padding of
q (one more in the key-budget mode: `budget_cut` turns the budget into each
(sequence, KV head)'s threshold, by bisection instead of a sort):

1. the lookup's single pass (`centroid_scores.single_pass_logits`): logits
   q.C [Hkv, M, K] and per-split log-sum-exps (or, hierarchical, the coarse
   pass and `hierarchical_scores.fine_logits`);
2. the selection, one program per (sequence x KV head, chunk of
   `block_clusters` consecutive clusters): it finishes the normaliser from
   the lse parts, computes s_j = exp(logit_j - lse) for the G query heads of
   its sequence, keeps cluster j iff max_g s_j > tau (and N_j > 0), and
   writes the chunk's kept clusters as a list of pieces of up to
   `piece_rows` consecutive rows (a cumulative sum gives each cluster its
   entries; one step per piece of the largest kept cluster writes them all:
   no sort, no global compaction). Each chunk writes its own segment of the
   list, so the chunks need no coordination;
3. the attention, one program per (sequence x KV head, chunk): it walks its
   chunk's pieces, gathers their rows and keeps an online softmax. Chunks of
   heads that keep many rows are simply longer programs, and the grid
   (thousands of programs) balances them. The sequence's own rows (its
   question and generated tokens, if given) are more programs of the same
   grid, `own_split_rows` contiguous rows each: in the reduce they took 9 us
   per layer at batch 1 in 32 programs (benchmarks/RESULTS.md, ninth pass);
4. `decode_reduce`: the observation window and the log-sum-exp merge of the
   partials, one program per query row.

A first version did the selection inside the attention program and mapped
each slot of a step to its row by comparing it with every cluster of the
chunk. That made the attention issue-bound at 64% of the copy bandwidth,
and at batch 8 the slower one (benchmarks/RESULTS.md, sixth pass).

Unlike the row-list path there is no row cap: every kept cluster is read.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels import block_sizes as block_sizes_lib
from pallas_kernels import hierarchical
from pallas_kernels import own_rows
from pallas_kernels import queries
from pallas_kernels import selection as selection_lib
from pallas_kernels.gpu import budget_cut
from pallas_kernels.gpu import centroid_scores as gpu_scores
from pallas_kernels.gpu import decode_reduce
from pallas_kernels.gpu import flash_blocks
from pallas_kernels.gpu import hierarchical_scores
from pallas_kernels.gpu import pair_scalars


def _piece_list_start(offsets_ref, chunk: jnp.ndarray, block_clusters: int,
                      piece_rows: int) -> jnp.ndarray:
  """First entry of a chunk's segment of its pair's piece list.

  A kept cluster of N rows takes ceil(N / piece_rows) entries (packed as in
  `flash_blocks.attend_listed`), so a chunk of C clusters with R rows in all
  has at most R / piece_rows + C of them: segments starting at
  offsets[first] // piece_rows + first + chunk (first = chunk * C) never
  overlap, and the list needs S' // piece_rows + K + num_chunks entries.
  """
  first = chunk * block_clusters
  return offsets_ref[first] // piece_rows + first + chunk


def _select_kernel(threshold_ref, *refs, num_kv_heads: int, group: int,
                   num_lookup_parts: int, num_clusters: int, tile_rows: int,
                   piece_rows: int, has_active: bool):
  """One (sequence x KV head, chunk) program: its kept clusters, as pieces.

  Refs: threshold_ref [] f32 (this sequence x KV head's tau); if has_active,
  active_ref [] int32 (0: the sequence keeps nothing); lse_parts_ref
  [Sp, Mp]; logits_ref [Mp, Kp] (rows m = b * G + g of this KV head);
  counts_ref [K]; offsets_ref [K + 1]. Outputs: pieces_ref [E] int32, of
  which this program writes its chunk's segment (`_piece_list_start`): the
  kept clusters in order, each as pieces of up to piece_rows rows;
  chunk_rows_ref, chunk_pieces_ref [] int32 (kept rows, pieces written);
  kept_ref [C] int32 (1 = kept).
  """
  active_ref = refs[0] if has_active else None
  (lse_parts_ref, logits_ref, counts_ref, offsets_ref, pieces_ref,
   chunk_rows_ref, chunk_pieces_ref, kept_ref) = refs[has_active:]
  threshold = threshold_ref[()]
  if has_active:
    threshold = jnp.where(active_ref[()] != 0, threshold, jnp.inf)
  block_clusters = kept_ref.shape[0]
  first = pl.program_id(1) * block_clusters
  in_range = first + jnp.arange(block_clusters) < num_clusters
  scores = gpu_scores.group_max_probs(
      lse_parts_ref, logits_ref,
      first_row=(pl.program_id(0) // num_kv_heads) * group, group=group,
      tile_rows=tile_rows, num_lookup_parts=num_lookup_parts,
      first_cluster=first, in_range=in_range)
  chunk = pl.ds(first, block_clusters)
  counts = plgpu.load(counts_ref.at[chunk], mask=in_range, other=0)
  keep = (scores > threshold) & (counts > 0)
  sizes = jnp.where(keep, counts, 0)
  pieces = (sizes + piece_rows - 1) // piece_rows
  first_rows = plgpu.load(offsets_ref.at[chunk], mask=in_range, other=0)
  first_entries = (_piece_list_start(offsets_ref, pl.program_id(1),
                                     block_clusters, piece_rows)
                   + jnp.cumsum(pieces) - pieces)

  def write(piece, carry):
    rows = jnp.minimum(sizes - piece * piece_rows, piece_rows)
    plgpu.store(pieces_ref.at[first_entries + piece],
                (first_rows + piece * piece_rows) * piece_rows + rows - 1,
                mask=piece < pieces)
    return carry

  lax.fori_loop(0, pieces.max(), write, 0)
  chunk_rows_ref[...] = sizes.sum()
  chunk_pieces_ref[...] = pieces.sum()
  kept_ref[...] = keep.astype(jnp.int32)


def _attend_kernel(chunk_pieces_ref, offsets_ref, pieces_ref, q_ref, k_ref,
                   v_ref, *refs, sm_scale: float, num_kv_heads: int,
                   group: int, block_clusters: int, block_rows: int,
                   piece_rows: int, num_chunks: int, own_split_rows: int):
  """One (sequence x KV head, chunk or own split) program: attention over its
  chunk's kept rows or, for programs past the num_chunks chunks (given own
  rows), over one split of own_split_rows of the sequence's own rows.

  Both loops are always there, one of them with no steps: a branch between
  them would keep the gather loop from being software-pipelined.

  Refs: chunk_pieces_ref [] int32 and pieces_ref [E] from `_select_kernel`;
  offsets_ref [K + 1]; q_ref [Mp, D]; k_ref, v_ref [S', D]; then, with own
  rows, own_length_ref [] int32 and own_k_ref, own_v_ref [T, D]. Outputs:
  out_ref [Gq, D] f32 and lse_ref [Gq] (the partial for the G query heads,
  padded to Gq rows).
  """
  *own_refs, out_ref, lse_ref = refs
  q_block, head_dim = out_ref.shape
  real = jnp.arange(q_block) < group
  first_row = (pl.program_id(0) // num_kv_heads) * group
  q = plgpu.load(q_ref.at[pl.ds(first_row, q_block)], mask=real[:, None],
                 other=0.0).astype(k_ref.dtype)
  split = pl.program_id(1) - num_chunks  # >= 0: an own-rows program
  start = _piece_list_start(offsets_ref, jnp.minimum(pl.program_id(1),
                                                     num_chunks - 1),
                            block_clusters, piece_rows)
  stop = jnp.where(split < 0, start + chunk_pieces_ref[()], start)
  carry = flash_blocks.attend_listed(
      q, pieces_ref, k_ref, v_ref, start, stop, block_rows,
      flash_blocks.empty_carry(q_block, head_dim), sm_scale,
      piece_rows=piece_rows)
  if own_refs:
    own_length_ref, own_k_ref, own_v_ref = own_refs
    first = jnp.maximum(split, 0) * own_split_rows
    own_stop = jnp.where(
        split < 0, first,
        jnp.minimum(first + own_split_rows, own_length_ref[()]))
    carry = flash_blocks.attend_contiguous(
        q, own_k_ref, own_v_ref, first, own_stop, block_rows, carry, sm_scale)
  flash_blocks.store_partial(out_ref, lse_ref, carry, real)


def fused_selection_attention(
    q_rows: jax.Array, logits: jax.Array, lse_parts: jax.Array,
    num_lookup_parts: int, keys: jax.Array, values: jax.Array,
    counts: jax.Array, offsets: jax.Array, threshold: float | jax.Array, *,
    active: jax.Array | None, batch: int, group: int,
    window_keys: jax.Array | None,
    window_values: jax.Array | None, own: own_rows.OwnRows | None,
    sm_scale: float, out_dtype: jnp.dtype,
    block_sizes: block_sizes_lib.DecodeBlockSizes, interpret: bool
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Selection + attention partials of every chunk, reduced with the window
  and the own rows.

  Args:
    q_rows: [Hkv, Mp, D] decode query rows (m = b * G + g).
    logits: [Hkv, Mp, Kp] q.C * scale (padding unread; -inf = not a
      candidate).
    lse_parts: [Hkv, Sp, Mp] log-sum-exp parts of the normaliser, the first
      num_lookup_parts of them written.
    num_lookup_parts: number of written parts.
    keys, values: [Hkv, S', D] cluster-contiguous.
    counts, offsets: [Hkv, K], [Hkv, K + 1] int32.
    threshold: tau, keep clusters with sbar > tau: a scalar or [B, Hkv].
    active: [B] bool sequences whose query is real, or None (all); the others
      keep no cluster.
    batch, group: B and G.
    window_keys, window_values: [Hkv, W, D] or None.
    own: each sequence's own rows, or None.
    sm_scale: softmax scale.
    out_dtype: dtype of the output.
    block_sizes: tiles.
    interpret: run in the Pallas interpreter.

  Returns:
    out [B, Hq, D] in out_dtype, lse [B, Hq] f32, kept [B, Hkv, K] bool,
    num_rows [B, Hkv] int32.
  """
  num_kv_heads, num_keys, head_dim = keys.shape
  num_clusters = counts.shape[1]
  block_clusters = block_sizes.block_clusters
  num_chunks = pl.cdiv(num_clusters, block_clusters)
  own_splits = 0 if own is None else pl.cdiv(own.keys.shape[1],
                                             block_sizes.own_split_rows)
  num_parts = block_sizes_lib.next_power_of_two(num_chunks + own_splits)
  num_pairs = batch * num_kv_heads
  q_block = max(16, block_sizes_lib.next_power_of_two(group))
  grid = (num_pairs, num_chunks)
  head = lambda *shape: pl.BlockSpec(
      (None, *shape), lambda bh, j: (bh % num_kv_heads,) + (0,) * len(shape))
  piece_rows = block_sizes.piece_rows
  if num_keys * piece_rows >= 2**31:
    raise ValueError(f"{num_keys=} x {piece_rows=} must be < 2**31 (the "
                     "selection's list packs a row and a count in int32)")
  num_entries = num_keys // piece_rows + num_clusters + num_chunks
  pair_list = pl.BlockSpec((None, num_entries), lambda bh, j: (bh, 0))
  per_chunk = pl.BlockSpec((None, None), lambda bh, j: (j, bh))
  select = functools.partial(
      _select_kernel, num_kv_heads=num_kv_heads, group=group,
      num_lookup_parts=num_lookup_parts, num_clusters=num_clusters,
      tile_rows=q_block, piece_rows=piece_rows, has_active=active is not None)
  scalars = [pair_scalars.per_pair(threshold, jnp.float32, batch,
                                   num_kv_heads)]
  if active is not None:
    scalars.append(pair_scalars.per_sequence(active, jnp.int32, num_kv_heads))
  pieces, parts_rows, chunk_pieces, kept = pl.pallas_call(
      select,
      grid=grid,
      in_specs=[
          *(spec for _, spec in scalars),
          head(*lse_parts.shape[1:]),
          head(*logits.shape[1:]),
          head(num_clusters),
          head(num_clusters + 1),
      ],
      out_specs=[
          pair_list, per_chunk, per_chunk,
          pl.BlockSpec((None, None, block_clusters), lambda bh, j: (j, bh, 0)),
      ],
      out_shape=[  # list entries past each chunk's pieces and parts past
          # num_chunks (padding) unwritten
          jax.ShapeDtypeStruct((num_pairs, num_entries), jnp.int32),
          jax.ShapeDtypeStruct((num_parts, num_pairs), jnp.int32),
          jax.ShapeDtypeStruct((num_chunks, num_pairs), jnp.int32),
          jax.ShapeDtypeStruct((num_chunks, num_pairs, block_clusters),
                               jnp.int32),
      ],
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="squeezed_decode_selection",
  )(*(value for value, _ in scalars), lse_parts, logits, counts, offsets)
  attend = functools.partial(
      _attend_kernel, sm_scale=sm_scale, num_kv_heads=num_kv_heads,
      group=group, block_clusters=block_clusters,
      block_rows=block_sizes.block_rows, piece_rows=piece_rows,
      num_chunks=num_chunks, own_split_rows=block_sizes.own_split_rows)
  own_inputs = []
  if own is not None:
    own_rows_spec = pl.BlockSpec(
        (None, own.keys.shape[1], None, head_dim),
        lambda bh, j: (bh // num_kv_heads, 0, bh % num_kv_heads, 0))
    own_inputs = [
        pair_scalars.per_sequence(own.lengths, jnp.int32, num_kv_heads),
        (own.keys.astype(keys.dtype), own_rows_spec),
        (own.values.astype(keys.dtype), own_rows_spec)]
  last_chunk = lambda j: jnp.minimum(j, num_chunks - 1)  # own splits: unread
  parts_out, parts_lse = pl.pallas_call(
      attend,
      grid=(num_pairs, num_chunks + own_splits),
      in_specs=[
          pl.BlockSpec((None, None), lambda bh, j: (last_chunk(j), bh)),
          head(num_clusters + 1),
          pair_list,
          head(*q_rows.shape[1:]),
          head(num_keys, head_dim),
          head(num_keys, head_dim),
          *(spec for _, spec in own_inputs),
      ],
      out_specs=[
          pl.BlockSpec((None, None, q_block, head_dim),
                       lambda bh, j: (j, bh, 0, 0)),
          pl.BlockSpec((None, None, q_block), lambda bh, j: (j, bh, 0)),
      ],
      out_shape=[  # parts past the chunks and own splits: padding, unwritten
          jax.ShapeDtypeStruct((num_parts, num_pairs, q_block, head_dim),
                               jnp.float32),
          jax.ShapeDtypeStruct((num_parts, num_pairs, q_block), jnp.float32),
      ],
      compiler_params=plgpu.CompilerParams(
          num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
      interpret=interpret,
      name="squeezed_decode_attention",
  )(chunk_pieces, offsets, pieces, q_rows, keys, values,
    *(value for value, _ in own_inputs))
  kept = jnp.moveaxis(kept, 0, 1).reshape(
      batch, num_kv_heads, num_chunks * block_clusters)[..., :num_clusters]
  if window_keys is not None:
    window_keys = window_keys.astype(keys.dtype)
    window_values = window_values.astype(keys.dtype)
  out, lse, num_rows = decode_reduce.reduce_partials(
      q_rows, parts_out, parts_lse, num_chunks + own_splits,
      num_q_rows=group, num_kv_heads=num_kv_heads, parts_rows=parts_rows,
      num_row_parts=num_chunks, window_keys=window_keys,
      window_values=window_values, q_rows_of_kv_heads=True,
      sm_scale=sm_scale, block_rows=block_sizes.reduce_rows, out_dtype=out_dtype,
      interpret=interpret)
  num_heads = num_kv_heads * group
  out = out.reshape(batch, num_heads, head_dim)
  lse = lse.reshape(batch, num_heads)
  return out, lse, kept > 0, num_rows.reshape(batch, num_kv_heads)


@functools.partial(jax.jit,
                   static_argnames=("fine_centroid_cost", "sm_scale",
                                    "block_sizes", "interpret"))
def squeezed_decode_attention(
    q: jax.Array, keys: jax.Array, values: jax.Array, centroids: jax.Array,
    counts: jax.Array, offsets: jax.Array,
    threshold: float | jax.Array | None = None, *,
    key_budget: int | jax.Array | None = None,
    fine_centroid_cost: float = 0.0,
    active: jax.Array | None = None,
    window_keys: jax.Array | None = None,
    window_values: jax.Array | None = None,
    own: own_rows.OwnRows | None = None,
    coarse_centroids: jax.Array | None = None,
    coarse_counts: jax.Array | None = None,
    coarse_offsets: jax.Array | None = None,
    coarse_threshold: float | jax.Array | None = None,
    sm_scale: float | None = None,
    block_sizes: block_sizes_lib.DecodeBlockSizes | None = None,
    interpret: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array | None]:
  """Lookup, threshold selection and attention of one decode step.

  See `pallas_kernels.squeezed_decode_attention`.

  Args:
    q: [B, Hq, D] one token per sequence, post-RoPE.
    keys, values: [Hkv, S', D] cluster-contiguous.
    centroids, counts, offsets: [Hkv, K, D], [Hkv, K], [Hkv, K + 1].
    threshold: keep fine clusters with sbar > threshold; or
    key_budget: keep the top fine clusters up to this many keys per (sequence,
      KV head), an int or [B, Hkv] (`selection.budget_thresholds` of the
      lookup's scores, found by `budget_cut.budget_thresholds` without a
      sort).
    fine_centroid_cost: hierarchical key-budget mode: keys of key_budget
      charged per fine centroid scored
      (`hierarchical.key_budget_after_fine_lookup`).
    active: [B] bool sequences whose query is real, or None (all); the others
      keep no cluster.
    window_keys, window_values: [Hkv, W, D] or None.
    own: each sequence's own rows (attended in the reduce), or None.
    coarse_centroids, coarse_counts, coarse_offsets, coarse_threshold: the
      coarse level ([Hkv, Kc, D], [Hkv, Kc], [Hkv, Kc + 1], scalar) for the
      hierarchical lookup, or all None for the flat one.
    sm_scale: softmax scale, 1 / sqrt(D) if None.
    block_sizes: tiles, `DecodeBlockSizes()` if None.
    interpret: run the kernels in the Pallas interpreter.

  Returns:
    out [B, Hq, D] in q.dtype, lse [B, Hq] f32, kept clusters [B, Hkv, K]
    bool, rows read [B, Hkv] int32, kept coarse clusters [B, Hkv, Kc] bool
    (None for the flat lookup).
  """
  if not queries.is_decode(q):
    raise ValueError(f"{q.shape=} must be decode queries [B, Hq, D]")
  selection_lib.check_one_mode(threshold, key_budget)
  block_sizes = block_sizes or block_sizes_lib.DecodeBlockSizes()
  scale = queries.default_scale(q.shape[-1], sm_scale)
  num_kv_heads = keys.shape[0]
  batch, num_heads, _ = q.shape
  group = num_heads // num_kv_heads
  q_rows = gpu_scores.decode_query_rows(q, num_kv_heads)
  counts = counts.astype(jnp.int32)
  offsets = offsets.astype(jnp.int32)
  lookup = block_sizes.lookup
  kept_coarse = None
  if coarse_centroids is None:
    logits, lse_parts = gpu_scores.single_pass_logits(
        q_rows, centroids, counts, num_q_rows=batch * group, sm_scale=scale,
        block_sizes=lookup, interpret=interpret)
    num_parts = gpu_scores.num_single_pass_splits(centroids.shape[1], lookup)
  else:
    logits, lse_parts, num_parts, kept_coarse = hierarchical_scores.fine_logits(
        q_rows, centroids, counts, coarse_centroids,
        coarse_counts.astype(jnp.int32), coarse_offsets.astype(jnp.int32),
        coarse_threshold, batch=batch, group=group, sm_scale=scale,
        block_sizes=block_sizes, interpret=interpret)
  if key_budget is not None and kept_coarse is not None:
    key_budget = hierarchical.key_budget_after_fine_lookup(
        key_budget, kept_coarse, coarse_offsets, fine_centroid_cost)
  if key_budget is not None:
    threshold = budget_cut.budget_thresholds(
        logits, lse_parts, num_parts, counts, key_budget, batch=batch,
        group=group, interpret=interpret)
  out, lse, kept, num_rows = fused_selection_attention(
      q_rows, logits, lse_parts, num_parts, keys, values, counts, offsets,
      threshold, active=active, batch=batch, group=group,
      window_keys=window_keys, window_values=window_values, own=own,
      sm_scale=scale, out_dtype=q.dtype,
      block_sizes=block_sizes, interpret=interpret)
  return out, lse, kept, num_rows, kept_coarse
