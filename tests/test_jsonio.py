"""Run files are strict JSON, written atomically."""
from __future__ import annotations

import json
import os

import numpy as np

from psgpo_jax.jsonio import write_json


def _reject(constant):
  raise ValueError(f"non-strict JSON constant {constant}")


def test_non_finite_floats_become_null_and_the_file_is_strict(tmp_path):
  path = str(tmp_path / "summary.json")
  value = {"prm": {"auroc": float("nan"), "ece": float("inf")},
           "curve": [1.0, float("-inf"), (2, float("nan"))], "n": np.float32(0.5),
           "path": tmp_path, "bad": np.float64("nan")}
  assert write_json(path, value) == path
  text = open(path, encoding="utf-8").read()
  out = json.loads(text, parse_constant=_reject)       # fails on NaN / Infinity
  assert out["prm"] == {"auroc": None, "ece": None}
  assert out["curve"] == [1.0, None, [2, None]]
  assert out["n"] == 0.5 and out["bad"] is None and out["path"] == str(tmp_path)
  assert not os.path.exists(path + ".tmp")              # written through a rename
