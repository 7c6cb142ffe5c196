"""THE definition of a line of a response: splitting and trivial (blank/comment) lines.

A response is split at `\\n`; a trailing newline ends the last line and opens no empty
line after it. A line is *trivial* when it is blank or a comment only: trivial lines are
never binary-search steps (label 0), earn no dense reward, and are neutral for the
synthetic suite's oracle. `tokenization.line_spans` finds the token that ends each line
with the same splitting.
"""
from __future__ import annotations

from typing import List


def split_lines(response: str) -> List[str]:
  """Splits a response at '\\n', keeping each line's newline.

  `''.join(split_lines(r)) == r` and `len(split_lines(r))` is the number of lines:
  `"a\\n\\nb\\n"` -> `["a\\n", "\\n", "b\\n"]`, `"a\\nb"` -> `["a\\n", "b"]`.
  """
  if not response:
    return []
  lines = response.split("\n")
  out = [line + "\n" for line in lines[:-1]]
  if lines[-1]:
    out.append(lines[-1])
  return out


def is_trivial_line(line: str) -> bool:
  """True for a blank or comment-only line (never a search step, label 0)."""
  text = line.strip()
  return not text or text.startswith("#")
