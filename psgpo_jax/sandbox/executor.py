"""The sandbox pool: warm worker processes, scheduling, a result cache.

`Sandbox` starts `num_workers` worker processes (`worker.main` in a fresh interpreter,
never a fork of this, possibly multithreaded, process) and feeds them jobs over
pipes. Each worker forks one confined child per program (see `worker.py`). Whatever a
program does, every job gets a `Result`: a worker that dies or hangs is killed and
replaced, and the job it was running is reported as `killed`.

`run_tests` / `run_many` use a lazily created module-level pool, closed at exit.
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import hashlib
import json
import os
import selectors
import shutil
import subprocess
import sys
import threading
import time
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

from psgpo_jax.sandbox import protocol, worker as worker_lib
from psgpo_jax.sandbox.spec import (AssertTests, CallTests, Limits, Result, StdioTests,
                                    TestSpec)

Job = Tuple[str, TestSpec]

PIPELINE_DEPTH = 2          # jobs queued per worker, so it never waits for the pool
STARTUP_TIMEOUT_S = 60.0    # a worker must say hello within this
HANG_GRACE_S = 10.0         # beyond timeout_s, a silent worker is considered hung
_WORKER_MAIN = ("import sys; from psgpo_jax.sandbox.worker import main; "
                "main(sys.argv[1:])")
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def spec_to_dict(tests: TestSpec) -> Dict[str, Any]:
  """Serialises a test spec for the worker (plain JSON types)."""
  if isinstance(tests, AssertTests):
    return {"kind": "assert", "tests": list(tests.tests), "setup": tests.setup}
  if isinstance(tests, StdioTests):
    return {"kind": "stdio", "cases": [list(c) for c in tests.cases]}
  if isinstance(tests, CallTests):
    if tests.arg_format not in ("lines", "list"):
      raise ValueError(f"unknown CallTests.arg_format {tests.arg_format!r}")
    return {"kind": "call", "fn_name": tests.fn_name, "class_name": tests.class_name,
            "cases": [list(c) for c in tests.cases], "arg_format": tests.arg_format}
  raise TypeError(f"not a test spec: {type(tests).__name__}")


def _num_tests(tests: TestSpec) -> int:
  return len(tests.tests if isinstance(tests, AssertTests) else tests.cases)


def cache_key(program: str, tests: Dict[str, Any], limits: Dict[str, Any]) -> str:
  """Hash of (program, tests, limits): equal keys give equal results."""
  blob = json.dumps([program, tests, limits], sort_keys=True).encode("utf-8", "surrogatepass")
  return hashlib.sha256(blob).hexdigest()


def _cacheable(result: Result) -> bool:
  """Timeouts (load-dependent) and infrastructure failures are not cached."""
  return result.status not in ("timeout", "killed")


def _worker_environment() -> Dict[str, str]:
  """The workers' whole environment: nothing from the trainer's (no secrets)."""
  env = worker_lib.sandbox_environment("/nonexistent")
  env["PYTHONPATH"] = _PACKAGE_ROOT
  return env


class _WorkerProcess:
  """The pool's handle on one worker: process, pipes, queued jobs."""

  def __init__(self, isolate: bool, preimport: Sequence[str]):
    command = [sys.executable, "-s", "-B", "-c", _WORKER_MAIN,
               "--preimport", ",".join(preimport)]
    if not isolate:
      command.append("--no-isolation")
    self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 cwd="/", env=_worker_environment(), close_fds=True,
                                 start_new_session=True)
    self.in_fd = self.proc.stdin.fileno()
    self.out_fd = self.proc.stdout.fileno()
    self.buffer = bytearray()
    self.inflight: Deque[str] = collections.deque()  # job keys, oldest = running
    self.busy_since = 0.0
    self.hello: Dict[str, Any] = {}

  def wait_hello(self, timeout_s: float) -> None:
    """Blocks until the worker reports its isolation; raises if it does not."""
    deadline = time.monotonic() + timeout_s
    selector = selectors.DefaultSelector()
    selector.register(self.out_fd, selectors.EVENT_READ)
    try:
      while not self.hello:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not selector.select(remaining):
          raise RuntimeError("sandbox worker did not start in time")
        messages = self.read_messages()
        if messages is None:
          raise RuntimeError(f"sandbox worker exited at start (code {self.proc.poll()})")
        for message in messages:
          if message.get("op") == "hello":
            self.hello = message
    finally:
      selector.close()

  def send(self, message: Dict[str, Any]) -> None:
    """Writes one message; raises BrokenPipeError if the worker is gone."""
    data = memoryview(protocol.encode_message(message))
    while data:
      data = data[os.write(self.in_fd, data):]

  def read_messages(self) -> Optional[List[Dict[str, Any]]]:
    """Reads what is available; returns complete messages, or None at EOF."""
    chunk = os.read(self.out_fd, 1 << 16)
    if not chunk:
      return None
    self.buffer += chunk
    messages = []
    while len(self.buffer) >= 4:
      size = int.from_bytes(self.buffer[:4], "big")
      if len(self.buffer) < 4 + size:
        break
      messages.append(json.loads(bytes(self.buffer[4:4 + size])))
      del self.buffer[:4 + size]
    return messages

  def kill(self) -> None:
    """Kills the worker (its PID namespace, if any, dies with it) and cleans up."""
    try:
      self.proc.kill()
    except OSError:
      pass
    self.proc.wait()
    self._close_pipes()
    scratch = self.hello.get("scratch")
    if scratch and os.path.isdir(scratch):
      shutil.rmtree(scratch, ignore_errors=True)

  def close(self, timeout_s: float = 5.0) -> None:
    """Asks the worker to exit (EOF on its stdin), killing it if it does not."""
    try:
      self.proc.stdin.close()
    except OSError:
      pass
    try:
      self.proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
      pass
    self.kill()

  def _close_pipes(self) -> None:
    for stream in (self.proc.stdin, self.proc.stdout):
      try:
        stream.close()
      except OSError:
        pass


