"""The ablation's records: each finished run, and the shared stages, as one small JSON file.

A run dir holds checkpoints and samples (megabytes, machine-local); the report needs only
a few kilobytes of it. `<record_dir>/<setting>/seed<k>.json` keeps that part of a finished
run (its eval report, RL result, the metrics rows the report plots, per-problem pass
counts and config) and `<record_dir>/shared.json` the shared stages' results, so the
records can be committed beside the report: an ablation then spans machines and sessions
(a run with a record is never trained again), and `--report_only` rewrites the report
from the records alone.

Runs are comparable only when they start from the same SFT policy and PRM. The stages are
deterministic for a given code version and platform only (another CPU's matmul kernels
round differently, and a thousand SFT steps amplify that), so the shared stages' outputs
the runs read (the tokenizer, the SFT policy, the PRM: `SHARED_FILES`, a few MB) are
recorded too, in `<record_dir>/shared/`: another machine restores them instead of training
its own (`restore_shared`). Shared stages trained anew are checked against the record's
fingerprint (their results without wall-clock fields) and `check_shared` refuses to mix
runs from different ones.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from psgpo_jax.jsonio import write_json
from psgpo_jax.plots import TRAINING_PLOT_KEYS

SHARED_STAGES = ("sft", "collect", "prm")
# What the RL runs and the report read of the shared stages (relative to the shared dir):
# the tokenizer, the SFT policy and the PRM as Hugging Face checkpoints, the results.
SHARED_FILES = ("config.json", "tokenizer", "sft/policy", "sft/result.json",
                "collect/result.json", "collect/agreement_by_k.json", "prm/model",
                "prm/result.json")
# The metrics rows' fields the report uses: the learning curve and the monitor plots.
METRIC_KEYS = ("step", "eval/updates") + tuple(key for key, _ in TRAINING_PLOT_KEYS)


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def record_path(record_dir: str, setting: str, seed: int) -> str:
  """Where the record of one run lives."""
  return os.path.join(record_dir, setting, f"seed{seed}.json")


def _problem_counts(path: str) -> Dict[str, Dict[str, int]]:
  """{task_id: {passed, samples, horizon}} from an eval samples file ({} if absent)."""
  from experiments.ablation_stats import problem_pass_counts  # pylint: disable=import-outside-toplevel
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return problem_pass_counts(json.loads(line) for line in f if line.strip())


def _relative_paths(value: Any, root: str) -> Any:
  """`value` with every path under `root` written relative to it (dicts and lists walked):
  records are committed, and a machine's paths have no place in them."""
  if isinstance(value, str) and os.path.isabs(value) and (
      value == root or value.startswith(root.rstrip(os.sep) + os.sep)):
    return os.path.relpath(value, root)
  if isinstance(value, dict):
    return {k: _relative_paths(v, root) for k, v in value.items()}
  if isinstance(value, list):
    return [_relative_paths(v, root) for v in value]
  return value


def run_record(run_dir: str) -> Dict[str, Any]:
  """The part of a finished run dir the report reads: eval report (before / after RL), RL
  result, the metrics rows' METRIC_KEYS, per-problem pass counts, and the run's config."""
  from psgpo_jax.logging import read_metrics  # pylint: disable=import-outside-toplevel
  metrics = [{k: row[k] for k in METRIC_KEYS if k in row}
             for row in read_metrics(os.path.join(run_dir, "rl", "metrics.jsonl"))]
  record = {"report": _read_json(os.path.join(run_dir, "eval", "report.json")),
            "rl": _read_json(os.path.join(run_dir, "rl", "result.json")),
            "metrics": [m for m in metrics if len(m) > 1],
            "problems": {label: _problem_counts(os.path.join(run_dir, "eval",
                                                             f"samples_{label}.jsonl"))
                         for label in ("before", "after")},
            "config": _read_json(os.path.join(run_dir, "config.json"))}
  return _relative_paths(record, os.path.dirname(os.path.dirname(os.path.abspath(run_dir))))


