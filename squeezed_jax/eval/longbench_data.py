"""LongBench examples from the Hugging Face hub, official `.jsonl` files or MiniLongBench `.json`.

Sources accepted by `load_longbench(task, source=...)`:
  None: `datasets.load_dataset("THUDM/LongBench", task, split="test")` (needs network).
  `<task>.jsonl`, official schema, one example per line:
      {"input", "context", "answers", "all_classes", "length", "_id", ...}.
  `<task>.json`, MiniLongBench schema (prompts already built, with a reference prediction):
      {"<idx>": {"origin_prompt", "prediction", "gold", "time"}}, `gold` being the answer list or
      {"answers": [...], "all_classes": [...]}.
  A directory holding `<task>.jsonl` or `<task>.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import datasets

from squeezed_jax.eval.longbench_metrics import check_task

HUB_NAME = "THUDM/LongBench"
OFFICIAL_FIELDS = frozenset({"input", "context", "answers", "all_classes", "length", "_id"})
MINI_FIELDS = frozenset({"origin_prompt", "prediction", "gold"})


@dataclasses.dataclass(frozen=True)
class LongBenchExample:
  """One LongBench test example.

  Official examples carry `context`, `input` (the question) and `length` (the context's word count),
  and no `origin_prompt`; MiniLongBench examples carry only the built `origin_prompt` (context and
  question already in the task's template) and the `prediction` a reference model made for it.
  """
  task: str
  context: str | None
  input: str | None
  answers: list[str]
  all_classes: list[str] | None
  length: int | None
  id: str
  origin_prompt: str | None = None
  prediction: str | None = None


def load_longbench(task: str, *, source: str | os.PathLike | None = None) -> list[LongBenchExample]:
  """The test examples of the English LongBench `task`, in file order (see module docstring)."""
  check_task(task)
  if source is None:
    return _load_from_hub(task)
  path = _resolve_file(task, os.fspath(source))
  if path.endswith(".jsonl"):
    rows = datasets.load_dataset("json", data_files=path, split="train")
    return [_official_example(task, row, path) for row in rows]
  return _load_mini(task, path)


def _load_from_hub(task: str) -> list[LongBenchExample]:
  """`task`'s test split from the hub; a RuntimeError naming the offline alternative on failure."""
  try:
    rows = datasets.load_dataset(HUB_NAME, task, split="test")
  except Exception as e:  # pylint: disable=broad-except  # Offline, hub errors: all say the same.
    raise RuntimeError(
        f"could not load {HUB_NAME!r} {task=} from the Hugging Face hub ({type(e).__name__}: {e}); "
        f"offline, pass source= a local {task}.jsonl in the official schema (from LongBench's "
        f"data.zip) or a MiniLongBench {task}.json, or a directory holding one") from e
  return [_official_example(task, row, HUB_NAME) for row in rows]


def _resolve_file(task: str, source: str) -> str:
  """The data file for `task` at `source` (a file, or a directory with <task>.jsonl/<task>.json)."""
  if os.path.isdir(source):
    for name in (f"{task}.jsonl", f"{task}.json"):
      candidate = os.path.join(source, name)
      if os.path.isfile(candidate):
        return candidate
    raise FileNotFoundError(f"no {task}.jsonl or {task}.json in directory {source=}")
  if not os.path.isfile(source):
    raise FileNotFoundError(f"LongBench {source=} does not exist")
  if not source.endswith((".jsonl", ".json")):
    raise ValueError(f"LongBench {source=} must be a .jsonl (official) or .json (MiniLongBench) "
                     "file, or a directory")
  return source


def _check_fields(row: Mapping[str, Any], required: frozenset[str], where: str) -> None:
  """ValueError naming the fields of `required` that `row` lacks."""
  missing = sorted(required - set(row))
  if missing:
    raise ValueError(f"{where}: missing fields {missing} (has {sorted(row)}); expected "
                     f"{sorted(required)}")


def _official_example(task: str, row: Mapping[str, Any], where: str) -> LongBenchExample:
  """An example from a row of the official schema."""
  _check_fields(row, OFFICIAL_FIELDS, f"{where} (official LongBench schema)")
  row_task = row.get("dataset")
  if row_task is not None and row_task.removesuffix("_e") != task:
    raise ValueError(f"{where}: row of dataset {row_task!r} found while loading {task=}")
  return LongBenchExample(
      task=task, context=row["context"], input=row["input"], answers=list(row["answers"]),
      all_classes=list(row["all_classes"]) if row["all_classes"] else None,
      length=int(row["length"]), id=str(row["_id"]))


def _load_mini(task: str, path: str) -> list[LongBenchExample]:
  """Examples of a MiniLongBench file `{idx: {origin_prompt, prediction, gold, time}}`."""
  with open(path, encoding="utf-8") as f:
    entries = json.load(f)
  if not isinstance(entries, dict):
    raise ValueError(f"{path}: MiniLongBench files map an index to an entry, got "
                     f"{type(entries).__name__}")
  return [_mini_example(task, idx, entry, f"{path}[{idx!r}]") for idx, entry in entries.items()]


def _mini_example(task: str, idx: str, entry: Any, where: str) -> LongBenchExample:
  """An example from one MiniLongBench entry."""
  if not isinstance(entry, dict):
    raise ValueError(f"{where}: expected an entry object, got {type(entry).__name__}")
  _check_fields(entry, MINI_FIELDS, f"{where} (MiniLongBench schema)")
  gold = entry["gold"]
  if isinstance(gold, dict):
    _check_fields(gold, frozenset({"answers", "all_classes"}), f"{where}['gold']")
    answers, all_classes = list(gold["answers"]), list(gold["all_classes"])
  elif isinstance(gold, list):
    answers, all_classes = list(gold), None
  else:
    raise ValueError(f"{where}: 'gold' must be a list of answers or an object with 'answers' and "
                     f"'all_classes', got {type(gold).__name__}")
  return LongBenchExample(
      task=task, context=None, input=None, answers=answers, all_classes=all_classes, length=None,
      id=str(idx), origin_prompt=entry["origin_prompt"], prediction=entry["prediction"])
