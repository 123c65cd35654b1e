"""The fine level of the hierarchical decode lookup, Pallas GPU.

After the single pass over the coarse centroids (logits and lse parts, as for
a flat lookup), one program per (KV head, chunk of `coarse_block` coarse
clusters) does the rest of the two-level lookup for all query rows of the
head (m = b * G + g):
  * finishes the coarse normaliser, keeps coarse cluster c for sequence b iff
    max_g s_c > coarse_tau (`references.hierarchical_centroid_scores`);
  * walks the fine clusters of its coarse clusters (a contiguous range of
    fine indices, tiles of `fine_block`), loading only the fine centroids of
    coarse clusters kept by some sequence (masked loads of pruned rows move no
    bytes), and writes their logits, -inf where the row's sequence did not
    keep the coarse cluster;
  * writes the log-sum-exp of its part of the fine normaliser: the kept fine
    terms N_f exp(q.C_f) plus, for each pruned coarse cluster, its coarse
    estimate Nc_c exp(q.Cc_c).
The fused decode attention then reads these logits and lse parts exactly as
it reads a flat lookup's.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels import block_sizes as block_sizes_lib
from pallas_kernels import references
from pallas_kernels.gpu import centroid_scores as gpu_scores
from pallas_kernels.gpu import flash_blocks


def _fine_logits_kernel(threshold_ref, coarse_parts_ref, coarse_logits_ref,
                        coarse_counts_ref, coarse_offsets_ref, q_ref, c_ref,
                        n_ref, logits_ref, lse_ref, kept_ref, *,
                        sm_scale: float, group: int, num_q_rows: int,
                        num_coarse_parts: int, num_coarse: int,
                        fine_block: int):
  """One (KV head, chunk of coarse clusters) program.

  Refs: threshold_ref [] f32 (coarse tau); coarse_parts_ref [Scp, Mp];
  coarse_logits_ref [Mp, Kcp]; coarse_counts_ref [Kc];
  coarse_offsets_ref [Kc + 1]; q_ref [Mp, D]; c_ref [K, D] fine centroids;
  n_ref [K] fine counts. Outputs: logits_ref [Mp, Kp] (this chunk's fine
  range written); lse_ref [Mp]; kept_ref [Mp, Cc] int32 coarse keep flags.
  """
  q = q_ref[...]
  num_rows = q.shape[0]
  coarse_block = kept_ref.shape[1]
  row_ids = jnp.arange(num_rows)
  real = row_ids < num_q_rows
  parts = coarse_parts_ref[...]
  coarse_lse = flash_blocks.masked_logsumexp(
      parts, (jnp.arange(parts.shape[0]) < num_coarse_parts)[:, None])

  first = pl.program_id(1) * coarse_block
  in_range = first + jnp.arange(coarse_block) < num_coarse
  coarse_logits = plgpu.load(
      coarse_logits_ref.at[:, pl.ds(first, coarse_block)],
      mask=in_range[None, :], other=-jnp.inf)
  coarse_log_n = references.log_counts(plgpu.load(
      coarse_counts_ref.at[pl.ds(first, coarse_block)], mask=in_range,
      other=0))
  coarse_probs = jnp.where(real[:, None] & (coarse_log_n > -jnp.inf)[None, :],
                           jnp.exp(coarse_logits - coarse_lse[:, None]), 0.0)
  above = (coarse_probs > threshold_ref[()]) & in_range[None, :]
  if group > 1:  # a coarse cluster kept by any head of the sequence
    same_sequence = (row_ids[:, None] // group) == (row_ids[None, :] // group)
    above = plgpu.dot(same_sequence.astype(jnp.bfloat16),
                      above.astype(jnp.bfloat16)) > 0.5
  keep = above & real[:, None]
  pruned = jnp.where(keep, -jnp.inf, coarse_logits + coarse_log_n[None, :])
  carry = flash_blocks.online_logsumexp(
      flash_blocks.empty_logsumexp(num_rows), pruned)

  starts = plgpu.load(coarse_offsets_ref.at[pl.ds(first, coarse_block)],
                      mask=in_range, other=jnp.iinfo(jnp.int32).max)
  ends = plgpu.load(coarse_offsets_ref.at[pl.ds(first + 1, coarse_block)],
                    mask=in_range, other=0)
  fine_first, fine_stop = starts.min(), ends.max()
  kept_by_any = keep.astype(jnp.int32).max(axis=0) > 0

  def fine_tile(tile, carry):
    fine_start = fine_first + tile * fine_block
    fine = fine_start + jnp.arange(fine_block)
    valid = fine < fine_stop
    member = ((starts[None, :] <= fine[:, None])
              & (fine[:, None] < ends[None, :]))
    loaded = (member & kept_by_any[None, :]).astype(jnp.int32).max(axis=1) > 0
    window = pl.ds(fine_start, fine_block)
    centroids = plgpu.load(c_ref.at[window], mask=loaded[:, None], other=0.0)
    log_n = references.log_counts(
        plgpu.load(n_ref.at[window], mask=valid, other=0))
    candidate = plgpu.dot(keep.astype(jnp.bfloat16),
                          member.astype(jnp.bfloat16), trans_b=True) > 0.5
    logits = gpu_scores.centroid_logits(q, centroids, sm_scale)
    logits = jnp.where(candidate, logits, -jnp.inf)
    plgpu.store(logits_ref.at[:, window], logits,
                mask=real[:, None] & valid[None, :])
    return flash_blocks.online_logsumexp(carry, logits + log_n[None, :])

  num_tiles = pl.cdiv(jnp.maximum(fine_stop - fine_first, 0), fine_block)
  top, total = lax.fori_loop(0, num_tiles, fine_tile, carry)
  plgpu.store(lse_ref, top + jnp.log(total), mask=real)
  plgpu.store(kept_ref, keep.astype(jnp.int32), mask=real[:, None])


def fine_logits(
    q_rows: jax.Array, centroids: jax.Array, counts: jax.Array,
    coarse_centroids: jax.Array, coarse_counts: jax.Array,
    coarse_offsets: jax.Array, coarse_threshold: float | jax.Array, *,
    batch: int, group: int, sm_scale: float,
    block_sizes: block_sizes_lib.DecodeBlockSizes, interpret: bool
) -> tuple[jax.Array, jax.Array, int, jax.Array]:
  """Both passes of the hierarchical decode lookup.

  Args:
    q_rows: [Hkv, Mp, D] from `centroid_scores.decode_query_rows`.
    centroids, counts: fine level, [Hkv, K, D], [Hkv, K] int32.
    coarse_centroids, coarse_counts: [Hkv, Kc, D], [Hkv, Kc] int32.
    coarse_offsets: [Hkv, Kc + 1] int32 fine-cluster range of each coarse one.
    coarse_threshold: keep coarse clusters with sbar > this.
    batch, group: B and G (real rows: B x G).
    sm_scale: softmax scale.
    block_sizes: tiles.
    interpret: run in the Pallas interpreter.

  Returns:
    logits [Hkv, Mp, Kp] f32 (-inf for fine clusters outside the row's kept
    coarse clusters), lse_parts [Hkv, Sp, Mp], the number of written parts,
    kept coarse clusters [B, Hkv, Kc] bool.
  """
  num_kv_heads, num_rows, head_dim = q_rows.shape
  num_fine = centroids.shape[1]
  num_coarse = coarse_counts.shape[1]
  num_q_rows = batch * group
  coarse_logits, coarse_parts = gpu_scores.single_pass_logits(
      q_rows, coarse_centroids, coarse_counts, num_q_rows=num_q_rows,
      sm_scale=sm_scale, block_sizes=block_sizes.lookup, interpret=interpret)
  coarse_block, fine_block = block_sizes.coarse_block, block_sizes.fine_block
  num_chunks = pl.cdiv(num_coarse, coarse_block)
  fine_padded = pl.cdiv(num_fine, fine_block) * fine_block
  kernel = functools.partial(
      _fine_logits_kernel, sm_scale=sm_scale, group=group,
      num_q_rows=num_q_rows,
      num_coarse_parts=gpu_scores.num_single_pass_splits(num_coarse,
                                                         block_sizes.lookup),
      num_coarse=num_coarse, fine_block=fine_block)
  head = lambda *shape: pl.BlockSpec(
      (None, *shape), lambda h, j: (h,) + (0,) * len(shape))
  logits, lse_parts, kept = pl.pallas_call(
      kernel,
      grid=(num_kv_heads, num_chunks),
      in_specs=[
          pl.BlockSpec((None,), lambda h, j: (0,)),
          head(*coarse_parts.shape[1:]),
          head(*coarse_logits.shape[1:]),
          head(num_coarse),
          head(num_coarse + 1),
          head(num_rows, head_dim),
          head(num_fine, head_dim),
          head(num_fine),
      ],
      out_specs=[
          head(num_rows, fine_padded),
          pl.BlockSpec((None, None, num_rows), lambda h, j: (h, j, 0)),
          pl.BlockSpec((None, num_rows, coarse_block), lambda h, j: (h, 0, j)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((num_kv_heads, num_rows, fine_padded),
                               jnp.float32),
          jax.ShapeDtypeStruct(
              (num_kv_heads, block_sizes_lib.next_power_of_two(num_chunks),
               num_rows),
              jnp.float32),
          jax.ShapeDtypeStruct(
              (num_kv_heads, num_rows, num_chunks * coarse_block), jnp.int32),
      ],
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name="squeezed_hierarchical_fine_logits",
  )(jnp.asarray(coarse_threshold, jnp.float32).reshape(1), coarse_parts,
    coarse_logits, coarse_counts, coarse_offsets, q_rows, centroids, counts)
  kept = kept[:, :num_q_rows:group, :num_coarse].reshape(
      num_kv_heads, batch, num_coarse)
  return logits, lse_parts, num_chunks, jnp.swapaxes(kept, 0, 1) > 0
