"""Looking inside one question's lookup: what it selects per layer, and what each method captures.

    queries = question_queries(model, ctx, question_ids)          # [L, T, Hq, D]
    selection = select_for_question(ctx, queries, percentile=0.7)  # per layer and KV head
    curves = mass_vs_budget(ctx, queries, layer=2, budgets=[0.05, 0.1, 0.2, 0.4])

The queries are those of the question's tokens placed right after the context under dense
attention (the model's own queries, before any pruning changes later layers' inputs). The mass
curves run each method's own selection (`attention_methods.context_attention`, the code
`generate` runs) at fixed key budgets and report, per KV head, the KV budget it read (summaries
included) and the share of the clustered part's attention mass on the keys it attended.
`plot_mass_vs_budget` and `plot_selection` draw both with matplotlib.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from models.llama import Llama
from squeezed_jax.attention_methods import MethodConfig, context_attention
from squeezed_jax.context_layers import ContextLayer, split_layers
from squeezed_jax.context_prefill import prefill_context
from squeezed_jax.fixed_context import FixedContext
from squeezed_jax.kv_budget import BudgetStats, LookupUsage, budget_fractions
from squeezed_jax.online import resolve_method

CURVE_METHODS = ("squeezed", "quest", "oracle_topk", "streaming")
DEFAULT_CURVE_METHODS = ("squeezed", "quest", "oracle_topk")


class ClusterSelection(NamedTuple):
  """One question's lookup at every layer, for a context of K clusters over S' keys.

  scores: [L, Hkv, K] float32 sbar (mean over the question's tokens, max over the GQA group).
  clusters: [L, Hkv, K] bool, clusters selected.
  keys: [L, Hkv, S'] bool, keys selected, in original context order (key i = context token i).
  """

  scores: np.ndarray
  clusters: np.ndarray
  keys: np.ndarray


class MassCurve(NamedTuple):
  """One method at N key budgets on one layer; every field is [Hkv, N].

  kv_budget: fraction of the clustered part's KV bytes read, summaries (centroids, page bounds)
    included, as `Answers.kv_budget`.
  rows_fraction: fraction of the clustered keys attended.
  mass: share of the clustered part's attention mass on the attended keys (mean over the
    question's tokens and the KV head's GQA group), as `Answers.attention_mass`.
  """

  kv_budget: np.ndarray
  rows_fraction: np.ndarray
  mass: np.ndarray


def question_queries(model: Llama, ctx: FixedContext, question: Sequence[int]) -> jax.Array:
  """Post-RoPE queries [L, T, Hq, D] float32 of the T question tokens placed after the context.

  Runs the model densely over context + question (one prefill, in ctx's prefill chunks).
  """
  ctx.check_model(model)
  if not question:
    raise ValueError("the question has no tokens")
  token_ids = np.asarray(ctx.token_ids).tolist() + list(question)
  prefilled = prefill_context(model, token_ids, window=len(question),
                              chunk_size=ctx.config.prefill_chunk)
  return prefilled.window_queries


def select_for_question(ctx: FixedContext, queries: jax.Array, *,
                        percentile: float | None = None,
                        kv_budget: float | None = None) -> ClusterSelection:
  """The clusters and keys one question's tokens select at every layer (one lookup each).

  queries: [L, T, Hq, D] from `question_queries`. Give exactly one of `percentile` (the
  calibrated threshold) and `kv_budget` (top clusters within that fraction of the KV bytes,
  centroids included, as `generate(kv_budget=)`).
  """
  if (percentile is None) == (kv_budget is None):
    raise ValueError(f"give exactly one of {percentile=} and {kv_budget=}")
  _check_queries(ctx, queries)
  clusters = ctx.clusters
  scores, selected = _lookup_every_layer(
      queries, clusters.centroids, clusters.counts, clusters.offsets,
      None if percentile is None else ctx.threshold(percentile),
      key_budget=None if kv_budget is None else resolve_method(
          ctx, "squeezed", kv_budget=kv_budget)[0].key_budget)
  scores, selected = np.asarray(scores), np.asarray(selected)
  keys = np.take_along_axis(selected, np.asarray(clusters.labels), axis=-1)
  return ClusterSelection(scores=scores, clusters=selected, keys=keys)


@functools.partial(jax.jit, static_argnames=("key_budget",))
def _lookup_every_layer(queries: jax.Array, centroids: jax.Array, counts: jax.Array,
                        offsets: jax.Array, threshold: jax.Array | None,
                        key_budget: int | None) -> tuple[jax.Array, jax.Array]:
  """The lookup of `pallas_kernels` at every layer: (sbar [L, Hkv, K], kept [L, Hkv, K] bool).

  queries: [L, T, Hq, D]; centroids, counts, offsets: [L, Hkv, K, D], [L, Hkv, K], [L, Hkv, K + 1].
  """

  def lookup(q, layer_centroids, layer_counts, layer_offsets):
    scores = pallas_kernels.centroid_scores(q[None], layer_centroids, layer_counts,
                                            backend="xla")
    # The kept clusters do not depend on the row capacity: one row is enough.
    selection = pallas_kernels.select_clusters(scores, layer_counts, layer_offsets,
                                               max_rows=key_budget or 1,
                                               threshold=threshold, key_budget=key_budget)
    return scores[0], selection.clusters[0]

  return jax.vmap(lookup)(queries, centroids, counts, offsets)


def mass_vs_budget(ctx: FixedContext, queries: jax.Array, *, layer: int,
                   budgets: Sequence[float], methods: Sequence[str] = DEFAULT_CURVE_METHODS,
                   page_size: int = 16, sinks: int = 4) -> dict[str, MassCurve]:
  """Each method's selection at each key budget on one layer, with the attention mass it keeps.

  queries: [L, T, Hq, D] from `question_queries`; budgets: fractions of the S' clustered keys
  each method attends (its rows; unlike `generate(kv_budget=)`, summaries not included: each
  curve's `kv_budget` is the total, summaries included); the squeezed method keeps its top
  clusters within the budget;
  methods: names from CURVE_METHODS. Returns {method: MassCurve ([Hkv, len(budgets)] fields)}.
  All methods and budgets run in one compiled program, on the XLA path of every platform.
  """
  _check_queries(ctx, queries)
  if not 0 <= layer < ctx.num_layers:
    raise ValueError(f"{layer=} must be in [0, {ctx.num_layers=})")
  unknown = sorted(set(methods) - set(CURVE_METHODS))
  if unknown:
    raise ValueError(f"methods {unknown} must be among {CURVE_METHODS}")
  num_keys = ctx.num_clustered
  key_budgets = [_key_budget(budget, num_keys) for budget in budgets]
  configs = tuple(
      MethodConfig(method, max_rows=key_budget if method == "squeezed" else None,
                   key_budget=key_budget, page_size=page_size, sinks=sinks, measure_mass=True,
                   backend="xla")
      for method in methods for key_budget in key_budgets)
  context_layer = split_layers(ctx, page_size=page_size if "quest" in methods else None)[layer]
  usages = _lookup_usages(queries[layer][None], context_layer, configs=configs)
  num_kv_heads = context_layer.keys.shape[0]
  fractions = [budget_fractions(BudgetStats.zeros(1, num_kv_heads).add(usage, jnp.ones(1, bool)),
                                num_keys) for usage in usages]
  curves = {}
  for index, method in enumerate(methods):
    per_budget = fractions[index * len(budgets):(index + 1) * len(budgets)]
    stack = lambda name: np.stack([np.asarray(f[name][0]) for f in per_budget], axis=-1)
    curves[method] = MassCurve(kv_budget=stack("kv_budget"),
                               rows_fraction=stack("rows_fraction"),
                               mass=stack("attention_mass"))
  return curves


@functools.partial(jax.jit, static_argnames=("configs",))
def _lookup_usages(q: jax.Array, layer: ContextLayer,
                   configs: tuple[MethodConfig, ...]) -> list[LookupUsage]:
  """What one lookup of the query block q [1, T, Hq, D] reads and captures, per config."""
  query_mask = jnp.ones(q.shape[:2], bool)
  return [context_attention(config, q, layer, query_mask)[2] for config in configs]


def plot_mass_vs_budget(curves: dict[str, MassCurve], *, kv_head: int, ax: Any = None,
                        title: str | None = None) -> Any:
  """Attention mass captured vs KV budget of one KV head, one line per method; returns the axes."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  num_kv_heads = next(iter(curves.values())).mass.shape[0]
  if not 0 <= kv_head < num_kv_heads:
    raise ValueError(f"{kv_head=} must be in [0, {num_kv_heads=})")
  if ax is None:
    _, ax = plt.subplots(figsize=(5.5, 4))
  for method, curve in curves.items():
    ax.plot(curve.kv_budget[kv_head], curve.mass[kv_head], marker="o", label=method)
  ax.set_xlabel("KV budget (fraction of KV bytes read, summaries included)")
  ax.set_ylabel("attention mass captured")
  ax.set_ylim(0.0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title(title or f"KV head {kv_head}")
  return ax


def plot_selection(selection: ClusterSelection, *, ax: Any = None,
                   title: str | None = None) -> Any:
  """Heat map of the selected keys: one row per (layer, KV head), one column per context
  position; each row is labelled with its selected fraction. Returns the axes."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  num_layers, num_kv_heads, num_keys = selection.keys.shape
  if ax is None:
    _, ax = plt.subplots(figsize=(10, 0.25 * num_layers * num_kv_heads + 1.5))
  rows = selection.keys.reshape(num_layers * num_kv_heads, num_keys)
  ax.imshow(rows, aspect="auto", interpolation="nearest", cmap="Greys", vmin=0, vmax=1)
  ax.set_yticks(np.arange(rows.shape[0]))
  ax.set_yticklabels([f"layer {l} head {h}: {rows[l * num_kv_heads + h].mean():.0%}"
                      for l in range(num_layers) for h in range(num_kv_heads)], fontsize=7)
  ax.set_xlabel("context position (clustered part; dark = selected)")
  ax.set_title(title or "keys selected per layer and KV head")
  return ax


def _key_budget(fraction: float, num_keys: int) -> int:
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"budget {fraction=} must be in (0, 1]")
  return max(1, round(fraction * num_keys))


def _check_queries(ctx: FixedContext, queries: jax.Array) -> None:
  num_heads = ctx.model_config.num_heads
  if (queries.ndim != 4 or queries.shape[0] != ctx.num_layers
      or queries.shape[2] != num_heads):
    raise ValueError(f"queries must be [L={ctx.num_layers}, T, Hq={num_heads}, D], got "
                     f"{queries.shape=}")
