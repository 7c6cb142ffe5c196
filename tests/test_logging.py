"""Metric files of resumed runs: no step twice, no torn line."""
import json
import os

from psgpo_jax.logging import MetricWriter, read_metrics, truncate_metrics


def _write_rows(path, steps, torn_tail=True):
  with open(path, "w") as f:
    for step in steps:
      f.write(json.dumps({"step": step, "loss": float(step)}) + "\n")
    if torn_tail:
      f.write('{"step": 9, "lo')                       # a crash mid-write


def test_truncate_keeps_complete_rows_before_the_step(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  _write_rows(path, [-1, 0, 1, 2, 3])
  assert truncate_metrics(path, 2) == 3                # steps 2, 3 and the torn line
  assert [r["step"] for r in read_metrics(path)] == [-1, 0, 1]
  assert truncate_metrics(str(tmp_path / "absent.jsonl"), 0) == 0


def test_a_resumed_writer_continues_without_repeating_steps(tmp_path):
  _write_rows(str(tmp_path / "metrics.jsonl"), [-1, 0, 1, 2])
  with MetricWriter(str(tmp_path), tensorboard=False, keep_before=1) as writer:
    writer.write(1, {"loss": 10.0})
  rows = list(read_metrics(str(tmp_path / "metrics.jsonl")))
  assert [r["step"] for r in rows] == [-1, 0, 1] and rows[-1]["loss"] == 10.0


def test_a_writer_without_keep_before_appends(tmp_path):
  _write_rows(str(tmp_path / "metrics.jsonl"), [0, 1], torn_tail=False)
  with MetricWriter(str(tmp_path), tensorboard=False) as writer:
    writer.write(1, {"loss": 1.0})
  assert [r["step"] for r in read_metrics(os.path.join(tmp_path, "metrics.jsonl"))] == [0, 1, 1]


def test_a_writer_without_keep_before_drops_a_torn_line_and_knows_what_was_logged(tmp_path):
  """Collect's writer keeps every row (its shards say what is done) but must not glue a
  new row onto a torn one, and `has` tells a resumed loop which rows exist."""
  _write_rows(str(tmp_path / "metrics.jsonl"), [0, 1])          # ... and a torn tail
  with MetricWriter(str(tmp_path), tensorboard=False) as writer:
    assert writer.has(1, "loss") and not writer.has(2, "loss") and not writer.has(1, "acc")
    writer.write(2, {"acc": 0.5}, prefix="x/")
    assert writer.has(2, "x/acc")
  rows = list(read_metrics(os.path.join(tmp_path, "metrics.jsonl")))   # all parse
  assert [r["step"] for r in rows] == [0, 1, 2]