def library_versions() -> Dict[str, str]:
  """Versions of the libraries the stages' numerics depend on."""
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  out = {}
  for name in ("jax", "jaxlib", "flax", "optax", "numpy"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = "not installed"
  return out


def shared_record(shared_dir: str) -> Dict[str, Any]:
  """The shared stages' config, results, label agreement by K, and the library versions
  that made them."""
  agreement = os.path.join(shared_dir, "collect", "agreement_by_k.json")
  record = {"versions": library_versions(),
            "config": _read_json(os.path.join(shared_dir, "config.json")),
            "results": {s: _read_json(os.path.join(shared_dir, s, "result.json"))
                        for s in SHARED_STAGES},
            "agreement_by_k": _read_json(agreement) if os.path.exists(agreement) else []}
  return _relative_paths(record, os.path.realpath(shared_dir))   # paths from the shared dir


def _is_outcome(key: str, value: Any) -> bool:
  """Whether a result field describes the stage's outcome, not the machine that ran it
  (wall-clock seconds, throughput, paths)."""
  if "seconds" in key:            # seconds, wall_seconds, seconds_per_response, ...
    return False
  return not (isinstance(value, str) and os.sep in value)


def fingerprint(shared: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
  """The shared stages' outcome: their results without wall-clock fields and paths."""
  return {stage: {k: v for k, v in result.items() if _is_outcome(k, v)}
          for stage, result in shared["results"].items()}


def _differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> List[str]:
  """'stage.field: a vs b' for each field that differs (floats to a relative 1e-6)."""
  out = []
  for stage in sorted(set(a) | set(b)):
    x, y = a.get(stage, {}), b.get(stage, {})
    for key in sorted(set(x) | set(y)):
      u, v = x.get(key), y.get(key)
      same = (math.isclose(u, v, rel_tol=1e-6, abs_tol=1e-9)
              if isinstance(u, float) and isinstance(v, float) else u == v)
      if not same:
        out.append(f"{stage}.{key}: {u!r} recorded vs {v!r} now")
  return out


def check_shared(record_dir: str, shared: Mapping[str, Any]) -> None:
  """Writes the shared record, or checks the new shared stages against the recorded ones.

  Raises:
    ValueError: the recorded runs started from other shared stages (the differing
      fields are named); mixing them would compare runs from different policies.
  """
  path = os.path.join(record_dir, "shared.json")
  if os.path.exists(path):
    old = _read_json(path)
    diffs = _differences(fingerprint(old), fingerprint(shared))
    if diffs:
      raise ValueError(
          f"The shared stages here differ from those of the runs recorded in {record_dir} "
          f"({'; '.join(diffs[:5])}{'; ...' if len(diffs) > 5 else ''}): new runs would "
          "start from another SFT policy or PRM. Give --record_dir a new directory to "
          "start a new ablation, or train with the code version and libraries that made "
          f"the records (they used {old.get('versions', 'unrecorded versions')}, this "
          f"machine has {shared.get('versions', 'unrecorded versions')}).")
    return
  os.makedirs(record_dir, exist_ok=True)
  write_json(path, shared)


def shared_files_dir(record_dir: str) -> str:
  """Where the shared stages' recorded outputs (`SHARED_FILES`) live."""
  return os.path.join(record_dir, "shared")


def _mentions(path: str, text: str) -> bool:
  """Whether the file at `path` contains `text`."""
  with open(path, encoding="utf-8", errors="replace") as f:
    return text in f.read()


def _copy_files(source_dir: str, target_dir: str) -> None:
  """Copies `SHARED_FILES` (those that exist) from one shared dir to another in their
  order, each file under a temporary name first: the last stage's result file, which
  marks the stages finished, is written last, so a copy cut short is redone. JSON files
  that name paths under `source_dir` get them written relative to it (the record is
  committed); the others, and the weights, are copied byte for byte."""
  for name in SHARED_FILES:
    source = os.path.join(source_dir, name)
    files = ([os.path.join(root, f) for root, _, fs in os.walk(source) for f in fs]
             if os.path.isdir(source) else [source] if os.path.exists(source) else [])
    for path in sorted(files):
      target = os.path.join(target_dir, os.path.relpath(path, source_dir))
      os.makedirs(os.path.dirname(target), exist_ok=True)
      if path.endswith(".json") and _mentions(path, source_dir):
        write_json(target, _relative_paths(_read_json(path), source_dir))   # atomic
      else:
        shutil.copyfile(path, target + ".partial")
        os.replace(target + ".partial", target)


def save_shared(shared_dir: str, record_dir: str) -> bool:
  """Records the shared stages' outputs the runs read (once); returns whether it did."""
  from psgpo_jax.pipeline import stages_done  # pylint: disable=import-outside-toplevel
  target = shared_files_dir(record_dir)
  if stages_done(target, SHARED_STAGES):
    return False
  _copy_files(os.path.realpath(shared_dir), target)
  return True


def restore_shared(record_dir: str, shared_dir: str) -> bool:
  """Puts the recorded shared stages' outputs into `shared_dir` when it has not finished
  them (another machine, a new checkout); returns whether it did. The recorded runs
  started from exactly these, which training them again here need not reproduce."""
  from psgpo_jax.pipeline import stages_done  # pylint: disable=import-outside-toplevel
  source = shared_files_dir(record_dir)
  if not stages_done(source, SHARED_STAGES) or stages_done(shared_dir, SHARED_STAGES):
    return False
  _copy_files(source, shared_dir)
  return True


def write_run_record(record_dir: str, setting: str, seed: int, run_dir: str) -> str:
  """Records a finished run (atomically); returns the record's path."""
  path = record_path(record_dir, setting, seed)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return write_json(path, run_record(run_dir))


def recorded(record_dir: str, plan: Sequence[Tuple[str, int]]) -> List[Tuple[str, int]]:
  """The planned runs that have a record."""
  return [(s, k) for s, k in plan if os.path.exists(record_path(record_dir, s, k))]


def read_records(record_dir: str, plan: Sequence[Tuple[str, int]]
                 ) -> Tuple[Dict[str, Any], Dict[str, List[Dict[str, Any]]]]:
  """The shared record and the recorded runs grouped by setting, in plan order (runs
  without a record left out)."""
  runs: Dict[str, List[Dict[str, Any]]] = {}
  for setting, seed in recorded(record_dir, plan):
    runs.setdefault(setting, []).append(_read_json(record_path(record_dir, setting, seed)))
  return _read_json(os.path.join(record_dir, "shared.json")), runs
