"""Generate text with a LLaMA checkpoint (llama2.c .bin file or Hugging Face directory).

  python -m experiments.generate --checkpoint=assets/stories260K/stories260K.bin \
      --tokenizer=assets/stories260K/tok512.bin --prompt="Once upon a time"
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
  return tokenizer.encode(_PROMPT.value, bos=True)


@launcher
def main(argv):
  del argv
  from models.llama.checkpoint import load_checkpoint
  from models.llama.tokenizer import load_tokenizer
  from squeezed_jax.generation import generate_tokens
  from squeezed_jax.sampling import SamplingParams

  tokenizer_path = _tokenizer_path()
  tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
  prompt = _prompt_ids(tokenizer)
  model, config = load_checkpoint(_CHECKPOINT.value)
  stop_tokens = [config.eos_token_id]
  if os.path.isfile(_CHECKPOINT.value):  # llama2.c models also stop at BOS, as llama2.c does.
    stop_tokens.append(config.bos_token_id)
  start = time.perf_counter()
  result = generate_tokens(model, [prompt], max_new_tokens=_MAX_NEW_TOKENS.value,
                           sampling=SamplingParams(_TEMPERATURE.value, _TOP_P.value),
                           stop_tokens=stop_tokens, seed=_SEED.value)
  seconds = time.perf_counter() - start
  token_ids = result.token_ids[0]
  text = tokenizer.decode(token_ids) if tokenizer else None
  if _JSON.value:
    print(json.dumps({"text": text, "token_ids": token_ids, "prompt_ids": prompt,
                      "stopped": result.stopped[0], "seconds": round(seconds, 3)}))
  else:
    prompt_text = _PROMPT.value if _PROMPT.value is not None else _PROMPT_IDS.value
    print(prompt_text + (text if text is not None else " " + ",".join(map(str, token_ids))))
    print(f"[{len(token_ids)} tokens in {seconds:.2f} s, compilation included]")


if __name__ == "__main__":
  app.run(main)
