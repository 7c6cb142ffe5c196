"""A warm sandbox worker process: forks one confined child per program.

Started by `executor.Sandbox` in a fresh interpreter (`main`), it talks to the
pool over its stdin/stdout with length-prefixed JSON messages (`protocol.py`). It is
single-threaded and pre-imports common modules, so each program costs one `fork`,
not an interpreter start.

Isolation is set up once per worker (`confine.setup_isolation`): the worker is PID 1
of its own PID namespace when the OS allows it, so killing every leftover process
after a program is one `kill(-1)`. Per program, the child gets its own session,
rlimits, uid, environment, stdin from /dev/null, stdout/stderr into a size-capped
pipe and a fresh working directory, removed afterwards (`confine.confine_child`);
the worker watches it under the wall clock (`supervise`) and turns what it saw into
a result (`verdict.classify`). docs/sandbox.md has the full list.
"""
from __future__ import annotations

import gc
import math
import os
import select
import signal
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

from psgpo_jax.sandbox import harness, verdict
from psgpo_jax.sandbox.confine import (PR_SET_CHILD_SUBREAPER, PR_SET_PDEATHSIG,
                                       UID_BASE, Isolation, confine_child,
                                       count_user_tasks, kill_leftovers, prctl,
                                       remove_tree, sandbox_environment,
                                       setup_isolation)
from psgpo_jax.sandbox.protocol import encode_message, read_message, write_message

RESULT_FD = 3                     # where the harness writes results in the child
MAX_RESULT_BYTES = 4 << 20        # result-line flood guard
DEFAULT_PREIMPORT = (
    "array", "bisect", "collections", "copy", "dataclasses", "datetime", "decimal",
    "enum", "fractions", "functools", "hashlib", "heapq", "itertools", "json",
    "math", "operator", "random", "re", "statistics", "string", "threading",
    "typing", "unittest",
)

__all__ = ["DEFAULT_PREIMPORT", "RESULT_FD", "UID_BASE", "Worker", "encode_message",
           "main", "read_message", "sandbox_environment", "start", "supervise",
           "write_message"]


class Worker:
  """Runs jobs one at a time, each in a freshly forked, confined child."""

  def __init__(self, iso: Isolation, host_pid: int, pool_in: int, pool_out: int):
    self.iso = iso
    self.pool_in = pool_in
    self.pool_out = pool_out
    self.jobs_run = 0
    self.is_init = iso.pid_namespace and os.getpid() == 1
    self.uid = iso.uid
    self.base_tasks = 0 if self.uid is not None else count_user_tasks(os.getuid())
    self.scratch = tempfile.mkdtemp(prefix=f"psgpo-sandbox-{host_pid}-",
                                    dir=_scratch_parent(iso))
    if self.uid is not None:
      os.chmod(self.scratch, 0o711)

  # --- per job

  def _make_jobdir(self) -> str:
    self.jobs_run += 1
    path = os.path.join(self.scratch, str(self.jobs_run))
    os.mkdir(path, 0o700)
    if self.uid is not None:
      os.chown(path, self.uid, self.uid)
    return path

  def run_job(self, job: Dict[str, Any]) -> Dict[str, Any]:
    """Runs one program against its tests; returns the result fields."""
    limits, tests = job["limits"], job["tests"]
    total = len(tests["tests"] if tests["kind"] == "assert" else tests["cases"])
    jobdir = self._make_jobdir()
    token = os.urandom(12).hex()
    out_r, out_w = os.pipe()
    res_r, res_w = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
      self._child_main(job["program"], tests, limits, jobdir, token, out_w, res_w)
    os.close(out_w)
    os.close(res_w)
    try:
      watch = supervise(pid, out_r, res_r, limits)
    finally:
      os.close(out_r)
      os.close(res_r)
      self._clean_up(pid)
      remove_tree(jobdir)
    events = verdict.parse_events(watch["results"], token, pid, total)
    result = verdict.classify(watch, events, total, limits,
                              in_process=tests["kind"] == "assert")
    result["seconds"] = time.monotonic() - start
    return result

  def _child_main(self, program: str, tests: Dict[str, Any], limits: Dict[str, Any],
                  jobdir: str, token: str, out_w: int, res_w: int) -> None:
    """The forked child: confine itself, run the harness, exit. Never returns.

    `os._exit` is held in a local before the program runs, and the exit is in a
    `finally`: whatever the program replaces or raises, this process never returns
    into the worker's code.
    """
    exit_now = os._exit  # pylint: disable=protected-access
    code = verdict.EXIT_SETUP_FAILED
    try:
      os.setsid()
      devnull = os.open(os.devnull, os.O_RDONLY)
      os.dup2(devnull, 0)
      os.dup2(out_w, 1)
      os.dup2(out_w, 2)
      os.dup2(res_w, RESULT_FD, inheritable=False)
      os.closerange(RESULT_FD + 1, 1 << 20)
      confine_child(limits, self.base_tasks, self.uid, jobdir)
      sys.stdin = open(0, "r", closefd=False)
      sys.stdout = open(1, "w", closefd=False)
      sys.stderr = open(2, "w", closefd=False)
      code = verdict.EXIT_HARNESS_FAILED
      harness.run(program, tests, RESULT_FD, token)
      code = 0
    finally:
      exit_now(code)

  def _clean_up(self, pid: int) -> None:
    """Kills everything the program left behind, then reaps it."""
    kill_leftovers(pid, self.is_init, self.uid)

  # --- main loop

  def serve(self) -> None:
    """Answers the pool until it closes our stdin."""
    write_message(self.pool_out, {"op": "hello", "isolation": self.iso.as_dict(),
                                  "scratch": self.scratch, "pid": os.getpid()})
    try:
      while True:
        message = read_message(self.pool_in)
        if message is None:
          return
        if message["op"] == "run":
          result = self.run_job(message)
          result["id"] = message["id"]
          write_message(self.pool_out, {"op": "result", **result})
    except BrokenPipeError:  # the pool is gone
      return
    finally:
      remove_tree(self.scratch)



