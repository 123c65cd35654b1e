"""Writes notebooks/quickstart.ipynb and notebooks/gpu_benchmark.ipynb from the cells below.

    python notebooks/build_notebooks.py          # rewrite both notebooks (outputs cleared)

Edit the cells here, not in the .ipynb files: tests/test_notebooks.py fails when a committed
notebook differs from what this script writes, and executes the quickstart top to bottom.
"""

from __future__ import annotations

import os
import sys

import nbformat

NOTEBOOKS_DIR = os.path.dirname(os.path.abspath(__file__))
# Where the setup cell clones the project from when it is not installed (e.g. on Colab).
REPOSITORY_URL = "https://github.com/squeezed-jax/squeezed-jax"
COLAB_URL = ("https://colab.research.google.com/github/squeezed-jax/squeezed-jax/blob/main/"
             "notebooks/{name}")

_SETUP = '''\
# Setup: find the squeezed-jax checkout (or, on Colab, clone and install it).
import importlib.util
import os
import pathlib
import subprocess
import sys

REPOSITORY_URL = "{repository}"


def find_checkout(start: pathlib.Path) -> pathlib.Path | None:
  """The nearest directory at or above `start` holding squeezed_jax/ and assets/."""
  for directory in (start, *start.parents):
    if (directory / "squeezed_jax").is_dir() and (directory / "assets").is_dir():
      return directory
  return None


ROOT = find_checkout(pathlib.Path.cwd())
if ROOT is None and importlib.util.find_spec("squeezed_jax") is not None:  # pip install -e
  ROOT = find_checkout(pathlib.Path(importlib.util.find_spec("squeezed_jax").origin).parent)
if ROOT is None:  # Colab or a bare kernel: clone, then install the dependencies
  ROOT = pathlib.Path("squeezed-jax").resolve()
  if not ROOT.exists():
    subprocess.run(["git", "clone", "--depth=1", REPOSITORY_URL, str(ROOT)], check=True)
  packages = ["-e", f"{{ROOT}}{extras}"{requirements}]
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", *packages], check=True)
os.chdir(ROOT)
sys.path.insert(0, str(ROOT))  # a fresh editable install is not on this kernel's path yet
print("squeezed-jax checkout:", ROOT)
'''

_CONTEXT_TEXT = ('"Once upon a time, there was a little girl named Lily. She loved to play outside '
                 'in the park with her big red ball. One day, Lily saw a small dog under a tree. '
                 'The dog was sad because it was lost. Lily wanted to help the dog find its home. '
                 'She asked her mom, and her mom said they could look together. They walked '
                 'around the park and asked everyone they met. "')


def setup_cell(extras: str, *requirements: str) -> str:
  """The first code cell of every notebook.

  extras: pip extras of the package, such as "[gpu]"; requirements: more pip requirements
  installed with it (a CUDA build of jax, so that pip's upgrade of jax keeps its GPU plugin).
  """
  return _SETUP.format(repository=REPOSITORY_URL, extras=extras,
                       requirements="".join(f', "{r}"' for r in requirements))


def colab_badge(name: str) -> str:
  return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
          f"({COLAB_URL.format(name=name)})")


