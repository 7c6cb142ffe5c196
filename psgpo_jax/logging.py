"""Metric writers (JSONL + TensorBoard, process 0 only) and progress bars."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict, Iterable, Mapping, Optional

from tqdm.auto import tqdm


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
  """

  def __init__(self, logdir: str, tensorboard: bool = True):
    self.logdir = logdir
    self.active = _is_main_process()
    self._tb = None
    self._jsonl = None
    if self.active:
      os.makedirs(logdir, exist_ok=True)
      self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a", encoding="utf-8")
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self._tb = SummaryWriter(logdir)

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


def read_metrics(path: str) -> Iterable[Dict[str, Any]]:
  """Rows of a metrics.jsonl file."""
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        yield json.loads(line)
