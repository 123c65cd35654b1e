"""Tests of the resumable, never-duplicating jsonl result files (`results_io`)."""

from __future__ import annotations

import json
import os
import random

import pytest

from squeezed_jax.eval.results_io import ResultsFile, read_records

KEY = ("id", "method")


def _record(rng: random.Random, example_id: str, method: str) -> dict:
  return {"id": example_id, "method": method, "score": rng.random(),
          "prediction": "".join(rng.choice("abc \n\"{}") for _ in range(12))}


def _lines(path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_add_appends_and_reopening_resumes(tmp_path):
  rng = random.Random(0)
  path = tmp_path / "out" / "task.jsonl"
  results = ResultsFile(path, KEY)
  records = [_record(rng, f"ex{i}", m) for i in range(3) for m in ("dense", "squeezed")]
  for record in records:
    results.add(record)
  assert _lines(path) == records and len(results) == 6
  reopened = ResultsFile(path, KEY)
  assert reopened.records == records
  assert reopened.has({"id": "ex2", "method": "squeezed"})
  assert not reopened.has({"id": "ex3", "method": "dense"})
  assert reopened.get({"id": "ex1", "method": "dense"}) == records[2]


def test_readding_a_key_replaces_its_line(tmp_path):
  rng = random.Random(1)
  path = tmp_path / "task.jsonl"
  results = ResultsFile(path, KEY)
  first, second = _record(rng, "a", "dense"), _record(rng, "b", "dense")
  results.add(first)
  results.add(second)
  replacement = dict(first, score=first["score"] + 1.0)
  results.add(replacement)
  assert _lines(path) == [replacement, second]
  ResultsFile(path, KEY).add(dict(second, score=-1.0))
  assert _lines(path) == [replacement, dict(second, score=-1.0)]


def test_torn_last_line_and_duplicates_are_cleaned_on_open(tmp_path):
  rng = random.Random(2)
  path = tmp_path / "task.jsonl"
  a, b, a_again = _record(rng, "a", "x"), _record(rng, "b", "x"), _record(rng, "a", "x")
  path.write_text("".join(json.dumps(r) + "\n" for r in (a, b, a_again))
                  + json.dumps(_record(rng, "c", "x"))[:20])
  results = ResultsFile(path, KEY)
  assert results.records == [a_again, b]
  assert _lines(path) == [a_again, b]
  assert not results.has({"id": "c", "method": "x"})


def test_malformed_line_inside_the_file_is_an_error(tmp_path):
  path = tmp_path / "task.jsonl"
  path.write_text('{"id": "a", "method": "x"}\nnot json\n{"id": "b", "method": "x"}\n')
  with pytest.raises(ValueError, match="task.jsonl:2: not a JSON line"):
    read_records(str(path))


def test_overwrite_starts_afresh(tmp_path):
  rng = random.Random(3)
  path = tmp_path / "task.jsonl"
  ResultsFile(path, KEY).add(_record(rng, "old", "dense"))
  results = ResultsFile(path, KEY, overwrite=True)
  assert len(results) == 0 and path.read_text() == ""
  new = _record(rng, "new", "dense")
  results.add(new)
  assert _lines(path) == [new]
  umask = os.umask(0)
  os.umask(umask)
  assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as `open` makes it, not mkstemp's 0600


def test_records_need_their_key_fields(tmp_path):
  results = ResultsFile(tmp_path / "task.jsonl", KEY)
  with pytest.raises(ValueError, match=r"lacks key fields \['method'\]"):
    results.add({"id": "a", "score": 1.0})
  with pytest.raises(ValueError, match="at least one field"):
    ResultsFile(tmp_path / "other.jsonl", ())