QUICKSTART = [
    ("markdown", f"""\
# Squeezed Attention in five minutes (CPU)

{colab_badge("quickstart.ipynb")}

A long **fixed context** (a document) is processed once: its KV cache is kept, the keys of every
layer and KV head are clustered, and thresholds are calibrated. Each **question** then compares its
queries with the cluster centroids, reads only the keys of the clusters that matter, and attends to
them exactly. This notebook does all of it with the 260K-parameter `stories260K` model that ships
with the repository (it runs on a CPU), then looks inside: the KV budget each layer read, the
clusters a question selects, and how much attention mass each method keeps at a given budget.
See `docs/method.md` for the method and `docs/api.md` for the API."""),
    ("code", setup_cell("")),
    ("markdown", """\
## 1. The model

`load_checkpoint` reads a llama2.c `.bin` file or a Hugging Face LLaMA directory
(`docs/hf_checkpoints.md`) into the Flax NNX LLaMA of `models/llama`."""),
    ("code", """\
import time

import matplotlib.pyplot as plt
import numpy as np

import squeezed_jax
from models.llama.checkpoint import load_checkpoint
from models.llama.tokenizer import load_tokenizer
from squeezed_jax import ContextConfig, FixedContext, MethodOptions, SamplingParams, inspection

model, config = load_checkpoint("assets/stories260K/stories260K.bin")
tokenizer = load_tokenizer("assets/stories260K/tok512.bin")
print(f"{config.num_layers} layers, {config.num_heads} query heads, {config.num_kv_heads} KV heads, "
      f"head_dim {config.head_dim}, {config.max_position_embeddings} positions")"""),
    ("markdown", """\
## 2. A fixed context, processed once

The model only knows 512 positions, so the context is a short story of about 400 tokens. Its
last `observation_window` tokens are not clustered: they are always attended, and their queries
calibrate one threshold per percentile (the fraction of keys to prune). The other
S' = S - W keys of each (layer, KV head) are clustered into ceil(5% S') clusters by spherical
K-means; progress bars show the prefill and the clustering."""),
    ("code", f"""\
story = {_CONTEXT_TEXT} * 3
context_ids = tokenizer.encode(story, bos=True)
context_config = ContextConfig(percent_clusters=5.0, observation_window=32, prefill_chunk=128)
started = time.perf_counter()
ctx = FixedContext.build(model, context_ids, context_config)
print(f"built in {{time.perf_counter() - started:.1f}} s: S = {{ctx.num_tokens}} tokens, "
      f"S' = {{ctx.num_clustered}} clustered keys per (layer, KV head), "
      f"K = {{ctx.clusters.counts.shape[-1]}} clusters")
for p, tau, kept in zip(context_config.percentiles, np.asarray(ctx.thresholds),
                        np.asarray(ctx.kept_fraction).mean(axis=(1, 2))):
  print(f"  percentile {{p}}: threshold {{tau:.2e}}, keys above it in the calibration window "
        f"{{kept:.1%}}")

artifact = os.path.abspath("out/quickstart_context")
ctx.save(artifact)  # atomic; FixedContext.load checks every array's checksum and the model
ctx = FixedContext.load(artifact, model=model)
print("saved and reloaded the fixed context:", artifact)"""),
    ("markdown", """\
## 3. Questions: dense vs squeezed attention

`squeezed_jax.generate` places each question right after the context and answers the batch
together. `method="dense"` reads every key of the context; `method="squeezed"` with
`percentile=0.7` keeps the clusters whose score is above the threshold that pruned 70% of the keys
during calibration. `MethodOptions(measure_mass=True)` also measures the share of the attention
mass that the attended keys carry (a dense pass per lookup: for inspection, not speed)."""),
    ("code", """\
questions = [" Lily and the dog", " One day, Lily saw a"]
question_ids = [tokenizer.encode(q, bos=False) for q in questions]
greedy = SamplingParams(temperature=0.0)
options = MethodOptions(measure_mass=True)
answers = {
    "dense": squeezed_jax.generate(model, ctx, question_ids, method="dense", max_new_tokens=32,
                                   sampling=greedy, options=options),
    "squeezed": squeezed_jax.generate(model, ctx, question_ids, method="squeezed",
                                      percentile=0.7, max_new_tokens=32, sampling=greedy,
                                      options=options),
}
for index, question in enumerate(questions):
  print(f"Q: {question!r}")
  for method, result in answers.items():
    print(f"  {method:8s} (KV budget {result.kv_budget[index].mean():.2f}, "
          f"mass {result.attention_mass[index].mean():.3f}): "
          f"{tokenizer.decode(result.token_ids[index])!r}")"""),
    ("markdown", """\
## 4. The KV budget, per layer and KV head

`Answers.kv_budget` is [question, layer, KV head]: the fraction of the clustered context's KV
bytes that a lookup read, centroids included (a centroid stores a key only, so it costs half a
row). With a calibrated threshold every head keeps a different number of keys."""),
    ("code", """\
squeezed = answers["squeezed"]
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
for ax, (name, values) in zip(axes, (("KV budget", squeezed.kv_budget[0]),
                                     ("attention mass captured", squeezed.attention_mass[0]))):
  image = ax.imshow(values, cmap="viridis", vmin=0, vmax=1)
  ax.set_xlabel("KV head")
  ax.set_ylabel("layer")
  ax.set_title(f"{name} (question 0)")
  for (layer, head), value in np.ndenumerate(values):
    ax.text(head, layer, f"{value:.2f}", ha="center", va="center", color="w", fontsize=8)
fig.colorbar(image, ax=axes)
plt.show()
print(f"mean KV budget {squeezed.mean_kv_budget:.3f}, truncated lookups "
      f"{int(squeezed.overflows.sum())}")"""),
    ("markdown", """\
## 5. Which keys does a question select?

`inspection.question_queries` runs the model over context + question and returns the question's
queries at every layer ([L, T, Hq, D]); `inspection.select_for_question` does the lookup of each
layer with them: the score of every cluster (mean over the question's tokens, max over the query
heads that share a KV head), the clusters above the threshold, and the keys they hold, in context
order. Each row of the heat map is one (layer, KV head); dark columns are the context positions
it reads."""),
    ("code", """\
queries = inspection.question_queries(model, ctx, question_ids[0])
selection = inspection.select_for_question(ctx, queries, percentile=0.7)
print("clusters selected per layer (of", selection.clusters.shape[-1], "per KV head):",
      selection.clusters.sum(axis=-1).tolist())
ax = inspection.plot_selection(selection, title=f"keys selected by {questions[0]!r} at p = 0.7")
ax.figure.tight_layout()
plt.show()"""),
    ("markdown", """\
## 6. Attention mass captured vs KV budget

At equal budgets: squeezed (top clusters within the budget, lookup over centroids), Quest (pages
of 16 keys ranked by an upper bound from each page's key minima and maxima) and the oracle (the
keys with the highest true attention weight: an upper bound no selection can beat). The x axis
counts what each method reads, summaries included (centroids for squeezed, page minima and maxima
for Quest), so Quest starts above 1/16 and squeezed above 2.5%. A budget smaller than the
clusters it would take selects fewer keys (a cluster is taken whole or not at all)."""),
    ("code", """\
budgets = [0.05, 0.1, 0.15, 0.2, 0.3, 0.5]
layer = config.num_layers // 2
curves = inspection.mass_vs_budget(ctx, queries, layer=layer, budgets=budgets)
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for ax, kv_head in zip(axes, (0, 1)):
  inspection.plot_mass_vs_budget(curves, kv_head=kv_head, ax=ax,
                                 title=f"layer {layer}, KV head {kv_head}")
fig.tight_layout()
plt.show()"""),
    ("markdown", """\
## Where next

* The same from the command line: `python -m experiments.build_context` then
  `python -m experiments.generate --context_dir=...` (every flag: `docs/cli.md`).
* A real LLaMA checkpoint from a local Hugging Face directory: `docs/hf_checkpoints.md`.
* Speed on a GPU: `notebooks/gpu_benchmark.ipynb` and `benchmarks/RESULTS.md`."""),
]

