"""Centroid scores (the lookup), Pallas GPU.

Query rows of one KV head are laid out as m = (b * G + g) * Tp + t (sequence,
group head, token padded to Tp), so all B x G x T queries of a KV head share
every centroid tile: the centroids are read once per pass for the whole batch.

Two shapes of work:
* decode (few query rows): ONE bandwidth-bound pass over the centroids; each
  program scores `single_pass_tiles` centroid tiles for all query rows (one
  tile of the next power of two >= max(16, B x G) rows; float32 centroids on
  the tf32 tensor cores), writes the logits and a per-split log-sum-exp
  (`single_pass_logits`); XLA finishes the normaliser and the scores on the
  small [Hkv, B x G, K] logits, or the fused decode attention does
  (`decode_attention.py`). Nothing leaves the device.
* prefill (many query rows): pass 1 computes each query's log-sum-exp over all
  centroids (online max); pass 2 recomputes the logits per centroid tile and
  accumulates the weighted mean over each (sequence, head)'s tokens (in a
  [block_m, block_k] tile, summed over queries once per group). Both passes
  are matrix products on the tensor cores; no [T, K] array is stored.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels import block_sizes as block_sizes_lib
from pallas_kernels import queries
from pallas_kernels import references
from pallas_kernels.gpu import flash_blocks


def _centroid_tile(c_ref, n_ref, tile: jax.Array, block_k: int):
  """Centroids [block_k, D], log-counts [block_k] (-inf: empty or padding)."""
  num_clusters = c_ref.shape[0]
  valid = tile * block_k + jnp.arange(block_k) < num_clusters
  window = pl.ds(tile * block_k, block_k)
  centroids = plgpu.load(c_ref.at[window], mask=valid[:, None], other=0.0)
  counts = plgpu.load(n_ref.at[window], mask=valid, other=0)
  return centroids, references.log_counts(counts)


def centroid_logits(q: jax.Array, centroids: jax.Array, sm_scale: float,
                    dot_dtype: jnp.dtype | None = None) -> jax.Array:
  """q.C * scale [block_m, block_k] in a kernel, products in `dot_dtype`
  (None: the centroids' dtype); float32 operands use tf32 tensor cores."""
  dtype = centroids.dtype if dot_dtype is None else dot_dtype
  tf32 = True if dtype == jnp.float32 else None
  return plgpu.dot(q.astype(dtype), centroids.astype(dtype), trans_b=True,
                   allow_tf32=tf32) * sm_scale


def _lse_kernel(q_ref, c_ref, n_ref, lse_ref, *logits_refs, sm_scale: float,
                block_k: int, tiles_per_split: int, num_q_rows: int,
                dot_dtype: jnp.dtype | None):
  """Per-query log-sum-exp of logit + log N over a range of centroid tiles.

  Refs: q_ref [block_m, D]; c_ref [K, D]; n_ref [K]; lse_ref [block_m];
  optional logits_ref [block_m, Kp] (decode: logits kept for XLA, stored for
  the first num_q_rows real query rows only).
  """
  num_tiles = pl.cdiv(c_ref.shape[0], block_k)
  first = pl.program_id(2) * tiles_per_split
  last = jnp.minimum(first + tiles_per_split, num_tiles)
  q = q_ref[...]
  block_m = q.shape[0]
  real = pl.program_id(1) * block_m + jnp.arange(block_m) < num_q_rows

  def body(tile, carry):
    centroids, log_n = _centroid_tile(c_ref, n_ref, tile, block_k)
    logits = centroid_logits(q, centroids, sm_scale, dot_dtype)
    if logits_refs:
      plgpu.store(logits_refs[0].at[:, pl.ds(tile * block_k, block_k)],
                  logits, mask=real[:, None])
    return flash_blocks.online_logsumexp(carry, logits + log_n[None, :])

  top, total = lax.fori_loop(first, last, body,
                             flash_blocks.empty_logsumexp(block_m))
  lse_ref[...] = top + jnp.log(total)


def _mean_probs_kernel(q_ref, lse_ref, w_ref, c_ref, n_ref, out_ref, *,
                       sm_scale: float, block_m: int, block_k: int,
                       rows_per_group: int, dot_dtype: jnp.dtype | None):
  """Weighted mean over each group's tokens of s_j, for one centroid tile.

  The weighted probabilities accumulate elementwise in a [block_m, block_k]
  tile and are summed over the query axis once per group (a cross-warp
  reduction per query block would cost more than the exps).

  Refs: q_ref [M, D]; lse_ref, w_ref [M]; c_ref [K, D]; n_ref [K];
  out_ref [num_groups, block_k].
  """
  centroids, log_n = _centroid_tile(c_ref, n_ref, pl.program_id(1), block_k)
  num_groups = out_ref.shape[0]

  def token_block(block, acc):
    window = pl.ds(block * block_m, block_m)
    logits = centroid_logits(q_ref[window, :], centroids, sm_scale,
                             dot_dtype)
    probs = jnp.exp(logits - lse_ref[window][:, None])
    return acc + probs * w_ref[window][:, None]

  def group_body(group, carry):
    first = group * (rows_per_group // block_m)
    acc = lax.fori_loop(first, first + rows_per_group // block_m, token_block,
                        jnp.zeros((block_m, block_k), jnp.float32))
    out_ref[group, :] = jnp.where(log_n > -jnp.inf, acc.sum(axis=0), 0.0)
    return carry

  lax.fori_loop(0, num_groups, group_body, 0)


def _lse_call(q_rows, centroids, counts, *, sm_scale, block_sizes, num_splits,
              with_logits, num_q_rows, dot_dtype, interpret):
  """pass 1: lse partials [Hkv, Sp, Mp] (+ logits [Hkv, Mp, Kp]).

  Split s covers centroid tiles s * tiles_per_split onwards; the split axis is
  padded to Sp = the next power of two (entries >= num_splits unwritten).
  """
  num_kv_heads, num_rows, head_dim = q_rows.shape
  num_clusters = centroids.shape[1]
  block_m, block_k = block_sizes.block_m, block_sizes.block_k
  num_tiles = pl.cdiv(num_clusters, block_k)
  tiles_per_split = pl.cdiv(num_tiles, num_splits)
  out_specs = [pl.BlockSpec((None, None, block_m), lambda h, i, s: (h, s, i))]
  num_parts = block_sizes_lib.next_power_of_two(num_splits)
  out_shape = [jax.ShapeDtypeStruct((num_kv_heads, num_parts, num_rows),
                                    jnp.float32)]
  if with_logits:
    out_specs.append(pl.BlockSpec((None, block_m, num_tiles * block_k),
                                  lambda h, i, s: (h, i, 0)))
    out_shape.append(jax.ShapeDtypeStruct(
        (num_kv_heads, num_rows, num_tiles * block_k), jnp.float32))
  kernel = functools.partial(_lse_kernel, sm_scale=sm_scale, block_k=block_k,
                             tiles_per_split=tiles_per_split,
                             num_q_rows=num_q_rows, dot_dtype=dot_dtype)
  return pl.pallas_call(
      kernel,
      grid=(num_kv_heads, num_rows // block_m, num_splits),
      in_specs=[
          pl.BlockSpec((None, block_m, head_dim), lambda h, i, s: (h, i, 0)),
          pl.BlockSpec((None, num_clusters, head_dim),
                       lambda h, i, s: (h, 0, 0)),
          pl.BlockSpec((None, num_clusters), lambda h, i, s: (h, 0)),
      ],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(
          num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
      interpret=interpret,
      name="squeezed_centroid_lse",
  )(q_rows, centroids, counts)


def decode_query_rows(q: jax.Array, num_kv_heads: int) -> jax.Array:
  """Decode queries in the single-pass layout, all of a KV head in one tile.

  Args:
    q: [B, Hq, D] (or [B, T, Hq, D]: rows are then (b, g, t) triples).
    num_kv_heads: Hkv.

  Returns:
    [Hkv, Mp, D] in q.dtype: row m = (b * G + g) * T + t, zero rows up to
    Mp = the next power of two >= max(16, B x G x T) (Triton tiles are powers
    of two).
  """
  grouped = queries.group_heads(queries.to_tokens(q), num_kv_heads)
  batch, tokens, _, group, head_dim = grouped.shape
  num_rows = batch * group * tokens
  q_rows = jnp.transpose(grouped, (2, 0, 3, 1, 4)).reshape(
      num_kv_heads, num_rows, head_dim)
  padded = max(16, block_sizes_lib.next_power_of_two(num_rows))
  return jnp.pad(q_rows, ((0, 0), (0, padded - num_rows), (0, 0)))


def single_pass_logits(
    q_rows: jax.Array, centroids: jax.Array, counts: jax.Array, *,
    num_q_rows: int, sm_scale: float,
    block_sizes: block_sizes_lib.LookupBlockSizes,
    interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """The decode lookup's one pass over the centroids: logits and lse parts.

  Each program scores `block_sizes.single_pass_tiles` centroid tiles of one KV
  head for all its query rows (float32 centroids on the tf32 tensor cores).

  Args:
    q_rows: [Hkv, Mp, D] from `decode_query_rows`.
    centroids: [Hkv, K, D] float32 or bfloat16.
    counts: [Hkv, K] int32.
    num_q_rows: real rows (the rest are padding and are not stored).
    sm_scale: softmax scale.
    block_sizes: tiles (block_k, single_pass_tiles, num_warps).
    interpret: run in the Pallas interpreter.

  Returns:
    logits: [Hkv, Mp, Kp] float32 q.C * scale (Kp = K rounded up to block_k;
      padding rows and columns unwritten).
    lse_parts: [Hkv, Sp, Mp] float32 log-sum-exp of logit + log N over each
      split's clusters; splits num_splits..Sp - 1 (padding) unwritten, with
      num_splits = ceil(ceil(K / block_k) / single_pass_tiles).
  """
  num_tiles = pl.cdiv(centroids.shape[1], block_sizes.block_k)
  tiles = dataclasses.replace(
      block_sizes, block_m=q_rows.shape[1],
      num_stages=1 if block_sizes.single_pass_tiles == 1 else
      block_sizes.num_stages)
  lse_parts, logits = _lse_call(
      q_rows, centroids, counts, sm_scale=sm_scale, block_sizes=tiles,
      num_splits=pl.cdiv(num_tiles, block_sizes.single_pass_tiles),
      with_logits=True, num_q_rows=num_q_rows, dot_dtype=None,
      interpret=interpret)
  return logits, lse_parts


def single_pass_probs(logits: jax.Array, lse_parts: jax.Array,
                      num_parts: int, num_rows: int,
                      num_clusters: int) -> jax.Array:
  """s_j = exp(logit_j - lse) of each query row, from `single_pass_logits`.

  logits: [Hkv, Mp, Kp]; lse_parts: [Hkv, Sp, Mp], the first num_parts
  written. Returns [Hkv, num_rows, K] float32 (0 where the logit is -inf).
  """
  lse = jax.nn.logsumexp(lse_parts[:, :num_parts, :num_rows], axis=1)
  return jnp.exp(logits[:, :num_rows, :num_clusters] - lse[..., None])


def group_max_probs(lse_parts_ref, logits_ref, *, first_row: jnp.ndarray,
                    group: int, tile_rows: int, num_lookup_parts: int,
                    first_cluster, in_range: jnp.ndarray) -> jnp.ndarray:
  """max over the G query heads of s_j = exp(logit_j - lse), one KV head.

  The in-kernel twin of `single_pass_probs` (+ the max over G), shared by the
  fused decode attention and the budget cut so both see the same scores.

  Refs: lse_parts_ref [Sp, Mp] (the first num_lookup_parts written);
  logits_ref [Mp, Kp]. Rows first_row .. first_row + G - 1 are the G query
  heads, loaded as one tile of tile_rows >= G rows (a power of two);
  columns first_cluster + arange(C) with in_range [C] bool (others score 0).
  Returns [C] float32.
  """
  real = jnp.arange(tile_rows) < group
  rows = pl.ds(first_row, tile_rows)
  parts = plgpu.load(lse_parts_ref.at[:, rows], mask=real[None, :],
                     other=-jnp.inf)
  part_ids = jnp.arange(parts.shape[0])
  lse = flash_blocks.masked_logsumexp(
      parts, (part_ids < num_lookup_parts)[:, None] & real[None, :])
  logits = plgpu.load(
      logits_ref.at[rows, pl.ds(first_cluster, in_range.shape[0])],
      mask=real[:, None] & in_range[None, :], other=-jnp.inf)
  probs = jnp.where(real[:, None], jnp.exp(logits - lse[:, None]), 0.0)
  return probs.max(axis=0)


def num_single_pass_splits(
    num_clusters: int, block_sizes: block_sizes_lib.LookupBlockSizes) -> int:
  """Number of written lse parts of `single_pass_logits`."""
  return pl.cdiv(pl.cdiv(num_clusters, block_sizes.block_k),
                 block_sizes.single_pass_tiles)


def _mean_probs_call(q_rows, lse, weights, centroids, counts, *, sm_scale,
                     block_sizes, num_groups, dot_dtype, interpret):
  """pass 2: [Hkv, num_groups, Kp] weighted mean of s_j per group."""
  num_kv_heads, num_rows, head_dim = q_rows.shape
  num_clusters = centroids.shape[1]
  block_k = block_sizes.block_k
  num_tiles = pl.cdiv(num_clusters, block_k)
  kernel = functools.partial(
      _mean_probs_kernel, sm_scale=sm_scale, block_m=block_sizes.block_m,
      block_k=block_k, rows_per_group=num_rows // num_groups,
      dot_dtype=dot_dtype)
  return pl.pallas_call(
      kernel,
      grid=(num_kv_heads, num_tiles),
      in_specs=[
          pl.BlockSpec((None, num_rows, head_dim), lambda h, j: (h, 0, 0)),
          pl.BlockSpec((None, num_rows), lambda h, j: (h, 0)),
          pl.BlockSpec((None, num_rows), lambda h, j: (h, 0)),
          pl.BlockSpec((None, num_clusters, head_dim), lambda h, j: (h, 0, 0)),
          pl.BlockSpec((None, num_clusters), lambda h, j: (h, 0)),
      ],
      out_specs=pl.BlockSpec((None, num_groups, block_k),
                             lambda h, j: (h, 0, j)),
      out_shape=jax.ShapeDtypeStruct(
          (num_kv_heads, num_groups, num_tiles * block_k), jnp.float32),
      compiler_params=plgpu.CompilerParams(
          num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
      interpret=interpret,
      name="squeezed_centroid_mean_probs",
  )(q_rows, lse, weights, centroids, counts)


@functools.partial(jax.jit,
                   static_argnames=("sm_scale", "block_sizes", "interpret"))
def centroid_scores(
    q: jax.Array, centroids: jax.Array, counts: jax.Array, *,
    query_mask: jax.Array | None = None, sm_scale: float | None = None,
    block_sizes: block_sizes_lib.LookupBlockSizes | None = None,
    interpret: bool = False) -> jax.Array:
  """Counts-weighted centroid scores (see `references.centroid_scores`).

  Args:
    q: [B, Hq, D] (decode) or [B, T, Hq, D] (prefill).
    centroids: [Hkv, K, D]; float32 (tf32 products on the GPU) or bfloat16.
    counts: [Hkv, K] int.
    query_mask: [B, T] bool or None.
    sm_scale: softmax scale, 1 / sqrt(D) if None.
    block_sizes: tiles, `LookupBlockSizes()` if None.
    interpret: run the kernels in the Pallas interpreter (CPU tests).

  Returns:
    sbar [B, Hkv, K] float32.
  """
  block_sizes = block_sizes or block_sizes_lib.LookupBlockSizes()
  scale = queries.default_scale(q.shape[-1], sm_scale)
  num_kv_heads, num_clusters, head_dim = centroids.shape
  if counts.shape != (num_kv_heads, num_clusters):
    raise ValueError(f"{counts.shape=} must be {(num_kv_heads, num_clusters)=}")
  grouped = queries.group_heads(queries.to_tokens(q), num_kv_heads)
  batch, tokens, _, group, _ = grouped.shape
  num_groups = batch * group
  weights = queries.query_weights(query_mask, batch, tokens)
  counts = counts.astype(jnp.int32)
  block_m = block_sizes.block_m

  if num_groups * tokens <= block_sizes.single_pass_max_rows:
    num_rows = num_groups * tokens
    logits, lse_parts = single_pass_logits(
        decode_query_rows(q, num_kv_heads), centroids, counts,
        num_q_rows=num_rows, sm_scale=scale, block_sizes=block_sizes,
        interpret=interpret)
    num_splits = num_single_pass_splits(num_clusters, block_sizes)
    probs = single_pass_probs(logits, lse_parts, num_splits, num_rows,
                              num_clusters).reshape(
                                  num_kv_heads, batch, group, tokens,
                                  num_clusters)
    probs = jnp.where(counts[:, None, None, None, :] > 0, probs, 0.0)
    return references.block_scores(jnp.transpose(probs, (1, 0, 2, 3, 4)),
                                   weights)

  padded_tokens = block_sizes_lib.round_up(tokens, block_m)
  q_rows = jnp.pad(jnp.transpose(grouped, (2, 0, 3, 1, 4)),
                   ((0, 0), (0, 0), (0, 0), (0, padded_tokens - tokens),
                    (0, 0)))
  q_rows = q_rows.reshape(num_kv_heads, num_groups * padded_tokens, head_dim)
  row_weights = jnp.broadcast_to(
      jnp.pad(weights, ((0, 0), (0, padded_tokens - tokens)))[None, :, None],
      (num_kv_heads, batch, group, padded_tokens)).reshape(
          num_kv_heads, num_groups * padded_tokens)
  dot_dtype = (None if block_sizes.two_pass_dot_dtype is None
               else jnp.dtype(block_sizes.two_pass_dot_dtype))
  (lse,) = _lse_call(q_rows, centroids, counts, sm_scale=scale,
                     block_sizes=block_sizes, num_splits=1, with_logits=False,
                     num_q_rows=q_rows.shape[1], dot_dtype=dot_dtype,
                     interpret=interpret)
  mean = _mean_probs_call(q_rows, lse[:, 0], row_weights, centroids, counts,
                          sm_scale=scale, block_sizes=block_sizes,
                          num_groups=num_groups, dot_dtype=dot_dtype,
                          interpret=interpret)
  mean = mean[..., :num_clusters].reshape(num_kv_heads, batch, group,
                                          num_clusters)
  return jnp.transpose(mean.max(axis=2), (1, 0, 2))
