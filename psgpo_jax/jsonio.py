"""THE way run files are written as JSON: atomically, and strict (no NaN / Infinity).

`json.dump` writes NaN and Infinity as bare words that strict JSON readers reject; every
result, summary, stats and report file of a run goes through `write_json` (every JSONL
row of label shards and eval samples through `json_line`), which writes them as null;
`write_text` replaces a file atomically (temporary file + rename), so a crash never
leaves half a file.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any


def strict(value: Any) -> Any:
  """`value` with every non-finite float replaced by None (dicts, lists, tuples walked)."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: strict(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict(v) for v in value]
  return value


def write_text(path: str, text: str) -> str:
  """Replaces `path` with `text` atomically (temporary file, fsync, rename): readers and
  crashes see the old file or the new one, never half of one. Returns `path`."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return path


def json_line(value: Any, sort_keys: bool = False) -> str:
  """One JSONL row of `value`: strict JSON (non-finite floats as null) on one line, with
  its newline; non-ASCII text is kept as is."""
  return json.dumps(strict(value), sort_keys=sort_keys, ensure_ascii=False,
                    allow_nan=False) + "\n"


def write_json(path: str, value: Any, sort_keys: bool = False) -> str:
  """Writes `value` to `path` as strict JSON, atomically; returns `path`.

  Objects that JSON does not know (numpy scalars, paths) are written as their float
  value when they have one, else as their string.
  """
  def default(obj):
    try:
      return strict(float(obj))
    except (TypeError, ValueError):
      return str(obj)
  return write_text(path, json.dumps(strict(value), indent=2, sort_keys=sort_keys,
                                     default=default, allow_nan=False))
