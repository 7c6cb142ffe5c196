"""Which labeled rows train the PRM, and the balance of their line labels.

`select_rows`: per row, whether it is selected under `collect.selection` (revised: failed
with a verified-correct prefix; failed: every searched failure; all: those and the passing
ones), optionally dropping the prompts whose responses all pass or all fail
(`drop_uniform_prompts`). `balance_lines` switches off lines of the majority label so that
positive and negative lines balance (`collect.balance`); `label_counts` counts the used
lines by label.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Sequence

import numpy as np

from psgpo_jax.prm.search import Row

SELECTIONS = ("revised", "failed", "all")


def uniform_prompts(rows: Sequence[Row]) -> set:
  """problem_ids whose responses all pass or all fail."""
  outcomes: Dict[Any, set] = {}
  for row in rows:
    outcomes.setdefault(row["problem_id"], set()).add(bool(row["passed"]))
  return {pid for pid, seen in outcomes.items() if len(seen) == 1}


def is_selected(row: Row, selection: str) -> bool:
  """Whether a labeled row trains the PRM under `selection`.

  revised: failed, with a verified-correct prefix (first bad step > 0);
  failed: every failed (and searched) response; all: failed and searched, or passed.
  """
  if row["line_labels"] is None:
    return False
  if selection == "all":
    return True
  if row["passed"]:
    return False
  if selection == "failed":
    return True
  if selection == "revised":
    return (row["first_bad_step"] or 0) > 0
  raise ValueError(f"selection={selection!r}; choose one of {SELECTIONS}.")


def select_rows(rows: Sequence[Row], selection: str, drop_uniform_prompts: bool = False
                ) -> List[bool]:
  """Per row, whether it is selected (rows must hold whole prompts' responses)."""
  dropped = uniform_prompts(rows) if drop_uniform_prompts else set()
  return [row["problem_id"] not in dropped and is_selected(row, selection) for row in rows]


def balance_lines(rows: Sequence[Row], seed: int = 0) -> List[Row]:
  """Subsamples lines so positive and negative lines are equally many.

  Adds `line_used` (1 = the line trains the PRM) to copies of `rows`: a random subset of
  the majority label's lines is switched off. Trivial (label 0) lines stay used.
  """
  pos = [(r, l) for r, row in enumerate(rows) for l, y in enumerate(row["line_labels"])
         if y > 0]
  neg = [(r, l) for r, row in enumerate(rows) for l, y in enumerate(row["line_labels"])
         if y < 0]
  major = pos if len(pos) > len(neg) else neg
  excess = abs(len(pos) - len(neg))
  rng = np.random.default_rng(seed)
  off = set(tuple(major[k]) for k in rng.choice(len(major), size=excess, replace=False)) \
      if excess else set()
  out = []
  for r, row in enumerate(rows):
    used = [0 if (r, l) in off else 1 for l in range(len(row["line_labels"]))]
    out.append({**row, "line_used": used})
  return out


def label_counts(rows: Iterable[Row]) -> Dict[str, int]:
  """Positive, negative and trivial (0) line counts of labeled rows."""
  counts = {"positive_lines": 0, "negative_lines": 0, "trivial_lines": 0}
  for row in rows:
    used = row.get("line_used") or [1] * len(row["line_labels"] or [])
    for y, u in zip(row["line_labels"] or [], used):
      if not u:
        continue
      key = "positive_lines" if y > 0 else "negative_lines" if y < 0 else "trivial_lines"
      counts[key] += 1
  return counts
