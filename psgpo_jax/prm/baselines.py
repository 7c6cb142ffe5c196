"""Trivial line scorers that a PRM must beat, scored by the same metrics (`prm_metrics`).

The position-only predictor knows nothing of the code: it scores line i of every
response by the mean +-1 label of line i over the training rows. On the synthetic suite
errors compound with length, so line position alone ranks lines well above chance; a PRM
that learns nothing beyond it has learned nothing about code.
"""
from __future__ import annotations

from typing import Any, List, Mapping, Sequence

import numpy as np

Row = Mapping[str, Any]


def position_means(rows: Sequence[Row]) -> List[float]:
  """[L] mean +-1 label of the lines at each index over `rows` (0-labels, i.e. neutral
  lines, are left out); an index no row labels gets the overall mean."""
  sums: List[float] = []
  counts: List[int] = []
  for row in rows:
    for i, label in enumerate(row.get("line_labels") or []):
      if len(sums) <= i:
        sums.append(0.0)
        counts.append(0)
      if label != 0:
        sums[i] += float(np.sign(label))
        counts[i] += 1
  total = sum(counts)
  overall = sum(sums) / total if total else 0.0
  return [s / c if c else overall for s, c in zip(sums, counts)]


def position_scores(train_rows: Sequence[Row], rows: Sequence[Row]) -> List[List[float]]:
  """Per row of `rows`, the position-only score of each of its labeled lines: the mean
  label of that line index over `train_rows` (past the longest training row, its last)."""
  means = position_means(train_rows) or [0.0]
  return [[means[min(i, len(means) - 1)] for i in range(len(row.get("line_labels") or []))]
          for row in rows]
