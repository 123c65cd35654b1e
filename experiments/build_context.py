"""The offline phase from the command line: prefill a fixed context, cluster its keys, calibrate,
and save the artifact with orbax.

  python -m experiments.build_context --checkpoint=assets/stories260K/stories260K.bin \
      --tokenizer=assets/stories260K/tok512.bin --context_file=story.txt --output=/tmp/ctx
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from experiments.cli import launcher, parse_ids

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A llama2.c .bin file or a Hugging Face checkpoint directory.",
    required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None,
                                 "Tokenizer for --context_file (tokenizer.model or llama2.c .bin).")
_CONTEXT_FILE = flags.DEFINE_string("context_file", None,
                                    "A text file: the fixed context (BOS is prepended).")
_CONTEXT_IDS = flags.DEFINE_string("context_ids", None,
                                   "Comma-separated token ids of the fixed context, used as given.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write the artifact to.",
                              required=True)
_PERCENT_CLUSTERS = flags.DEFINE_float("percent_clusters", 5.0,
                                       "Fine clusters as a percentage of the clustered keys.")
_HIERARCHICAL = flags.DEFINE_bool("hierarchical", False, "Also build coarse clusters.")
_PERCENT_CLUSTERS_COARSE = flags.DEFINE_float(
    "percent_clusters_coarse", 1.0, "Coarse clusters as a percentage of the clustered keys.")
_OBSERVATION_WINDOW = flags.DEFINE_integer(
    "observation_window", 100, "Last tokens kept unclustered and used for calibration.")
_PERCENTILES = flags.DEFINE_list("percentiles", ["0.5", "0.7", "0.8", "0.9"],
                                 "Fractions of keys to prune to calibrate thresholds for.")
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 512, "Tokens per prefill step.")
_SEED = flags.DEFINE_integer("seed", 0, "K-means seed.")


def _context_ids() -> list[int]:
  if (_CONTEXT_FILE.value is None) == (_CONTEXT_IDS.value is None):
    raise app.UsageError("give exactly one of --context_file and --context_ids")
  if _CONTEXT_IDS.value is not None:
    return parse_ids("context_ids", _CONTEXT_IDS.value)
  if not _TOKENIZER.value:
    raise app.UsageError("--context_file needs --tokenizer")
  from models.llama.tokenizer import load_tokenizer
  with open(_CONTEXT_FILE.value, encoding="utf-8") as f:
    return load_tokenizer(_TOKENIZER.value).encode(f.read(), bos=True)


@launcher
def main(argv):
  del argv
  from models.llama.checkpoint import load_checkpoint
  from squeezed_jax.fixed_context import ContextConfig, FixedContext

  try:
    percentiles = tuple(float(p) for p in _PERCENTILES.value)
  except ValueError as e:
    raise app.UsageError(f"--percentiles must be numbers: {e}") from None
  config = ContextConfig(percent_clusters=_PERCENT_CLUSTERS.value,
                         hierarchical=_HIERARCHICAL.value,
                         percent_clusters_coarse=_PERCENT_CLUSTERS_COARSE.value,
                         observation_window=_OBSERVATION_WINDOW.value, percentiles=percentiles,
                         prefill_chunk=_PREFILL_CHUNK.value, seed=_SEED.value)
  token_ids = _context_ids()
  model, _ = load_checkpoint(_CHECKPOINT.value)
  print(f"building a fixed context of {len(token_ids)} tokens", flush=True)
  started = time.perf_counter()
  context = FixedContext.build(model, token_ids, config)
  context.save(_OUTPUT.value)
  summary = {
      "output": _OUTPUT.value,
      "num_tokens": len(token_ids),
      "num_clusters": int(context.clusters.counts.shape[-1]),
      "thresholds": dict(zip(map(str, config.percentiles), map(float, context.thresholds))),
      "mean_kept_fraction": dict(zip(map(str, config.percentiles),
                                     map(float, context.kept_fraction.mean(axis=(1, 2))))),
      "seconds": round(time.perf_counter() - started, 2),
  }
  print(json.dumps(summary))
  print(f"wrote the fixed context to {os.path.abspath(_OUTPUT.value)}")


if __name__ == "__main__":
  app.run(main)
