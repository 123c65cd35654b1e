"""Batched, jitted K-means (Euclidean or spherical) for clustering many heads' keys at once.

One problem is a point set [N, d]; `kmeans` solves a batch of independent problems [..., N, d]
(e.g. layers x KV heads) in one jitted program, in three phases per problem:

1. Seeding: greedy k-means++ (Arthur & Vassilvitskii 2007; each new seed is the best of
   `num_local_trials` D^2-sampled candidates, as in scikit-learn), on a uniform random
   **subsample** of min(N, max(8192, seed_oversampling * K)) points rather than all N, and adding
   ceil((K - 1) / seeding_steps) seeds per sequential step (chosen independently within a step,
   as in k-means||) rather than one: the sequential loop has at most `seeding_steps` steps. All
   problems are seeded together, `chunk_size` sample points at a time; a step's candidate
   distances take num_problems * chunk_size * ceil((K - 1) / seeding_steps) * num_local_trials
   float32 values.
2. Mini-batch updates (Sculley 2010): `num_minibatch_steps` steps, each assigning
   `minibatch_size` uniformly drawn points and moving every centre to the running mean of the
   points it has received (learning rate 1 / its count so far).
3. Full Lloyd steps until the relative change of the inertia is at most `tol`, or `max_iters`
   steps (`lax.while_loop`; each problem stops on its own and is then left unchanged). A cluster
   left empty by an assignment is re-seeded at one of the points farthest from their centre (up
   to 32 per problem and step, only at points at a non-zero distance); a cluster that stays empty
   is returned with count 0 and its last centroid (never NaN).

Phases 2 and 3 work on `heads_per_step` problems at a time (`lax.map` over groups of problems)
and on `chunk_size` points at a time (`lax.scan`), so their largest intermediate is a
[heads_per_step, chunk_size, K] float32 distance block: an [N, K] matrix is never formed for all
problems at once. Distances use the matmul form |x|^2 - 2 x.c + |c|^2 with the points' dtype as
the matmul input (bf16 allowed) and float32 accumulation; centroids are kept in float32. Cluster
sums are one-hot matmuls rather than scatter-adds, so results are deterministic for a given key
on every backend.

Spherical mode clusters the L2-normalised points (cosine K-means) and re-normalises centroids
after every update; its inertia is the squared Euclidean distance between normalised points and
their unit centroids, i.e. 2 * sum(1 - cos).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

_MAX_RESEEDS_PER_STEP = 32  # empty clusters re-seeded per problem and Lloyd step
_MIN_SEED_SAMPLE = 8192  # seeding uses min(N, max(this, seed_oversampling * K)) points


class KMeansResult(NamedTuple):
  """Output of `kmeans` for points [..., N, d] and K clusters.

  centroids: [..., K, d] float32 (unit norm in spherical mode, except an empty cluster's).
  labels: [..., N] int32, index of each point's nearest centroid.
  counts: [..., K] int32, number of points per cluster (0 = empty cluster).
  inertia: [...] float32, sum of squared distances of the points to their centroids.
  num_iterations: [...] int32, Lloyd steps run.
  """

  centroids: jax.Array
  labels: jax.Array
  counts: jax.Array
  inertia: jax.Array
  num_iterations: jax.Array


@functools.partial(
    jax.jit,
    static_argnames=("num_clusters", "spherical", "seed_oversampling", "seeding_steps",
                     "num_local_trials", "minibatch_size", "num_minibatch_steps", "max_iters",
                     "tol", "heads_per_step", "chunk_size"))
def kmeans(points: jax.Array,
           num_clusters: int,
           *,
           key: jax.Array,
           spherical: bool = False,
           seed_oversampling: int = 3,
           seeding_steps: int = 256,
           num_local_trials: int | None = None,
           minibatch_size: int = 1024,
           num_minibatch_steps: int = 100,
           max_iters: int = 100,
           tol: float = 1e-4,
           heads_per_step: int = 8,
           chunk_size: int = 4096) -> KMeansResult:
  """K-means over the last two axes of `points`, batched over the leading axes.

  Args:
    points: [..., N, d] float points (bf16, f16 or f32; other dtypes are cast to f32).
    num_clusters: K, 1 <= K <= N.
    key: a PRNG key: one per problem, of shape [...] (a single key for a single problem), or a
      single key for a batch, split into `jax.random.split(key, num_problems)` (problems in
      row-major order). Raw uint32 keys are accepted. The result is a deterministic function of
      the key: problem i of a batch equals the unbatched run with problem i's key.
    spherical: cluster the L2-normalised points with unit centroids (cosine K-means).
    seed_oversampling: seeding runs on a random subsample of min(N, max(8192,
      seed_oversampling * K)) points; larger is closer to exact k-means++ and costs linearly
      more seeding time and memory.
    seeding_steps: sequential seeding steps at most; fewer steps add more seeds per step (faster,
      seeds of one step chosen independently). K - 1 <= seeding_steps is exact greedy k-means++.
    num_local_trials: candidates per seed; None = 2 + floor(ln K) (scikit-learn's choice).
    minibatch_size: points per mini-batch step (drawn uniformly with replacement).
    num_minibatch_steps: number of mini-batch steps (0 skips the phase).
    max_iters: maximum number of Lloyd steps (at least 1: labels come from a Lloyd assignment).
    tol: stop a problem when |inertia_prev - inertia| <= tol * inertia between Lloyd steps.
    heads_per_step: problems processed together in phases 2 and 3; the largest divisor of the
      number of problems that does not exceed it is used.
    chunk_size: points per distance block in every phase (N is padded to a multiple of it,
      padding masked).

  Returns:
    KMeansResult (see its docstring); the labels are the nearest-centroid assignment to the
    returned centroids and `counts` / `inertia` are those of that assignment.
  """
  _validate(points, num_clusters, num_local_trials=num_local_trials,
            num_minibatch_steps=num_minibatch_steps, tol=tol, seed_oversampling=seed_oversampling,
            seeding_steps=seeding_steps, minibatch_size=minibatch_size, max_iters=max_iters,
            heads_per_step=heads_per_step, chunk_size=chunk_size)
  *batch_shape, num_points, dim = points.shape
  num_problems = math.prod(batch_shape)
  if not jnp.issubdtype(points.dtype, jnp.floating):
    points = points.astype(jnp.float32)
  flat_points = points.reshape(num_problems, num_points, dim)
  seed_keys, refine_keys = jax.vmap(jax.random.split, out_axes=1)(
      _problem_keys(key, tuple(batch_shape)))
  sample_size = min(num_points, max(_MIN_SEED_SAMPLE, seed_oversampling * num_clusters))
  trials = num_local_trials or 2 + int(math.log(num_clusters))
  seeds = jax.vmap(functools.partial(
      _seed_kmeans_plus_plus, num_clusters=num_clusters, sample_size=sample_size,
      seeding_steps=seeding_steps, num_local_trials=trials, spherical=spherical,
      chunk_size=chunk_size))(flat_points, seed_keys)
  refine = functools.partial(
      _refine, spherical=spherical, minibatch_size=minibatch_size,
      num_minibatch_steps=num_minibatch_steps, max_iters=max_iters, tol=tol,
      chunk_size=chunk_size)
  result = _map_problem_groups(refine, heads_per_step, flat_points, seeds, refine_keys)
  return KMeansResult(*(x.reshape(*batch_shape, *x.shape[1:]) for x in result))


@functools.partial(jax.jit, static_argnames=("num_clusters", "heads_per_step", "chunk_size"))
def cluster_sums(points: jax.Array,
                 labels: jax.Array,
                 num_clusters: int,
                 *,
                 heads_per_step: int = 8,
                 chunk_size: int = 4096) -> tuple[jax.Array, jax.Array]:
  """Per-cluster sums and counts of points, batched, deterministic (one-hot matmuls).

  Args:
    points: [..., N, d] float points.
    labels: [..., N] integer cluster of each point; values outside [0, K) are ignored.
    num_clusters: K.
    heads_per_step, chunk_size: grouping of problems and points, as in `kmeans`.

  Returns:
    sums: [..., K, d] float32 (float64 for float64 points), counts: [..., K] int32.
  """
  *batch_shape, num_points, dim = points.shape
  if labels.shape != points.shape[:-1]:
    raise ValueError(f"{labels.shape=} must be {points.shape[:-1]=}")
  num_problems = math.prod(batch_shape)

  def sums_one(x: jax.Array, x_labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    chunks, valid = _chunked(x, chunk_size)
    label_chunks = jnp.where(valid, _chunked(x_labels, chunk_size)[0], num_clusters)

    def step(carry, xs):
      chunk_sums, chunk_counts = _one_hot_sums(*xs, num_clusters)
      return (carry[0] + chunk_sums, carry[1] + chunk_counts), None

    init = (jnp.zeros((num_clusters, dim), _accumulation_dtype(x.dtype)),
            jnp.zeros((num_clusters,), jnp.int32))
    return lax.scan(step, init, (chunks, label_chunks))[0]

  sums, counts = _map_problem_groups(sums_one, heads_per_step,
                                    points.reshape(num_problems, num_points, dim),
                                    labels.reshape(num_problems, num_points))
  return (sums.reshape(*batch_shape, num_clusters, dim),
          counts.reshape(*batch_shape, num_clusters))


def _map_problem_groups(fn: Callable, heads_per_step: int, *args):
  """Applies a per-problem `fn` to [B, ...] arguments, `heads_per_step` problems at a time.

  `fn` is vmapped within a group and the groups run sequentially (`lax.map`); the group size is
  the largest divisor of B not exceeding `heads_per_step`, so no input is padded or copied.
  Returns fn's outputs stacked to [B, ...].
  """
  num_problems = args[0].shape[0]
  group = max(g for g in range(1, min(heads_per_step, num_problems) + 1) if num_problems % g == 0)
  grouped = [a.reshape(num_problems // group, group, *a.shape[1:]) for a in args]
  out = lax.map(lambda xs: jax.vmap(fn)(*xs), grouped)
  return jax.tree.map(lambda o: o.reshape(num_problems, *o.shape[2:]), out)


def _l2_normalize(x: jax.Array) -> jax.Array:
  """Rows of x [..., d] scaled to unit L2 norm (norm computed in float32); zero rows stay zero."""
  return (x.astype(_accumulation_dtype(x.dtype)) * _row_scale(x)[..., None]).astype(x.dtype)


def _validate(points: jax.Array, num_clusters: int, *, num_local_trials: int | None,
              num_minibatch_steps: int, tol: float, **positive: int) -> None:
  if points.ndim < 2:
    raise ValueError(f"points must be [..., N, d], got {points.shape=}")
  num_points = points.shape[-2]
  if not 1 <= num_clusters <= num_points:
    raise ValueError(f"{num_clusters=} must be in [1, N={num_points}]")
  for name, value in positive.items():
    if value < 1:
      raise ValueError(f"{name}={value} must be >= 1")
  if num_local_trials is not None and num_local_trials < 1:
    raise ValueError(f"{num_local_trials=} must be >= 1 or None")
  if num_minibatch_steps < 0 or tol < 0:
    raise ValueError(f"{num_minibatch_steps=} and {tol=} must be >= 0")


def _problem_keys(key: jax.Array, batch_shape: tuple[int, ...]) -> jax.Array:
  """One typed key per problem, [B]."""
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  if key.shape == batch_shape:
    return key.reshape(-1)
  if key.shape == ():
    return jax.random.split(key, math.prod(batch_shape))
  raise ValueError(f"key must be a single key or one per problem: {key.shape=}, {batch_shape=}")


def _accumulation_dtype(dtype) -> jnp.dtype:
  return jnp.promote_types(dtype, jnp.float32)


def _squared_norms(x: jax.Array) -> jax.Array:
  """x: [..., d] -> [...] squared norms in the accumulation dtype."""
  x32 = x.astype(_accumulation_dtype(x.dtype))
  return jnp.sum(x32 * x32, axis=-1)


def _half_distance_scores(x: jax.Array, centroids: jax.Array,
                          row_scale: jax.Array | None = None) -> jax.Array:
  """|c|^2 - 2 s x.c for x [n, d], centroids [k, d], row scales s [n] (default 1) -> [n, k].

  The centroids are rounded to x's dtype first and |c|^2 is that of the rounded centroids, so
  |s x|^2 + result is the squared distance of s x to the rounded centroids. float32 accumulation.
  """
  low = centroids.astype(x.dtype)
  dots = jnp.einsum("nd,kd->nk", x, low, preferred_element_type=_accumulation_dtype(x.dtype))
  if row_scale is not None:
    dots = row_scale[:, None] * dots
  return _squared_norms(low)[None, :] - 2.0 * dots


def _assign(x: jax.Array, x_sq: jax.Array,
            centroids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Nearest centroid of each point. x: [n, d], x_sq: [n], centroids: [k, d].

  Returns labels [n] int32 and squared distances [n] (clamped at 0).
  """
  scores = _half_distance_scores(x, centroids)
  labels = jnp.argmin(scores, axis=-1).astype(jnp.int32)
  return labels, jnp.maximum(x_sq + jnp.min(scores, axis=-1), 0.0)


def _one_hot_sums(x: jax.Array, labels: jax.Array,
                  num_clusters: int) -> tuple[jax.Array, jax.Array]:
  """x: [n, d], labels: [n] (outside [0, K) ignored) -> sums [K, d] float32, counts [K] int32."""
  one_hot = labels[:, None] == jnp.arange(num_clusters, dtype=labels.dtype)[None, :]
  sums = jnp.einsum("nk,nd->kd", one_hot.astype(x.dtype), x,
                    preferred_element_type=_accumulation_dtype(x.dtype))
  return sums, jnp.sum(one_hot, axis=0, dtype=jnp.int32)


def _chunked(x: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """x: [N, ...] -> (chunks [C, chunk, ...] zero-padded, valid [C, chunk] bool), chunk <= N."""
  num_points = x.shape[0]
  chunk = min(chunk_size, num_points)
  num_chunks = -(-num_points // chunk)
  padding = num_chunks * chunk - num_points
  if padding:
    x = jnp.pad(x, [(0, padding)] + [(0, 0)] * (x.ndim - 1))
  valid = (jnp.arange(num_chunks * chunk) < num_points).reshape(num_chunks, chunk)
  return x.reshape(num_chunks, chunk, *x.shape[1:]), valid


def _seed_kmeans_plus_plus(points: jax.Array, key: jax.Array, *, num_clusters: int,
                           sample_size: int, seeding_steps: int, num_local_trials: int,
                           spherical: bool, chunk_size: int) -> jax.Array:
  """Greedy k-means++ seeds for one problem, several per step. points: [N, d] -> [K, d] float32.

  Works on a sample (all points, or `sample_size` of them drawn without replacement). The first
  seed is a uniform random sample point; each of at most `seeding_steps` steps then adds
  ceil((K - 1) / seeding_steps) seeds. Each new seed is the best of `num_local_trials` candidates
  drawn with probability proportional to the squared distance to the nearest seed so far (D^2
  sampling), best meaning the lowest sample potential (sum of those squared distances) once added.
  With one seed per step this is scikit-learn's greedy k-means++; with several, the seeds of a
  step are chosen independently of each other (as in k-means||, Bahmani et al. 2012). Candidate
  potentials are accumulated over `chunk_size` sample points at a time. Spherical distances use
  the normalised points without materialising them.
  """
  sample_key, first_key, draw_key = jax.random.split(key, 3)
  num_points, dim = points.shape
  if sample_size < num_points:
    points = points[jax.random.choice(sample_key, num_points, (sample_size,), replace=False)]
  chunks, valid = _chunked(points, chunk_size)
  flat = chunks.reshape(-1, dim)
  dtype = _accumulation_dtype(points.dtype)
  row_scale = _row_scale(flat) if spherical else jnp.ones(flat.shape[:1], dtype)
  flat_sq = _squared_norms(flat) * row_scale**2

  def distances(seeds, x, x_sq, x_scale):  # seeds [..., d], x [n, d] -> [n, ...]
    scores = _half_distance_scores(x, seeds.reshape(-1, dim), x_scale)
    return jnp.maximum(x_sq[:, None] + scores, 0.0).reshape(-1, *seeds.shape[:-1])

  def as_seeds(rows: jax.Array) -> jax.Array:  # [...] row indices -> [..., d] float32 seeds
    return flat[rows].astype(dtype) * row_scale[rows][..., None]

  def potentials(candidates, closest):  # [b, t, d], [n] -> [b, t] sample potential of each
    per_chunk = [a.reshape(valid.shape) for a in (flat_sq, row_scale, closest)]

    def add_chunk(j, total):  # indexing (not scanning) keeps vmap from transposing the sample
      x_sq, x_scale, x_closest = (a[j] for a in per_chunk)
      d2 = distances(candidates, chunks[j], x_sq, x_scale)
      return total + jnp.sum(jnp.minimum(x_closest[:, None, None], d2), axis=0)

    return lax.fori_loop(0, valid.shape[0], add_chunk, jnp.zeros(candidates.shape[:-1], dtype))

  per_step = -(-(num_clusters - 1) // seeding_steps) if num_clusters > 1 else 1
  num_steps = -(-(num_clusters - 1) // per_step)
  first = as_seeds(jax.random.randint(first_key, (1,), 0, points.shape[0]))
  seeds = jnp.zeros((1 + num_steps * per_step, dim), dtype).at[:1].set(first)
  # Padding rows get distance 0 once and for all: never drawn, never counted.
  closest = jnp.where(valid.reshape(-1), distances(first, flat, flat_sq, row_scale)[:, 0], 0.0)

  def add_seeds(i, carry):
    seeds, closest = carry
    cumulative = jnp.cumsum(closest)
    targets = jax.random.uniform(jax.random.fold_in(draw_key, i),
                                 (per_step, num_local_trials)) * cumulative[-1]
    rows = jnp.minimum(jnp.searchsorted(cumulative, targets, side="right"), flat.shape[0] - 1)
    candidates = as_seeds(rows)  # [per_step, trials, d]
    best = jnp.argmin(potentials(candidates, closest), axis=-1)  # [per_step]
    new = jnp.take_along_axis(candidates, best[:, None, None], axis=1)[:, 0]
    seeds = lax.dynamic_update_slice_in_dim(seeds, new, 1 + i * per_step, axis=0)
    return seeds, jnp.minimum(closest, jnp.min(distances(new, flat, flat_sq, row_scale), axis=1))

  seeds, _ = lax.fori_loop(0, num_steps, add_seeds, (seeds, closest))
  return seeds[:num_clusters]


def _row_scale(x: jax.Array) -> jax.Array:
  """x: [..., d] -> [...] factors 1 / |x| that normalise the rows (0 for zero rows)."""
  norms = jnp.sqrt(_squared_norms(x))
  return jnp.where(norms > 0, 1.0 / jnp.maximum(norms, jnp.finfo(norms.dtype).tiny), 0.0)


def _renormalized(centroids: jax.Array, spherical: bool) -> jax.Array:
  return _l2_normalize(centroids) if spherical else centroids


def _minibatch_updates(points: jax.Array, centroids: jax.Array, key: jax.Array, *,
                       minibatch_size: int, num_steps: int, spherical: bool) -> jax.Array:
  """Sculley's mini-batch K-means on one problem. points: [N, d], centroids: [K, d] f32.

  Each centre keeps the number v of points it has received; a step adds the batch's points
  assigned to it with learning rate 1 / v, i.e. the centre is the running mean of its points.
  """
  num_clusters = centroids.shape[0]

  def step(i, carry):
    centroids, received = carry
    batch = points[jax.random.randint(jax.random.fold_in(key, i), (minibatch_size,), 0,
                                      points.shape[0])]
    labels, _ = _assign(batch, _squared_norms(batch), centroids)
    sums, counts = _one_hot_sums(batch, labels, num_clusters)
    received = received + counts
    rate = 1.0 / jnp.maximum(received, 1).astype(centroids.dtype)
    centroids = centroids + (sums - counts[:, None] * centroids) * rate[:, None]
    return _renormalized(centroids, spherical), received

  init = (centroids, jnp.zeros((num_clusters,), jnp.int32))
  return lax.fori_loop(0, num_steps, step, init)[0]


class _LloydState(NamedTuple):
  iteration: jax.Array  # [] int32
  active: jax.Array  # [] bool
  centroids: jax.Array  # [K, d]
  labels: jax.Array  # [N_padded] int32
  counts: jax.Array  # [K] int32
  inertia: jax.Array  # []


def _lloyd(chunks: jax.Array, valid: jax.Array, centroids: jax.Array, *, max_iters: int,
           tol: float, spherical: bool) -> _LloydState:
  """Lloyd steps on one problem. chunks: [C, chunk, d], valid: [C, chunk], centroids: [K, d].

  A step assigns every point to its nearest centroid, then moves each centroid to the mean of
  its points (re-seeding empty ones). On the last step (converged or max_iters) the centroids
  are not moved, so the returned labels / counts / inertia belong to the returned centroids.
  """
  num_clusters = centroids.shape[0]
  chunk_sq = _squared_norms(chunks)
  flat = chunks.reshape(-1, chunks.shape[-1])

  def assignment_pass(centroids):
    def step(carry, xs):
      x, x_sq, ok = xs
      labels, distances = _assign(x, x_sq, centroids)
      sums, counts = _one_hot_sums(x, jnp.where(ok, labels, num_clusters), num_clusters)
      return (carry[0] + sums, carry[1] + counts), (labels, jnp.where(ok, distances, 0.0))

    init = (jnp.zeros_like(centroids), jnp.zeros((num_clusters,), jnp.int32))
    (sums, counts), (labels, distances) = lax.scan(step, init, (chunks, chunk_sq, valid))
    return sums, counts, labels.reshape(-1), distances.reshape(-1)

  def body(state: _LloydState) -> _LloydState:
    sums, counts, labels, distances = assignment_pass(state.centroids)
    inertia = jnp.sum(distances)
    converged = jnp.abs(state.inertia - inertia) <= tol * inertia
    stop = converged | (state.iteration + 1 >= max_iters)
    moved = _updated_centroids(state.centroids, sums, counts, distances, flat, spherical)
    return _LloydState(state.iteration + 1, ~stop,
                       jnp.where(stop, state.centroids, moved), labels, counts, inertia)

  init = _LloydState(jnp.int32(0), jnp.bool_(True), centroids,
                     jnp.zeros((flat.shape[0],), jnp.int32),
                     jnp.zeros((num_clusters,), jnp.int32),
                     jnp.array(jnp.inf, centroids.dtype))
  return lax.while_loop(lambda s: s.active, body, init)


def _updated_centroids(centroids: jax.Array, sums: jax.Array, counts: jax.Array,
                       distances: jax.Array, points: jax.Array, spherical: bool) -> jax.Array:
  """Cluster means; empty clusters re-seeded at the farthest points (distance > 0) or kept.

  centroids, sums: [K, d]; counts: [K]; distances: [N] (each point to its centroid); points: [N, d].
  """
  num_clusters = centroids.shape[0]
  means = sums / jnp.maximum(counts, 1)[:, None].astype(sums.dtype)
  updated = jnp.where(counts[:, None] > 0, means, centroids)
  num_reseeds = min(_MAX_RESEEDS_PER_STEP, num_clusters, distances.shape[0])
  far_distances, far_points = lax.top_k(distances, num_reseeds)
  empty = counts == 0
  rank = jnp.clip(jnp.cumsum(empty) - 1, 0, num_reseeds - 1)
  reseed = empty & (jnp.cumsum(empty) <= num_reseeds) & (far_distances[rank] > 0)
  updated = jnp.where(reseed[:, None], points[far_points[rank]].astype(updated.dtype), updated)
  return _renormalized(updated, spherical)


def _refine(points: jax.Array, seeds: jax.Array, key: jax.Array, *, spherical: bool,
            minibatch_size: int, num_minibatch_steps: int, max_iters: int, tol: float,
            chunk_size: int) -> KMeansResult:
  """Mini-batch then Lloyd phases for one problem. points: [N, d], seeds: [K, d] f32."""
  num_points = points.shape[0]
  if spherical:
    points = _l2_normalize(points)
  centroids = _minibatch_updates(points, seeds, key, minibatch_size=minibatch_size,
                                 num_steps=num_minibatch_steps, spherical=spherical)
  chunks, valid = _chunked(points, chunk_size)
  state = _lloyd(chunks, valid, centroids, max_iters=max_iters, tol=tol, spherical=spherical)
  return KMeansResult(state.centroids, state.labels[:num_points], state.counts, state.inertia,
                      state.iteration)
