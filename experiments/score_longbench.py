"""Score LongBench predictions as the official scorer does; prints one JSON object {task: score}.

  python -m experiments.score_longbench --predictions=preds.jsonl

Each line of the file is {"task", "pred", "answers"[, "all_classes"]}; scores are x100 means over a
task's lines, rounded to 2 decimals (squeezed_jax.eval.longbench_metrics).
"""

from __future__ import annotations

import json

from absl import app, flags

from experiments.cli import launcher
from squeezed_jax.eval.longbench_metrics import score_records

_PREDICTIONS = flags.DEFINE_string(
    "predictions", None, "A .jsonl file of {task, pred, answers[, all_classes]} lines.",
    required=True)


def read_jsonl(path: str) -> list[dict]:
  """The JSON objects of the non-blank lines of `path`."""
  records = []
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_number}: not a JSON line: {e}") from None
  if not records:
    raise ValueError(f"{path} holds no prediction lines")
  return records


@launcher
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  print(json.dumps(score_records(read_jsonl(_PREDICTIONS.value))))


if __name__ == "__main__":
  app.run(main)