def _scratch_parent(iso: Isolation) -> Optional[str]:
  """Where job directories go: our private /tmp, else /dev/shm (tmpfs), else TMPDIR."""
  if "/tmp" in iso.private_tmp:
    return "/tmp"
  if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK):
    return "/dev/shm"
  return None


def supervise(pid: int, out_r: int, res_r: int, limits: Dict[str, Any]) -> Dict[str, Any]:
  """Waits for the child under the wall-clock and output limits.

  Returns a dict with `timed_out`, `output_exceeded`, `out_bytes` (stdout+stderr
  size), `status` (wait status), `cpu_s` (child CPU seconds) and `results` (the
  bytes written on the result pipe).
  """
  deadline = time.monotonic() + float(limits["timeout_s"])
  cap = int(limits["output_bytes"])
  watch = {"timed_out": False, "output_exceeded": False, "out_bytes": 0}
  results = bytearray()
  try:
    pidfd = os.pidfd_open(pid)
  except (AttributeError, OSError):
    pidfd = None
  poller = select.poll()
  for fd in (out_r, res_r) + ((pidfd,) if pidfd is not None else ()):
    poller.register(fd, select.POLLIN)
  exited_status = None
  try:
    while True:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        watch["timed_out"] = True
        break
      wait_ms = remaining * 1000 if pidfd is not None else min(remaining * 1000, 2)
      for fd, _ in poller.poll(max(1, math.ceil(wait_ms))):
        if fd == pidfd:
          exited_status = os.wait4(pid, 0)
          continue
        data = os.read(fd, 1 << 16)
        if not data:
          poller.unregister(fd)
        elif fd == out_r:
          watch["out_bytes"] += len(data)
        else:
          results += data
      if watch["out_bytes"] > cap or len(results) > MAX_RESULT_BYTES:
        watch["output_exceeded"] = True
        break
      if exited_status is None and pidfd is None:
        waited = os.wait4(pid, os.WNOHANG)
        exited_status = waited if waited[0] else None
      if exited_status is not None:
        break
  finally:
    if pidfd is not None:
      os.close(pidfd)
  if exited_status is None:
    try:
      os.killpg(pid, signal.SIGKILL)
    except OSError:
      pass
    exited_status = os.wait4(pid, 0)
  results += _drain(res_r)
  _, status, usage = exited_status
  watch.update(status=status, cpu_s=usage.ru_utime + usage.ru_stime,
               results=bytes(results))
  return watch


def _drain(fd: int) -> bytes:
  """Reads what is already buffered on a pipe, without blocking."""
  os.set_blocking(fd, False)
  chunks = []
  try:
    while True:
      chunk = os.read(fd, 1 << 16)
      if not chunk:
        break
      chunks.append(chunk)
  except BlockingIOError:
    pass
  return b"".join(chunks)


# ---------------------------------------------------------------- process start


def _detach_stdio() -> Tuple[int, int]:
  """Moves the pool pipes off fds 0/1; stray prints of ours go to stderr."""
  pool_in, pool_out = os.dup(0), os.dup(1)
  devnull = os.open(os.devnull, os.O_RDONLY)
  os.dup2(devnull, 0)
  os.close(devnull)
  os.dup2(2, 1)
  return pool_in, pool_out


def _become_init_or_wait(iso: Isolation, pool_in: int, pool_out: int) -> None:
  """After unsharing a PID namespace: fork its PID 1 and wait for it here.

  Returns in the new PID 1; the original process only waits and mirrors its exit.
  """
  pid = os.fork()
  if pid == 0:
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    return
  os.close(pool_in)
  os.close(pool_out)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  _, status = os.waitpid(pid, 0)
  os._exit(os.waitstatus_to_exitcode(status) & 0xFF)  # pylint: disable=protected-access



def start(isolate: bool, preimport: List[str]) -> Worker:
  """Sets up isolation and returns the worker (in the PID-1 process if any)."""
  pool_in, pool_out = _detach_stdio()
  host_pid = os.getpid()
  iso = Isolation()
  if isolate:
    setup_isolation(iso, host_pid, lambda: _become_init_or_wait(iso, pool_in, pool_out))
  else:
    iso.notes.append("isolation disabled")
  try:
    prctl(PR_SET_CHILD_SUBREAPER, 1)
  except OSError:
    pass
  for name in preimport:
    try:
      __import__(name)
    except Exception:  # pylint: disable=broad-except
      iso.notes.append(f"could not pre-import {name}")
  worker = Worker(iso, host_pid, pool_in, pool_out)
  harness.prepare()
  gc.freeze()  # keep the pre-imported heap out of the children's collections (COW)
  return worker


def main(argv: List[str]) -> None:
  """Worker entry point; argv: `[--no-isolation] [--preimport a,b]`."""
  isolate = "--no-isolation" not in argv
  preimport = list(DEFAULT_PREIMPORT)
  if "--preimport" in argv:
    value = argv[argv.index("--preimport") + 1]
    preimport = [m for m in value.split(",") if m]
  start(isolate, preimport).serve()


if __name__ == "__main__":
  main(sys.argv[1:])
