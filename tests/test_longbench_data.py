"""Tests of squeezed_jax.eval.longbench_data: official .jsonl, MiniLongBench .json, hub errors."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest

from squeezed_jax.eval import longbench_data
from squeezed_jax.eval.longbench_data import LongBenchExample, load_longbench

MINI_DIR = os.path.join(os.path.dirname(__file__), "data", "longbench_mini")


def _official_rows(task, n, seed=0):
  """`n` random rows of the official LongBench schema for `task`."""
  rng = random.Random(seed)
  words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
  rows = []
  for i in range(n):
    context = " ".join(rng.choices(words, k=rng.randint(5, 20)))
    rows.append({
        "input": f"question {rng.random()}", "context": context,
        "answers": rng.sample(words, rng.randint(1, 3)),
        "all_classes": rng.sample(words, 4) if task == "trec" else None,
        "length": len(context.split()), "dataset": task, "language": "en",
        "_id": f"{rng.getrandbits(64):016x}{i}"})
  return rows


def _write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)


def _expected(task, row):
  return LongBenchExample(
      task=task, context=row["context"], input=row["input"], answers=row["answers"],
      all_classes=row["all_classes"], length=row["length"], id=row["_id"])


@pytest.mark.parametrize("task", ["hotpotqa", "trec"])
def test_official_jsonl_file_and_directory(tmp_path, task):
  rows = _official_rows(task, 3)
  _write_jsonl(tmp_path / f"{task}.jsonl", rows)
  expected = [_expected(task, row) for row in rows]
  assert load_longbench(task, source=tmp_path / f"{task}.jsonl") == expected
  assert load_longbench(task, source=str(tmp_path)) == expected


def test_official_jsonl_wrong_schema_and_wrong_task(tmp_path):
  rows = _official_rows("qasper", 2, seed=1)
  for row in rows:
    del row["context"]
  _write_jsonl(tmp_path / "qasper.jsonl", rows)
  with pytest.raises(ValueError, match=r"missing fields \['context'\]"):
    load_longbench("qasper", source=tmp_path / "qasper.jsonl")
  _write_jsonl(tmp_path / "lcc.jsonl", _official_rows("qasper", 2, seed=2))
  with pytest.raises(ValueError, match="'qasper' found while loading task='lcc'"):
    load_longbench("lcc", source=tmp_path / "lcc.jsonl")


def test_mini_longbench_file_and_directory():
  with open(os.path.join(MINI_DIR, "trec.json"), encoding="utf-8") as f:
    raw = json.load(f)
  examples = load_longbench("trec", source=os.path.join(MINI_DIR, "trec.json"))
  assert examples == load_longbench("trec", source=MINI_DIR)
  assert [e.id for e in examples] == list(raw)
  for example, entry in zip(examples, raw.values()):
    assert example.answers == entry["gold"]["answers"]
    assert example.all_classes == entry["gold"]["all_classes"]
    assert example.origin_prompt == entry["origin_prompt"]
    assert example.prediction == entry["prediction"]
    assert (example.context, example.input, example.length) == (None, None, None)


def test_mini_longbench_list_gold():
  with open(os.path.join(MINI_DIR, "lcc.json"), encoding="utf-8") as f:
    raw = json.load(f)
  examples = load_longbench("lcc", source=MINI_DIR)
  assert [(e.id, e.answers, e.all_classes) for e in examples] == [
      (idx, entry["gold"], None) for idx, entry in raw.items()]


@pytest.mark.parametrize("content, match", [
    ([1, 2], "map an index to an entry"),
    ({"0": {"origin_prompt": "p", "prediction": "x"}}, r"missing fields \['gold'\]"),
    ({"0": {"origin_prompt": "p", "prediction": "x", "gold": "answer"}}, "'gold' must be"),
    ({"0": {"origin_prompt": "p", "prediction": "x", "gold": {"answers": ["a"]}}},
     r"missing fields \['all_classes'\]"),
])
def test_mini_longbench_wrong_schema(tmp_path, content, match):
  path = tmp_path / "trec.json"
  path.write_text(json.dumps(content), encoding="utf-8")
  with pytest.raises(ValueError, match=match):
    load_longbench("trec", source=path)


def test_directory_prefers_official_jsonl(tmp_path):
  shutil.copy(os.path.join(MINI_DIR, "samsum.json"), tmp_path / "samsum.json")
  rows = _official_rows("samsum", 2, seed=3)
  _write_jsonl(tmp_path / "samsum.jsonl", rows)
  assert load_longbench("samsum", source=tmp_path) == [_expected("samsum", r) for r in rows]


def test_missing_files_and_unknown_tasks(tmp_path):
  with pytest.raises(FileNotFoundError, match="no narrativeqa.jsonl or narrativeqa.json"):
    load_longbench("narrativeqa", source=tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_longbench("narrativeqa", source=tmp_path / "narrativeqa.jsonl")
  (tmp_path / "narrativeqa.csv").write_text("a,b\n")
  with pytest.raises(ValueError, match=r"must be a \.jsonl"):
    load_longbench("narrativeqa", source=tmp_path / "narrativeqa.csv")
  with pytest.raises(ValueError, match="unknown LongBench task='squad'"):
    load_longbench("squad", source=MINI_DIR)
  with pytest.raises(ValueError, match="Chinese"):
    load_longbench("dureader", source=MINI_DIR)


def test_hub_loading_and_offline_error(monkeypatch):
  rows = _official_rows("musique", 2, seed=4)
  calls = []

  def fake_hub(name, config, split):
    calls.append((name, config, split))
    return rows

  monkeypatch.setattr(longbench_data.datasets, "load_dataset", fake_hub)
  assert load_longbench("musique") == [_expected("musique", r) for r in rows]
  assert calls == [("THUDM/LongBench", "musique", "test")]

  def offline(*args, **kwargs):
    raise ConnectionError("Couldn't reach 'THUDM/LongBench' on the Hub (LocalEntryNotFoundError)")

  monkeypatch.setattr(longbench_data.datasets, "load_dataset", offline)
  with pytest.raises(RuntimeError, match=r"ConnectionError.*offline, pass source= a local "
                     r"musique\.jsonl.*MiniLongBench musique\.json"):
    load_longbench("musique")
