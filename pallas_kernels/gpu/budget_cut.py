"""Key-budget thresholds of a decode step by bisection, no sort, Pallas GPU.

The key-budget mode keeps, per (sequence, KV head), the top clusters by score
sbar_j while their keys fit in the budget, and hands the fused decode kernel
the threshold tau that keeps exactly those (`selection.budget_thresholds`
defines it). The reference finds the cut with a sort of the K scores and a
cumulative sum; XLA runs that sort on the GPU as a chain of small kernels, at
every layer of every decode token.

Here one program per (sequence, KV head) finishes the lookup's normaliser,
holds its K scores in registers and bisects over their float32 bit patterns
(scores are >= 0, and non-negative floats order like their bits read as
int32): the smallest t with sum_j N_j [bits_j > t] <= key_budget, found in 31
steps of one masked sum each. The kept set {bits_j > t} is the sort's: the
largest prefix of the descending scores that fits, ties at the cut left out
together. tau lies halfway between the lowest kept score and the highest one
left out, so the fused kernel's recomputed scores select the same clusters.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels import block_sizes as block_sizes_lib
from pallas_kernels.gpu import centroid_scores
from pallas_kernels.gpu import pair_scalars

# Bisection steps: the bit patterns of non-negative finite floats lie in
# [0, 0x7f800000), so an interval [-1, max] halves to width 1 in 31 steps.
_BISECTION_STEPS = 31


def _budget_cut_kernel(key_budget_ref, lse_parts_ref, logits_ref, counts_ref,
                       tau_ref, *, num_kv_heads: int, group: int,
                       num_lookup_parts: int, num_clusters: int,
                       tile_rows: int, width: int):
  """One (sequence x KV head) program: tau_ref [] float32.

  Refs as in `budget_thresholds` for this sequence x KV head: key_budget_ref
  [] int32, lse_parts_ref [Sp, Mp], logits_ref [Mp, Kp], counts_ref [K]; the
  K scores are held as one vector of `width` (a power of two >= K) entries.
  """
  key_budget = key_budget_ref[()]
  in_range = jnp.arange(width) < num_clusters
  counts = plgpu.load(counts_ref.at[pl.ds(0, width)], mask=in_range, other=0)
  scores = centroid_scores.group_max_probs(
      lse_parts_ref, logits_ref,
      first_row=(pl.program_id(0) // num_kv_heads) * group, group=group,
      tile_rows=tile_rows, num_lookup_parts=num_lookup_parts, first_cluster=0,
      in_range=in_range)
  scores = jnp.where((counts > 0) & (scores > 0), scores, 0.0)  # NaN -> 0
  bits = lax.bitcast_convert_type(scores, jnp.int32)

  def kept_keys(cut):
    return jnp.where(bits > cut, counts, 0).sum()

  def halve(_, bounds):
    low, high = bounds  # kept_keys(low) > key_budget >= kept_keys(high)
    middle = low + (high - low) // 2
    fits = kept_keys(middle) <= key_budget
    return jnp.where(fits, low, middle), jnp.where(fits, middle, high)

  _, cut = lax.fori_loop(0, _BISECTION_STEPS, halve,
                         (jnp.int32(-1), bits.max()))
  kept = bits > cut
  first_left = jnp.where(kept, 0.0, scores).max()
  last_taken = jnp.where(kept, scores, jnp.inf).min()
  tau = jnp.where(kept.sum() == 0, 2 * first_left,
                  (last_taken + first_left) / 2)
  tau = jnp.where(counts.sum() <= key_budget, 0.0, tau)
  tau_ref[...] = jnp.maximum(tau, 0.0)


def budget_thresholds(logits: jax.Array, lse_parts: jax.Array,
                      num_lookup_parts: int, counts: jax.Array,
                      key_budget: int | jax.Array, *, batch: int, group: int,
                      interpret: bool = False) -> jax.Array:
  """`selection.budget_thresholds` of the single-pass lookup's scores.

  Args:
    logits: [Hkv, Mp, Kp] q.C * scale of `centroid_scores.single_pass_logits`
      (or the hierarchical fine logits; -inf = not a candidate).
    lse_parts: [Hkv, Sp, Mp], the first num_lookup_parts written.
    num_lookup_parts: number of written parts.
    counts: [Hkv, K] int32 keys per cluster.
    key_budget: keys per (sequence, KV head): an int, or [B, Hkv] int.
    batch, group: B and G (query row m = b * G + g).
    interpret: run in the Pallas interpreter.

  Returns:
    tau [B, Hkv] float32: clusters with sbar > tau are the top clusters whose
    keys fit in key_budget.
  """
  num_kv_heads, num_clusters = counts.shape
  width = block_sizes_lib.next_power_of_two(num_clusters)
  tile_rows = block_sizes_lib.next_power_of_two(group)
  kernel = functools.partial(
      _budget_cut_kernel, num_kv_heads=num_kv_heads, group=group,
      num_lookup_parts=num_lookup_parts, num_clusters=num_clusters,
      tile_rows=tile_rows, width=width)
  head = lambda *shape: pl.BlockSpec(
      (None, *shape), lambda bh: (bh % num_kv_heads,) + (0,) * len(shape))
  key_budgets, budget_spec = pair_scalars.per_pair(key_budget, jnp.int32,
                                                   batch, num_kv_heads)
  tau = pl.pallas_call(
      kernel,
      grid=(batch * num_kv_heads,),
      in_specs=[budget_spec, head(*lse_parts.shape[1:]),
                head(*logits.shape[1:]), head(num_clusters)],
      out_specs=pl.BlockSpec((None,), lambda bh: (bh,)),
      out_shape=jax.ShapeDtypeStruct((batch * num_kv_heads,), jnp.float32),
      compiler_params=plgpu.CompilerParams(  # ~1K score tile entries a warp
          num_warps=min(16, max(4, tile_rows * width // 1024)), num_stages=1),
      interpret=interpret,
      name="squeezed_budget_cut",
  )(key_budgets, lse_parts, logits, counts)
  return tau.reshape(batch, num_kv_heads)
