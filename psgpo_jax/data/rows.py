"""Reading benchmark files: JSONL rows (optionally gzipped, one file or a directory) into
Problems, with every bad row reported by file and line.

A loader gives `load_rows` a converter from one JSON object to a Problem; the converter
raises `RowError` (or KeyError / TypeError / ValueError) for a bad row, which is then
skipped with one warning listing every bad row (`on_bad_row="skip"`) or rejected with
`BadRowsError` (`on_bad_row="error"`). Duplicate ids are bad rows too.
"""
from __future__ import annotations

import gzip
import json
import os
import pickle
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from psgpo_jax.data.record import Problem



@dataclass(frozen=True)
class BadRow:
  """A row that could not become a Problem: where it is and why."""
  path: str
  line: int              # 1-based line number in the file
  reason: str

  def __str__(self) -> str:
    return f"{self.path}:{self.line}: {self.reason}"


class BadRowsError(ValueError):
  """Raised by loaders with `on_bad_row="error"`; `.bad_rows` lists every bad row."""

  def __init__(self, bad_rows: Sequence[BadRow]):
    self.bad_rows = list(bad_rows)
    super().__init__(_describe(self.bad_rows))


class RowError(ValueError):
  """Raised by a row converter: the row is bad for the given reason."""


def _describe(bad_rows: Sequence[BadRow], limit: int = 20) -> str:
  lines = [str(b) for b in bad_rows[:limit]]
  if len(bad_rows) > limit:
    lines.append(f"... and {len(bad_rows) - limit} more")
  return f"{len(bad_rows)} bad row(s):\n  " + "\n  ".join(lines)


def _report(bad_rows: Sequence[BadRow], on_bad_row: str) -> None:
  if not bad_rows:
    return
  if on_bad_row == "error":
    raise BadRowsError(bad_rows)
  warnings.warn("Skipped " + _describe(bad_rows), stacklevel=3)


def check_policy(on_bad_row: str) -> None:
  if on_bad_row not in ("skip", "error"):
    raise ValueError(f"on_bad_row={on_bad_row!r}; choose 'skip' or 'error'.")


def _open_binary(path: str):
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def iter_jsonl(path: str, bad_rows: List[BadRow]) -> Iterator[Tuple[int, Dict[str, Any]]]:
  """Yields (1-based line number, object) for every JSON object line of a JSONL file.

  Blank lines are ignored. Lines that are not UTF-8, not JSON, or not a JSON object are
  appended to `bad_rows` and skipped.
  """
  with _open_binary(path) as f:
    for number, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        bad_rows.append(BadRow(path, number, f"not UTF-8 ({e.reason} at byte {e.start})"))
        continue
      try:
        row = json.loads(text)
      except json.JSONDecodeError as e:
        bad_rows.append(BadRow(path, number, f"invalid JSON: {e.msg} (column {e.colno})"))
        continue
      if not isinstance(row, dict):
        bad_rows.append(BadRow(path, number, f"a row is a JSON object, not {type(row).__name__}"))
        continue
      yield number, row


def _jsonl_files(path: str) -> List[str]:
  """`path` itself, or every *.jsonl / *.jsonl.gz file of a directory, sorted."""
  if os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if f.endswith(".jsonl") or f.endswith(".jsonl.gz"))
    if not files:
      raise FileNotFoundError(f"no .jsonl files in {path}")
    return files
  if not os.path.exists(path):
    raise FileNotFoundError(path)
  return [path]


def load_rows(path: str, convert: Callable[[Dict[str, Any]], Optional[Problem]],
               on_bad_row: str) -> List[Problem]:
  """Converts every row of the JSONL file(s) at `path`; reports bad rows at the end.

  `convert` returns a Problem, None for a row filtered out on purpose, or raises
  `RowError` / KeyError / TypeError / ValueError for a bad row.
  """
  check_policy(on_bad_row)
  bad_rows: List[BadRow] = []
  problems: List[Problem] = []
  seen: Dict[str, Tuple[str, int]] = {}
  for file in _jsonl_files(path):
    for number, row in iter_jsonl(file, bad_rows):
      try:
        problem = convert(row)
      except KeyError as e:
        bad_rows.append(BadRow(file, number, f"missing field {e.args[0]!r}"))
        continue
      except (RowError, TypeError, ValueError, zlib.error, pickle.UnpicklingError,
              EOFError) as e:
        bad_rows.append(BadRow(file, number, str(e) or type(e).__name__))
        continue
      if problem is None:
        continue
      if problem.id in seen:
        first_file, first_line = seen[problem.id]
        bad_rows.append(BadRow(file, number, f"duplicate id {problem.id!r} "
                               f"(first at {first_file}:{first_line})"))
        continue
      seen[problem.id] = (file, number)
      problems.append(problem)
  _report(bad_rows, on_bad_row)
  return problems


def text_field(row: Mapping[str, Any], key: str) -> str:
  """A required, non-empty string field."""
  value = row[key]
  if not isinstance(value, str):
    raise RowError(f"field {key!r} is {type(value).__name__}, not a string")
  if not value.strip():
    raise RowError(f"field {key!r} is empty")
  return value


def str_list_field(row: Mapping[str, Any], key: str) -> List[str]:
  value = row.get(key) or []
  if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
    raise RowError(f"field {key!r} is not a list of strings")
  return value