class Sandbox:
  """A pool of warm sandbox workers with a result cache. Thread-safe; reusable.

  Args:
    num_workers: worker processes (default: the number of usable CPU cores).
    limits: default per-program limits.
    cache_size: results kept in the LRU cache (0 disables it).
    preimport: modules each worker imports once, before forking programs.
    isolate: False disables namespaces and the uid drop (debugging only).
  """

  def __init__(self, num_workers: Optional[int] = None, limits: Limits = Limits(),
               cache_size: int = 100_000,
               preimport: Sequence[str] = worker_lib.DEFAULT_PREIMPORT,
               isolate: bool = True):
    self.num_workers = num_workers or len(os.sched_getaffinity(0))
    self.limits = limits
    self.cache_size = cache_size
    self.preimport = tuple(preimport)
    self.isolate = isolate
    self.stats = collections.Counter()
    self._cache: "collections.OrderedDict[str, Result]" = collections.OrderedDict()
    self._lock = threading.Lock()
    self._workers: List[_WorkerProcess] = []
    self._closed = False
    self._start_workers(self.num_workers)

  # --- workers

  def _start_workers(self, count: int) -> List[_WorkerProcess]:
    started = [_WorkerProcess(self.isolate, self.preimport) for _ in range(count)]
    try:
      for w in started:
        w.wait_hello(STARTUP_TIMEOUT_S)
    except BaseException:
      for w in started:
        w.kill()
      raise
    self._workers.extend(started)
    return started

  def _replace(self, dead: _WorkerProcess) -> _WorkerProcess:
    dead.kill()
    self._workers.remove(dead)
    self.stats["worker_restarts"] += 1
    return self._start_workers(1)[0]

  def isolation_report(self) -> Dict[str, Any]:
    """Which isolation features the workers obtained from the OS (see docs)."""
    report = dict(self._workers[0].hello["isolation"])
    report["rlimits"] = True
    report["process_group_kill"] = True
    report["scrubbed_environment"] = True
    return report

  # --- running

  def run(self, program: str, tests: TestSpec, limits: Optional[Limits] = None,
          use_cache: bool = True) -> Result:
    """Runs one program against its tests."""
    return self.run_many([(program, tests)], limits, use_cache)[0]

  def run_many(self, jobs: Sequence[Job], limits: Optional[Limits] = None,
               use_cache: bool = True, progress: bool = False) -> List[Result]:
    """Runs `(program, tests)` jobs in parallel; results in the order of `jobs`."""
    limits = limits or self.limits
    limits_dict = dataclasses.asdict(limits)
    keys, payloads = [], {}
    for program, tests in jobs:
      tests_dict = spec_to_dict(tests)
      key = cache_key(program, tests_dict, limits_dict)
      keys.append(key)
      payloads.setdefault(key, (program, tests_dict, _num_tests(tests)))
    with self._lock:
      if self._closed:
        raise RuntimeError("the sandbox is closed")
      done: Dict[str, Result] = {}
      if use_cache:
        for key in payloads:
          if key in self._cache:
            self._cache.move_to_end(key)
            done[key] = self._cache[key]
        self.stats["cache_hits"] += sum(1 for k in keys if k in done)
      todo = [k for k in payloads if k not in done]
      bar = _progress_bar(len(keys), len(keys) - len(todo)) if progress else None
      try:
        fresh = self._schedule(todo, payloads, limits_dict, limits, bar, keys)
      finally:
        if bar is not None:
          bar.close()
      done.update(fresh)
      if use_cache and self.cache_size:
        for key, result in fresh.items():
          if _cacheable(result):
            self._cache[key] = result
        while len(self._cache) > self.cache_size:
          self._cache.popitem(last=False)
    self.stats["jobs"] += len(keys)
    return [done[k] for k in keys]

  def _schedule(self, todo: List[str], payloads: Dict[str, Tuple[str, Dict, int]],
                limits_dict: Dict[str, Any], limits: Limits, bar: Any,
                keys: List[str]) -> Dict[str, Result]:
    """Feeds jobs to workers until every key has a result."""
    multiplicity = collections.Counter(keys)
    pending: Deque[str] = collections.deque(todo)
    results: Dict[str, Result] = {}
    hang_s = limits.timeout_s + HANG_GRACE_S

    def send_more(w: _WorkerProcess) -> bool:
      while pending and len(w.inflight) < PIPELINE_DEPTH:
        key = pending.popleft()
        program, tests_dict, _ = payloads[key]
        if not w.inflight:
          w.busy_since = time.monotonic()
        w.inflight.append(key)
        try:
          w.send({"op": "run", "id": key, "program": program, "tests": tests_dict,
                  "limits": limits_dict})
        except OSError:  # the worker is gone; this job never reached it
          w.inflight.pop()
          pending.appendleft(key)
          return False
      return True

    def on_death(w: _WorkerProcess, why: str) -> _WorkerProcess:
      if w.inflight:
        key = w.inflight.popleft()
        results[key] = Result(False, "killed", 0, payloads[key][2],
                              f"sandbox worker {why}")
        if bar is not None:
          bar.update(multiplicity[key])
        pending.extendleft(reversed(w.inflight))
        w.inflight.clear()
      self.stats["worker_deaths"] += 1
      return self._replace(w)

    while len(results) < len(todo):
      for w in list(self._workers):
        if not send_more(w):
          new = on_death(w, "died")
          send_more(new)
      selector = selectors.DefaultSelector()
      for w in self._workers:
        if w.inflight:
          selector.register(w.out_fd, selectors.EVENT_READ, w)
      ready = selector.select(timeout=1.0)
      selector.close()
      now = time.monotonic()
      for selected, _ in ready:
        w = selected.data
        messages = w.read_messages()
        if messages is None:
          on_death(w, "died")
          continue
        for message in messages:
          key = message.get("id")
          if message.get("op") != "result" or key not in w.inflight:
            continue
          w.inflight.remove(key)
          results[key] = Result(message["passed"], message["status"],
                                message["tests_passed"], message["tests_total"],
                                message["detail"], message["seconds"],
                                tuple(message.get("hacks", ())))
          self.stats["runs"] += 1
          w.busy_since = now
          if bar is not None:
            bar.update(multiplicity[key])
      for w in list(self._workers):
        if w.inflight and now - w.busy_since > hang_s:
          on_death(w, "hung")
    return results

  # --- lifetime

  def close(self) -> None:
    """Stops all workers and removes their scratch directories."""
    with self._lock:
      self._closed = True
      for w in self._workers:
        w.close()
      self._workers = []

  def __enter__(self) -> "Sandbox":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def __del__(self):
    try:
      if not self._closed:
        self.close()
    except Exception:  # pylint: disable=broad-except
      pass