GPU_BENCHMARK = [
    ("markdown", f"""\
# Squeezed Attention kernels on a GPU: speed-up vs context length and budget

{colab_badge("gpu_benchmark.ipynb")}

Runs `experiments/bench_attention.py` (lookup + selection + block-sparse attention, Pallas GPU
kernels through the Triton lowering, against dense `jax.nn.dot_product_attention` with cuDNN) and
plots the speed-up. Needs a GPU runtime (on Colab: Runtime > Change runtime type > GPU) and a
CUDA build of jax. The reference numbers on an H200 are in `benchmarks/RESULTS.md`; a smaller GPU
needs shorter contexts (the K/V of one 128K-token layer at 32 heads is 2 GiB in bf16, and the
benchmark holds two sets)."""),
    ("code", setup_cell("[gpu]", "jax[cuda12]>=0.10.2")),
    ("code", """\
import json

import jax
import matplotlib.pyplot as plt

print(jax.__version__, jax.devices())
if jax.default_backend() != "gpu":
  raise RuntimeError(f"this notebook needs a GPU runtime; jax runs on {jax.default_backend()!r}")"""),
    ("markdown", """\
## Run the benchmark

One process, one JSON report (`--out`). Each case times, after warm-up, the median of repeated
loops of 20 calls. Shorten `SEQ_LENS` on a small GPU."""),
    ("code", """\
SEQ_LENS = [8192, 32768, 131072]
BUDGETS = [0.125, 0.25]
CASES = ["decode1", "decode8", "prefill512"]
REPORT = os.path.abspath("out/gpu_benchmark.json")
os.makedirs(os.path.dirname(REPORT), exist_ok=True)
command = [sys.executable, "-m", "experiments.bench_attention",
           f"--seq_lens={','.join(map(str, SEQ_LENS))}",
           f"--budgets={','.join(map(str, BUDGETS))}", f"--cases={','.join(CASES)}",
           f"--out={REPORT}"]
print(" ".join(command))
subprocess.run(command, check=True)
print("wrote", REPORT)"""),
    ("markdown", """\
## Speed-up over dense attention

`total` is one call of `pallas_kernels.squeezed_lookup_attention` (centroid lookup, selection,
sparse attention over the selected rows and the observation window); the dense baseline reads
every key of the context."""),
    ("code", """\
with open(REPORT) as f:
  rows = json.load(f)["cases"]
fig, axes = plt.subplots(1, len(CASES), figsize=(4.5 * len(CASES), 3.8), sharey=True)
for ax, case in zip(axes, CASES):
  for budget in BUDGETS:
    points = sorted((r["seq_len"], r["speedup_total_vs_cudnn"]) for r in rows
                    if r["case"] == case and r["budget"] == budget
                    and r["speedup_total_vs_cudnn"] is not None)
    ax.plot(*zip(*points), marker="o", label=f"budget {budget:.1%}")
  ax.axhline(1.0, color="gray", linewidth=0.8)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("fixed-context tokens S")
  ax.set_title(case)
  ax.grid(alpha=0.3)
axes[0].set_ylabel("speed-up vs dense cuDNN")
axes[0].legend()
fig.tight_layout()
plt.show()"""),
    ("code", """\
fig, ax = plt.subplots(figsize=(5.5, 3.8))
longest = max(SEQ_LENS)
for case in CASES:
  points = sorted((r["budget"], r["speedup_total_vs_cudnn"]) for r in rows
                  if r["case"] == case and r["seq_len"] == longest
                  and r["speedup_total_vs_cudnn"] is not None)
  ax.plot(*zip(*points), marker="o", label=case)
ax.axhline(1.0, color="gray", linewidth=0.8)
ax.set_xlabel("KV budget (fraction of the context's keys read)")
ax.set_ylabel("speed-up vs dense cuDNN")
ax.set_title(f"S = {longest}")
ax.grid(alpha=0.3)
ax.legend()
plt.show()"""),
]

NOTEBOOKS = {"quickstart.ipynb": QUICKSTART, "gpu_benchmark.ipynb": GPU_BENCHMARK}


def build(cells: list[tuple[str, str]], stem: str) -> nbformat.NotebookNode:
  """A notebook of (kind, source) cells with stable cell ids and no outputs."""
  makers = {"markdown": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
  notebook = nbformat.v4.new_notebook(cells=[
      makers[kind](source, id=f"{stem}-{index:02d}") for index, (kind, source) in enumerate(cells)])
  notebook.metadata.update({
      "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
      "language_info": {"name": "python"},
  })
  nbformat.validate(notebook)
  return notebook


def render(name: str) -> str:
  """The text of notebooks/<name> as this script writes it."""
  return nbformat.writes(build(NOTEBOOKS[name], name.removesuffix(".ipynb"))) + "\n"


def main() -> None:
  for name in NOTEBOOKS:
    path = os.path.join(NOTEBOOKS_DIR, name)
    with open(path, "w", encoding="utf-8") as f:
      f.write(render(name))
    print(f"wrote {path}")


if __name__ == "__main__":
  sys.exit(main())
