"""Generate text with a LLaMA checkpoint (llama2.c .bin file or Hugging Face directory).

  python -m experiments.generate --checkpoint=assets/stories260K/stories260K.bin \
      --tokenizer=assets/stories260K/tok512.bin --prompt="Once upon a time"

With --context_dir (a fixed context from experiments.build_context), the prompt is a question
placed right after the context (no BOS), answered with --method at --percentile or --kv_budget:

  python -m experiments.generate --checkpoint=assets/stories260K/stories260K.bin \
      --tokenizer=assets/stories260K/tok512.bin --context_dir=/tmp/ctx \
      --prompt=" Lily and the dog" --method=squeezed --percentile=0.5
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags

from experiments.cli import launcher, parse_ids

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A llama2.c .bin file or a Hugging Face checkpoint directory.",
    required=True)
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "A SentencePiece tokenizer.model or a llama2.c tokenizer .bin. "
    "Default: tokenizer.model inside a Hugging Face checkpoint directory.")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text; BOS is prepended as LLaMA does.")
_PROMPT_IDS = flags.DEFINE_string("prompt_ids", None,
                                  "Comma-separated prompt token ids, used as given.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "Most tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1 = off.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_JSON = flags.DEFINE_bool("json", False,
                          "Print one JSON object with `text` and `token_ids` instead of text.")
_CONTEXT_DIR = flags.DEFINE_string(
    "context_dir", None, "A fixed context built by experiments.build_context; the prompt is then "
    "a question asked of it.")
_METHOD = flags.DEFINE_enum(
    "method", "squeezed", ["dense", "squeezed", "squeezed_hierarchical", "quest", "oracle_topk",
                           "streaming"], "Attention over the fixed context (with --context_dir).")
_PERCENTILE = flags.DEFINE_float("percentile", None,
                                 "A calibrated fraction of keys to prune (with --context_dir; "
                                 "0.9 when neither this nor --kv_budget is given).")
_KV_BUDGET = flags.DEFINE_float("kv_budget", None,
                                "Fraction of the fixed context's KV bytes to read per lookup, "
                                "centroid / page-summary bytes included (with --context_dir; "
                                "instead of --percentile).")


def _tokenizer_path() -> str | None:
  if _TOKENIZER.value:
    return _TOKENIZER.value
  candidate = os.path.join(_CHECKPOINT.value, "tokenizer.model")
  return candidate if os.path.isfile(candidate) else None


def _prompt_ids(tokenizer) -> list[int]:
  if (_PROMPT.value is None) == (_PROMPT_IDS.value is None):
    raise app.UsageError("give exactly one of --prompt and --prompt_ids")
  if _PROMPT_IDS.value is not None:
    return parse_ids("prompt_ids", _PROMPT_IDS.value)
  if tokenizer is None:
    raise app.UsageError("--prompt needs --tokenizer (or a tokenizer.model in the checkpoint)")
  # A question continues the fixed context: no BOS in front of it.
  return tokenizer.encode(_PROMPT.value, bos=_CONTEXT_DIR.value is None)


def _answer_from_context(model, prompt, stop_tokens, sampling):
  """Answers the question `prompt` against --context_dir; returns (token ids, stopped, fields)."""
  from squeezed_jax.fixed_context import FixedContext
  from squeezed_jax.online import generate

  ctx = FixedContext.load(_CONTEXT_DIR.value, model=model)
  percentile = _PERCENTILE.value
  if _METHOD.value != "dense" and percentile is None and _KV_BUDGET.value is None:
    percentile = 0.9
  answers = generate(model, ctx, [prompt], method=_METHOD.value, percentile=percentile,
                     kv_budget=_KV_BUDGET.value, max_new_tokens=_MAX_NEW_TOKENS.value,
                     sampling=sampling, stop_tokens=stop_tokens, seed=_SEED.value)
  fields = {"method": _METHOD.value, "percentile": percentile, "kv_budget": _KV_BUDGET.value,
            "context_tokens": ctx.num_tokens, "mean_kv_budget": round(answers.mean_kv_budget, 4),
            "kv_budget_per_layer_head": np.round(answers.kv_budget[0].astype(float), 4).tolist(),
            "rows_fraction": round(float(answers.rows_fraction.mean()), 4),
            "overflows": int(answers.overflows.sum())}
  return answers.token_ids[0], answers.stopped[0], fields


@launcher
def main(argv):
  del argv
  from models.llama.checkpoint import load_checkpoint
  from models.llama.tokenizer import load_tokenizer
  from squeezed_jax.generation import generate_tokens
  from squeezed_jax.sampling import SamplingParams

  if _CONTEXT_DIR.value is None and (_PERCENTILE.value, _KV_BUDGET.value) != (None, None):
    raise app.UsageError("--percentile and --kv_budget need --context_dir")
  tokenizer_path = _tokenizer_path()
  tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
  prompt = _prompt_ids(tokenizer)
  model, config = load_checkpoint(_CHECKPOINT.value)
  stop_tokens = [config.eos_token_id]
  if os.path.isfile(_CHECKPOINT.value):  # llama2.c models also stop at BOS, as llama2.c does.
    stop_tokens.append(config.bos_token_id)
  sampling = SamplingParams(_TEMPERATURE.value, _TOP_P.value)
  start = time.perf_counter()
  if _CONTEXT_DIR.value is None:
    result = generate_tokens(model, [prompt], max_new_tokens=_MAX_NEW_TOKENS.value,
                             sampling=sampling, stop_tokens=stop_tokens, seed=_SEED.value)
    token_ids, stopped, fields = result.token_ids[0], result.stopped[0], {}
  else:
    token_ids, stopped, fields = _answer_from_context(model, prompt, stop_tokens, sampling)
  seconds = time.perf_counter() - start
  tokens_per_second = len(token_ids) / seconds
  text = tokenizer.decode(token_ids) if tokenizer else None
  if _JSON.value:
    print(json.dumps({"text": text, "token_ids": token_ids, "prompt_ids": prompt,
                      "stopped": stopped, "seconds": round(seconds, 3),
                      "tokens_per_second": round(tokens_per_second, 2), **fields}))
  else:
    prompt_text = _PROMPT.value if _PROMPT.value is not None else _PROMPT_IDS.value
    print(prompt_text + (text if text is not None else " " + ",".join(map(str, token_ids))))
    if fields:
      print(f"[{fields['method']}: KV budget {fields['mean_kv_budget']:.3f} of the fixed context "
            f"(rows {fields['rows_fraction']:.3f} + summaries), {fields['overflows']} "
            f"truncated lookups]")
    print(f"[{len(token_ids)} tokens in {seconds:.2f} s, {tokens_per_second:.1f} tokens/s, "
          f"compilation included]")


if __name__ == "__main__":
  app.run(main)