def _progress_bar(total: int, initial: int) -> Any:
  """A tqdm bar over programs (imported only when asked for)."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, initial=initial, desc="sandbox", unit="prog")


# ---------------------------------------------------------------- default pool

_default: Optional[Sandbox] = None
_default_lock = threading.Lock()


def default_sandbox(num_workers: Optional[int] = None) -> Sandbox:
  """The module-level pool, created on first use (and recreated to resize)."""
  global _default
  with _default_lock:
    if _default is not None and num_workers and _default.num_workers != num_workers:
      _default.close()
      _default = None
    if _default is None:
      _default = Sandbox(num_workers)
    return _default


@atexit.register
def shutdown_default_sandbox() -> None:
  """Closes the module-level pool (registered at exit)."""
  global _default
  with _default_lock:
    if _default is not None:
      _default.close()
      _default = None


def run_tests(program: str, tests: TestSpec, limits: Limits = Limits()) -> Result:
  """Runs one program against its tests in the default pool."""
  return default_sandbox().run(program, tests, limits)


def run_many(jobs: Sequence[Job], limits: Limits = Limits(),
             num_workers: Optional[int] = None, use_cache: bool = True,
             progress: bool = False) -> List[Result]:
  """Runs many `(program, tests)` jobs in parallel in the default pool (order kept)."""
  return default_sandbox(num_workers).run_many(jobs, limits, use_cache, progress)


def isolation_report() -> Dict[str, Any]:
  """Which isolation features are active on this host (starts the default pool)."""
  return default_sandbox().isolation_report()
