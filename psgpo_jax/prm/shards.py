"""Atomic JSONL label shards: a collection's labeled rows, one shard per batch.

Batch b's rows go to `out_dir/labels-{b:05d}.jsonl`, written atomically (temp file +
rename) once the batch is done (`write_shard`), so a crash loses at most the batch in
flight: `shard_indices` lists the complete shards (a resumed collection skips their
batches) and `load_labels` reads them back in order.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import List, Sequence

from psgpo_jax.jsonio import json_line, write_text
from psgpo_jax.prm.search import Row

SHARD_PATTERN = "labels-{:05d}.jsonl"


def shard_path(out_dir: str, index: int) -> str:
  return os.path.join(out_dir, SHARD_PATTERN.format(index))


def write_shard(out_dir: str, index: int, rows: Sequence[Row]) -> str:
  """Writes one batch's rows as JSONL atomically (temp file + rename); returns the path."""
  return write_text(shard_path(out_dir, index),
                    "".join(json_line(row, sort_keys=True) for row in rows))


def read_shard(path: str) -> List[Row]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def shard_indices(out_dir: str) -> List[int]:
  """Indices of the complete shards in `out_dir` (temp files are ignored)."""
  out = []
  for path in glob.glob(os.path.join(out_dir, "labels-*.jsonl")):
    match = re.fullmatch(r"labels-(\d+)\.jsonl", os.path.basename(path))
    if match:
      out.append(int(match.group(1)))
  return sorted(out)


def load_labels(out_dir: str, selected_only: bool = True) -> List[Row]:
  """All rows of a collection's shards, in order (only the selected ones by default)."""
  rows = []
  for index in shard_indices(out_dir):
    rows.extend(read_shard(shard_path(out_dir, index)))
  return [r for r in rows if r.get("selected")] if selected_only else rows
