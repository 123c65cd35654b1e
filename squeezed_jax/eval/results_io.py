"""Per-task result files (jsonl): one line per record key, resumable, never duplicated.

    results = ResultsFile(path, key_fields=("id", "method", "budget"))
    if not results.has({"id": "ex-3", "method": "dense", "budget": 1.0}):
      results.add(record)   # appended and flushed to disk at once

Opening a file reads the records already there (a crash may have left a torn last line: it is
dropped) and rewrites the file atomically (a temporary file renamed over it) holding each key once,
the last record of a key winning. `add` appends a line for a new key and rewrites the file
atomically when the key is already there, so a rerun replaces results rather than appending them a
second time. `overwrite=True` starts the file empty.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Hashable, Iterable, Mapping, Sequence

Record = dict[str, Any]


def _file_mode() -> int:
  """The mode `open` gives a new file under the current umask (mkstemp's files are 0600)."""
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


def _write_atomically(path: str, records: Iterable[Mapping[str, Any]]) -> None:
  """Writes `records` as jsonl to a temporary file beside `path`, then renames it over `path`."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".jsonl")
  try:
    os.chmod(temporary, _file_mode())
    with os.fdopen(handle, "w", encoding="utf-8") as f:
      for record in records:
        f.write(json.dumps(record) + "\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


def read_records(path: str) -> list[Record]:
  """The records of a jsonl file; a torn last line (a crash mid-write) is skipped.

  Raises ValueError naming the line for a malformed line that is not the last one.
  """
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number == len(lines):  # no newline after it: the write was cut short
        continue
      raise ValueError(f"{path}:{number}: not a JSON line: {e}") from None
  return records


class ResultsFile:
  """A jsonl file of records, at most one per key (the values of `key_fields`)."""

  def __init__(self, path: str | os.PathLike[str], key_fields: Sequence[str], *,
               overwrite: bool = False):
    self.path = os.fspath(path)
    self.key_fields = tuple(key_fields)
    if not self.key_fields:
      raise ValueError("key_fields must name at least one field")
    self._records: dict[Hashable, Record] = {}
    if not overwrite:
      for record in read_records(self.path):
        self._records[self.key(record)] = record
    _write_atomically(self.path, self._records.values())

  def key(self, record: Mapping[str, Any]) -> tuple:
    """The key of `record`; ValueError if it lacks a key field."""
    missing = [name for name in self.key_fields if name not in record]
    if missing:
      raise ValueError(f"record lacks key fields {missing} (has {sorted(record)})")
    return tuple(json.dumps(record[name], sort_keys=True) for name in self.key_fields)

  def get(self, key_values: Mapping[str, Any]) -> Record | None:
    """The stored record with these key field values, or None."""
    return self._records.get(self.key(key_values))

  def has(self, key_values: Mapping[str, Any]) -> bool:
    """Whether a record with these key field values is stored."""
    return self.key(key_values) in self._records

  def add(self, record: Mapping[str, Any]) -> None:
    """Stores `record` on disk now: appended if its key is new, else replacing the old one."""
    key = self.key(record)
    replaces = key in self._records
    self._records[key] = dict(record)
    if replaces:
      _write_atomically(self.path, self._records.values())
      return
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")
      f.flush()
      os.fsync(f.fileno())

  @property
  def records(self) -> list[Record]:
    """The stored records, in file order."""
    return list(self._records.values())

  def __len__(self) -> int:
    return len(self._records)
