"""From what the worker saw to a result: result lines parsed, outcome classified.

`parse_events` keeps only the harness's result lines that carry the run's token and
the harness's pid (see `harness.py` for the line format); `classify` combines them
with how the child ended (wait status, limits hit) into the fields of a `Result`.
"""
from __future__ import annotations

import math
import os
import signal
from typing import Any, Dict, Optional, Tuple

from psgpo_jax.sandbox import report
from psgpo_jax.sandbox.spec import HACK_KINDS

EXIT_SETUP_FAILED = 71            # the child could not confine itself
EXIT_HARNESS_FAILED = 70          # the harness itself raised


def parse_events(data: bytes, token: str, pid: int, total: int) -> Dict[str, Any]:
  """Parses harness result lines, keeping only those with our token and pid.

  Returns `tests` (index -> (code, detail), first line per index), `load` (the
  load failure, if any), `done` (the harness reached its end) and `hacks` (the
  hack kinds it reported).
  """
  tests: Dict[int, Tuple[str, str]] = {}
  load: Optional[Tuple[str, str]] = None
  done, hacks = False, set()
  prefix = f"{token} {pid} "
  for raw in data.decode("utf-8", "replace").split("\n"):
    if not raw.startswith(prefix):
      continue
    fields = raw[len(prefix):].split(" ", 3)
    try:
      if fields[0] == "T" and len(fields) >= 3:
        index = int(fields[1])
        if 0 <= index < total and index not in tests and fields[2] in report.CODES:
          tests[index] = (fields[2], fields[3] if len(fields) > 3 else "")
      elif fields[0] == "L" and load is None and len(fields) >= 2:
        load = (fields[1], " ".join(fields[2:]))
      elif fields[0] == "H" and len(fields) >= 2 and fields[1] in HACK_KINDS:
        hacks.add(fields[1])
      elif fields[0] == "D" and int(fields[1]) == total:
        done = True
    except ValueError:
      continue
  return {"tests": tests, "load": load, "done": done, "hacks": hacks}


_CODE_STATUS = {"oom": "oom", "output": "output_limit", "timeout": "timeout",
                "killed": "killed"}


def classify(watch: Dict[str, Any], events: Dict[str, Any], total: int,
             limits: Dict[str, Any], in_process: bool = False) -> Dict[str, Any]:
  """Turns what the supervisor saw and what the harness reported into a result.

  "passed" needs every one of the `total` tests reported "ok" and the harness's
  final line. `in_process`: the program shared the harness's process (assert-style
  tests), so a harness that ended before its final line on its own (no signal, no
  limit) means the program ended it: that is reported as the hack `exits_early`.
  """
  tests = events["tests"]
  passed_count = sum(1 for code, _ in tests.values() if code == "ok")
  failures = [tests[i] for i in sorted(tests) if tests[i][0] != "ok"]
  hacks = set(events["hacks"])
  ended_early = not (events["done"] or events["load"] or watch["output_exceeded"] or
                     watch["timed_out"] or os.WIFSIGNALED(watch["status"]))
  if in_process and ended_early and os.WEXITSTATUS(watch["status"]) != EXIT_SETUP_FAILED:
    hacks.add("exits_early")

  def result(status: str, detail: str = "") -> Dict[str, Any]:
    return {"passed": status == "passed", "status": status,
            "tests_passed": passed_count, "tests_total": total,
            "detail": report.first_line(detail), "hacks": sorted(hacks)}

  status = watch["status"]
  if watch["output_exceeded"]:
    return result("output_limit", f"output exceeded {limits['output_bytes']} bytes")
  if watch["timed_out"]:
    return result("timeout", f"wall-clock limit of {limits['timeout_s']}s")
  if os.WIFSIGNALED(status):
    sig = os.WTERMSIG(status)
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and
                                 watch["cpu_s"] >= math.ceil(limits["cpu_s"])):
      return result("timeout", f"CPU time limit of {limits['cpu_s']}s")
    if sig == signal.SIGXFSZ:
      return result("output_limit", "file size limit")
    return result("killed", f"killed by {_signal_name(sig)}")
  if events["load"] is not None:
    code, detail = events["load"]
    return result(_CODE_STATUS.get(code, "error"), detail)
  if not events["done"]:
    code = os.WEXITSTATUS(status)
    if code == EXIT_SETUP_FAILED:
      return result("error", "sandbox setup failed")
    detail = failures[0][1] if failures else ""
    return result("error", f"exited (status {code}) before all tests ran"
                  + (f"; {detail}" if detail else ""))
  if len(tests) < total:
    missing = next(i for i in range(total) if i not in tests)
    return result("error", f"test {missing} reported no outcome")
  if not failures:
    return result("passed")
  codes = {code for code, _ in failures}
  for code in ("oom", "output", "timeout", "killed"):
    if code in codes:
      return result(_CODE_STATUS[code], next(d for c, d in failures if c == code))
  return result("failed", failures[0][1])


def _signal_name(sig: int) -> str:
  try:
    return signal.Signals(sig).name
  except ValueError:
    return f"signal {sig}"

