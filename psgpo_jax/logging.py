"""Metric writers (JSONL + TensorBoard, process 0 only) and progress bars."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Dict, Iterable, Mapping, Optional

from tqdm.auto import tqdm

from psgpo_jax.jsonio import write_text


def _is_main_process() -> bool:
  try:
    import jax  # pylint: disable=import-outside-toplevel
    return jax.process_index() == 0
  except Exception:  # pragma: no cover - JAX not initialised
    return True


def _scalar(value: Any) -> Optional[float]:
  try:
    value = float(value)
  except (TypeError, ValueError):
    return None
  return value


class MetricWriter:
  """Writes scalar metrics to `<logdir>/metrics.jsonl` and TensorBoard event files.

  Only process 0 writes; other processes get a writer that does nothing.

  A run that resumes passes `keep_before`, the first step it will redo: rows of earlier
  steps are kept, later ones (logged after the checkpoint the run resumes from) are
  dropped, so that no step appears twice (SFT and PRM pass their checkpoint's step, RL
  its checkpoint's, 0 starts the file empty). None keeps every row, for loops that skip
  finished work by other means (collect's label shards) and ask `has` what was logged.
  A torn last line (a crash mid-write) is always dropped.
  """

  def __init__(self, logdir: str, tensorboard: bool = True, keep_before: Optional[int] = None):
    self.logdir = logdir
    self.active = _is_main_process()
    self._path: Optional[str] = None
    self._logged: Optional[set] = None       # (step, key) pairs in the file, once `has` asks
    self._tb = None
    self._jsonl = None
    if self.active:
      os.makedirs(logdir, exist_ok=True)
      path = os.path.join(logdir, "metrics.jsonl")
      truncate_metrics(path, sys.maxsize if keep_before is None else keep_before)
      self._path = path
      self._jsonl = open(path, "a", encoding="utf-8")
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self._tb = SummaryWriter(logdir)

  def has(self, step: int, key: str) -> bool:
    """Whether a row of `step` with metric `key` (prefix included) is in the file."""
    if not self.active:
      return False
    if self._logged is None:
      self._jsonl.flush()
      self._logged = {(int(row["step"]), k) for row in read_metrics(self._path) for k in row}
    return (int(step), key) in self._logged

  def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
    """Logs every scalar of `metrics` at `step` (non-scalars are skipped)."""
    if not self.active:
      return
    row = {"step": int(step), "time": time.time()}
    for key, value in metrics.items():
      value = _scalar(value)
      if value is None:
        continue
      name = f"{prefix}{key}"
      row[name] = value if math.isfinite(value) else str(value)
      if self._tb is not None:
        self._tb.add_scalar(name, value, int(step))
    self._jsonl.write(json.dumps(row) + "\n")
    if self._logged is not None:
      self._logged.update((row["step"], key) for key in row)
    self._jsonl.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def progress(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
             enabled: bool = True, **kwargs):
  """A tqdm progress bar, shown on process 0 when `enabled`."""
  return tqdm(iterable, total=total, desc=desc, disable=not (enabled and _is_main_process()),
              dynamic_ncols=True, **kwargs)


def truncate_metrics(path: str, keep_before: int) -> int:
  """Rewrites metrics.jsonl `path` (atomically) with only its complete rows of steps
  < `keep_before`; returns how many rows it dropped (0 when there is no file)."""
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:      # a torn last line
        dropped += 1
        continue
      if isinstance(row, dict) and int(row.get("step", 0)) < keep_before:
        kept.append(line if line.endswith("\n") else line + "\n")
      else:
        dropped += 1
  write_text(path, "".join(kept))
  return dropped


def read_metrics(path: str) -> Iterable[Dict[str, Any]]:
  """Rows of a metrics.jsonl file."""
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        yield json.loads(line)
