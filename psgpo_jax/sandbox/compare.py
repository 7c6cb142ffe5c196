"""How outputs are compared with the expected ones (trusted side only; no JAX, no I/O).

Call-based tests: the program's process encodes each return value with `to_wire`,
which accepts only exact plain types (an `int` subclass or an object with its own
`__eq__` is refused there), and the harness decodes it with `from_wire` and compares
with `values_equal`, out of the program's reach. Stdio tests: `outputs_match`.
"""
from __future__ import annotations

import decimal
import math
from typing import Any, List

_SCALARS = (str, int, float, bool, type(None))
_KEY_TYPES = (str, int, float, bool, type(None))


def to_wire(value: Any) -> Any:
  """A JSON-ready copy of a plain value; raises TypeError for anything else.

  Exact types only (`type(v) is int`, never a subclass), so no object with its own
  comparison reaches the harness. Tuples become lists (as JSON would read them);
  dicts become `{"d": [[key, value], ...]}`, so that non-string keys stay distinct
  from string ones (`{1: 2}` never equals `{"1": 2}`).
  """
  kind = type(value)
  if kind in _SCALARS:
    return value
  if kind is list or kind is tuple:
    return [to_wire(v) for v in value]
  if kind is dict:
    pairs = []
    for key, item in value.items():
      if type(key) not in _KEY_TYPES:
        raise TypeError(f"returned a dict with a {type(key).__name__} key")
      pairs.append([key, to_wire(item)])
    return {"d": pairs}
  raise TypeError(f"returned a {kind.__name__}, not a plain value "
                  "(int, float, str, bool, None, list, tuple, dict)")


def from_wire(data: Any) -> Any:
  """Inverse of `to_wire` on decoded JSON; raises ValueError on anything malformed."""
  if type(data) in _SCALARS:
    return data
  if type(data) is list:
    return [from_wire(v) for v in data]
  if type(data) is dict and list(data) == ["d"] and type(data["d"]) is list:
    out = {}
    for pair in data["d"]:
      if type(pair) is not list or len(pair) != 2 or type(pair[0]) not in _KEY_TYPES:
        raise ValueError("malformed dict on the result channel")
      out[pair[0]] = from_wire(pair[1])
    return out
  raise ValueError("malformed value on the result channel")


def plain(value: Any) -> Any:
  """Tuples -> lists, recursively, so expected values compare like their JSON form."""
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  if isinstance(value, dict):
    return {k: plain(v) for k, v in value.items()}
  return value


def values_equal(got: Any, expected: Any) -> bool:
  """Structural equality of JSON-like values, floats within 1e-6 (call-based outputs).

  Only plain JSON types compare equal: an object with a permissive `__eq__` does not.
  """
  if isinstance(got, list) and isinstance(expected, list):
    return len(got) == len(expected) and all(
        values_equal(g, e) for g, e in zip(got, expected))
  if isinstance(got, dict) and isinstance(expected, dict):
    return got.keys() == expected.keys() and all(
        values_equal(got[k], expected[k]) for k in got)
  if type(got) not in _SCALARS or type(expected) not in _SCALARS:
    return False
  if isinstance(got, float) or isinstance(expected, float):
    if isinstance(got, str) or isinstance(expected, str) or got is None or expected is None:
      return False
    return math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9)
  return got == expected


def normalize_output(text: str) -> List[str]:
  """Line-wise stripped lines, trailing blank lines dropped (stdio comparison)."""
  lines = [line.strip() for line in text.splitlines()]
  while lines and not lines[-1]:
    lines.pop()
  return lines


def _tokens_equal(got_line: str, expected_line: str) -> bool:
  """Whitespace-separated tokens equal, numbers compared as decimals (`1.0 == 1`)."""
  got, expected = got_line.split(), expected_line.split()
  if len(got) != len(expected):
    return False
  for g, e in zip(got, expected):
    if g == e:
      continue
    try:
      if decimal.Decimal(g) != decimal.Decimal(e):
        return False
    except (decimal.InvalidOperation, ValueError):
      return False
  return True


def outputs_match(got: str, expected: str) -> bool:
  """Compares stdout with the expected output after whitespace normalisation."""
  got_lines, expected_lines = normalize_output(got), normalize_output(expected)
  if got_lines == expected_lines:
    return True
  return len(got_lines) == len(expected_lines) and all(
      _tokens_equal(g, e) for g, e in zip(got_lines, expected_lines))


def short_repr(value: Any, limit: int = 60) -> str:
  """A bounded repr for mismatch details."""
  try:
    text = repr(value)
  except BaseException:  # pylint: disable=broad-except
    text = f"<{type(value).__name__}>"
  return text if len(text) <= limit else text[:limit - 3] + "..."
