"""Pictures of one question's lookup against a built fixed context (squeezed_jax.inspection).

Writes to --output_dir: selected_keys.png (the keys each layer and KV head selects at
--percentile, in context order), mass_vs_budget.png (attention mass captured vs KV budget on
--layer / --kv_head for squeezed, quest and oracle_topk) and inspection.json (the numbers of both).

  python -m experiments.inspect_question --checkpoint=assets/stories260K/stories260K.bin \
      --tokenizer=assets/stories260K/tok512.bin --context_dir=/tmp/ctx \
      --question=" Where was the dog?" --output_dir=/tmp/inspect
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from experiments.cli import launcher, parse_ids

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A llama2.c .bin file or a Hugging Face checkpoint directory.",
    required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer for --question.")
_CONTEXT_DIR = flags.DEFINE_string("context_dir", None,
                                   "A fixed context built by experiments.build_context.",
                                   required=True)
_QUESTION = flags.DEFINE_string("question", None, "Question text (no BOS: it follows the context).")
_QUESTION_IDS = flags.DEFINE_string("question_ids", None, "Comma-separated question token ids.")
_PERCENTILE = flags.DEFINE_float("percentile", 0.7,
                                 "Calibrated percentile of the selection heat map.")
_LAYER = flags.DEFINE_integer("layer", None, "Layer of the mass curves (default: the middle one).")
_KV_HEAD = flags.DEFINE_integer("kv_head", 0, "KV head of the mass-curve picture.")
_BUDGETS = flags.DEFINE_list("budgets", ["0.05", "0.1", "0.15", "0.2", "0.3", "0.5"],
                             "Key budgets of the mass curves (fractions of the clustered keys).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Directory to write the pictures to.",
                                  required=True)


def _question_ids() -> list[int]:
  if (_QUESTION.value is None) == (_QUESTION_IDS.value is None):
    raise app.UsageError("give exactly one of --question and --question_ids")
  if _QUESTION_IDS.value is not None:
    return parse_ids("question_ids", _QUESTION_IDS.value)
  if not _TOKENIZER.value:
    raise app.UsageError("--question needs --tokenizer")
  from models.llama.tokenizer import load_tokenizer
  return load_tokenizer(_TOKENIZER.value).encode(_QUESTION.value, bos=False)


@launcher
def main(argv):
  del argv
  import matplotlib
  matplotlib.use("Agg")  # files only, no display needed
  from models.llama.checkpoint import load_checkpoint
  from squeezed_jax import inspection
  from squeezed_jax.fixed_context import FixedContext

  try:
    budgets = [float(b) for b in _BUDGETS.value]
  except ValueError as e:
    raise app.UsageError(f"--budgets must be numbers: {e}") from None
  question = _question_ids()
  model, _ = load_checkpoint(_CHECKPOINT.value)
  ctx = FixedContext.load(_CONTEXT_DIR.value, model=model)
  layer = ctx.num_layers // 2 if _LAYER.value is None else _LAYER.value
  queries = inspection.question_queries(model, ctx, question)
  selection = inspection.select_for_question(ctx, queries, percentile=_PERCENTILE.value)
  curves = inspection.mass_vs_budget(ctx, queries, layer=layer, budgets=budgets)

  os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
  paths = {name: os.path.abspath(os.path.join(_OUTPUT_DIR.value, name))
           for name in ("selected_keys.png", "mass_vs_budget.png", "inspection.json")}
  ax = inspection.plot_selection(
      selection, title=f"keys selected at percentile {_PERCENTILE.value} ({len(question)} "
                       f"question tokens, {ctx.num_tokens}-token context)")
  ax.figure.tight_layout()
  ax.figure.savefig(paths["selected_keys.png"], dpi=120)
  ax = inspection.plot_mass_vs_budget(curves, kv_head=_KV_HEAD.value,
                                      title=f"layer {layer}, KV head {_KV_HEAD.value}")
  ax.figure.tight_layout()
  ax.figure.savefig(paths["mass_vs_budget.png"], dpi=120)
  record = {
      "question_ids": question, "percentile": _PERCENTILE.value, "layer": layer,
      "selected_key_fraction": selection.keys.mean(axis=-1).round(4).tolist(),  # [L, Hkv]
      "selected_clusters": selection.clusters.sum(axis=-1).tolist(),  # [L, Hkv]
      "budgets": budgets,
      "curves": {method: {name: values.round(4).tolist()  # [Hkv, budgets]
                          for name, values in curve._asdict().items()}
                 for method, curve in curves.items()},
  }
  with open(paths["inspection.json"], "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1)
  for path in paths.values():
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
