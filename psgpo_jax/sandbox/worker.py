"""A warm sandbox worker process: forks one confined child per program.

Started by `executor.Sandbox` in a fresh interpreter (`main`), it talks to the
pool over its stdin/stdout with length-prefixed JSON messages (`read_message`,
`write_message`). It is single-threaded and pre-imports common modules, so each
program costs one `fork`, not an interpreter start.

Isolation, set up once per worker when the OS allows it (`Isolation` records what
was obtained): new PID, network and mount namespaces (a user namespace too when not
root). The worker is PID 1 of its PID namespace, so programs cannot signal anything
outside it, and killing every leftover process after a program is one `kill(-1)`;
the namespace has its own /proc and private tmpfs mounts on /tmp, /var/tmp and
/dev/shm. When running as root, programs run under a uid/gid of their own
(`UID_BASE` + the worker's host pid, so a fork bomb counts against its own process
cap only), with no supplementary groups and no way to regain privileges. Per
program, the child (see `_child_main`) gets its own session, rlimits, a scrubbed
environment, stdin from /dev/null, stdout/stderr into a size-capped pipe and a
fresh working directory, removed afterwards. docs/sandbox.md has the full list.
"""
from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

from psgpo_jax.sandbox import harness

UID_BASE = 1_000_000_000          # sandbox uid = UID_BASE + the worker's host pid
RESULT_FD = 3                     # where the harness writes results in the child
MAX_RESULT_BYTES = 4 << 20        # result-line flood guard
PRIVATE_TMPFS = (("/tmp", "256m"), ("/var/tmp", "64m"), ("/dev/shm", "64m"))
DEFAULT_PREIMPORT = (
    "array", "bisect", "collections", "copy", "dataclasses", "datetime", "decimal",
    "enum", "fractions", "functools", "hashlib", "heapq", "itertools", "json",
    "math", "operator", "random", "re", "statistics", "string", "threading",
    "typing", "unittest",
)

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38
_EXIT_SETUP_FAILED = 71
_EXIT_HARNESS_FAILED = 70

_libc = ctypes.CDLL(None, use_errno=True)
_HEADER = struct.Struct(">I")


# ---------------------------------------------------------------- wire protocol


def _read_exact(fd: int, size: int) -> Optional[bytes]:
  """Reads exactly `size` bytes, or returns None at end of file."""
  chunks, remaining = [], size
  while remaining:
    chunk = os.read(fd, remaining)
    if not chunk:
      return None
    chunks.append(chunk)
    remaining -= len(chunk)
  return b"".join(chunks)


def read_message(fd: int) -> Optional[Dict[str, Any]]:
  """Reads one length-prefixed JSON message (blocking); None at end of file."""
  header = _read_exact(fd, _HEADER.size)
  if header is None:
    return None
  payload = _read_exact(fd, _HEADER.unpack(header)[0])
  return None if payload is None else json.loads(payload)


def encode_message(message: Dict[str, Any]) -> bytes:
  """Frames one JSON message: 4-byte big-endian length, then UTF-8 JSON."""
  payload = json.dumps(message).encode("utf-8")
  return _HEADER.pack(len(payload)) + payload


def write_message(fd: int, message: Dict[str, Any]) -> None:
  """Writes one framed message (blocking)."""
  data = memoryview(encode_message(message))
  while data:
    data = data[os.write(fd, data):]


# ---------------------------------------------------------------- OS helpers


def _check(ret: int, what: str) -> None:
  """Raises OSError from errno when a libc call returned -1."""
  if ret != 0:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags: int) -> bool:
  """`unshare(2)` (Python 3.11 has no os.unshare); True on success."""
  return _libc.unshare(ctypes.c_int(flags)) == 0


def _mount(source: Optional[str], target: str, fstype: Optional[str], flags: int,
           data: Optional[str] = None) -> None:
  """`mount(2)`; raises OSError on failure."""
  enc = lambda s: None if s is None else s.encode()
  _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags),
                     enc(data)), f"mount {target}")


def _prctl(option: int, arg: int) -> None:
  """`prctl(option, arg, 0, 0, 0)`; raises OSError on failure."""
  _check(_libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0),
                     ctypes.c_ulong(0), ctypes.c_ulong(0)), f"prctl {option}")


def _count_user_tasks(uid: int) -> int:
  """Threads owned by `uid` (what RLIMIT_NPROC counts), from /proc."""
  count = 0
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
      if int(fields["Uid"].split()[0]) == uid:
        count += int(fields["Threads"])
    except (OSError, KeyError, ValueError):
      continue
  return count


def remove_tree(path: str) -> None:
  """Removes a directory tree, restoring permissions a program may have taken away."""

  def _retry(func, failed_path, _):
    if os.path.islink(failed_path):  # never chmod through a program's symlink
      return
    try:
      os.chmod(os.path.dirname(failed_path), 0o700)
      os.chmod(failed_path, 0o700)
      func(failed_path)
    except OSError:
      pass

  shutil.rmtree(path, onerror=_retry)


# ---------------------------------------------------------------- isolation setup


class Isolation:
  """What this worker obtained from the OS (reported to the pool as a dict)."""

  def __init__(self):
    self.pid_namespace = False
    self.network_namespace = False
    self.mount_namespace = False
    self.private_proc = False
    self.user_namespace = False
    self.uid_drop = False
    self.uid: Optional[int] = None
    self.private_tmp: List[str] = []
    self.notes: List[str] = []

  def as_dict(self) -> Dict[str, Any]:
    return dict(vars(self))


def _enter_namespaces(iso: Isolation) -> None:
  """Unshares PID/network/mount namespaces, the largest set the OS allows."""
  root = os.geteuid() == 0
  user = 0 if root else _CLONE_NEWUSER
  for wanted in ((_CLONE_NEWPID, _CLONE_NEWNET, _CLONE_NEWNS),
                 (_CLONE_NEWPID, _CLONE_NEWNET), (_CLONE_NEWNET, _CLONE_NEWNS),
                 (_CLONE_NEWNET,), (_CLONE_NEWPID,)):
    flags = user
    for flag in wanted:
      flags |= flag
    uid, gid = os.getuid(), os.getgid()
    if _unshare(flags):
      iso.pid_namespace = bool(flags & _CLONE_NEWPID)
      iso.network_namespace = bool(flags & _CLONE_NEWNET)
      iso.mount_namespace = bool(flags & _CLONE_NEWNS)
      if user:
        iso.user_namespace = True
        _map_own_ids(uid, gid)
      return
  iso.notes.append("namespaces unavailable: network and processes are not isolated")


def _map_own_ids(uid: int, gid: int) -> None:
  """In a fresh user namespace, maps our own uid/gid to themselves."""
  try:
    with open("/proc/self/setgroups", "w") as f:
      f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
      f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
      f.write(f"{gid} {gid} 1")
  except OSError:
    pass


def _mount_private_proc(iso: Isolation) -> None:
  """Makes mounts private to the namespace and mounts a /proc of our PID namespace."""
  try:
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
  except OSError as exc:
    iso.mount_namespace = False
    iso.notes.append(f"mount namespace unusable ({exc})")
    return
  if iso.pid_namespace:
    try:
      _mount("proc", "/proc", "proc", 0)
      iso.private_proc = True
    except OSError as exc:
      iso.notes.append(f"/proc not remounted ({exc}): host processes are listed")


def _private_temp_dirs(iso: Isolation) -> None:
  """Covers /tmp, /var/tmp and /dev/shm with small private tmpfs mounts.

  Programs then see none of the host's shared temporary files and cannot fill the
  host's disk through them; our scratch directories live in the private /tmp.
  """
  needed = _needed_paths()
  for path, size in PRIVATE_TMPFS:
    if not os.path.isdir(path) or any(p == path or p.startswith(path + "/")
                                      for p in needed):
      continue
    try:
      _mount("tmpfs", path, "tmpfs", 0, f"mode=1777,size={size},nr_inodes=65536")
      iso.private_tmp.append(path)
    except OSError as exc:
      iso.notes.append(f"{path} not made private ({exc})")


def _needed_paths() -> List[str]:
  """Directories an unprivileged program needs to import modules and run Python."""
  paths = {sys.prefix, sys.exec_prefix, sys.base_prefix,
           os.path.dirname(os.path.realpath(sys.executable))}
  paths.update(p for p in sys.path if p and os.path.isdir(p))
  return sorted(os.path.realpath(p) for p in paths)


def _first_blocked(path: str) -> Optional[Tuple[str, str]]:
  """(ancestor, child) where `path` stops being traversable by other users."""
  parts = [p for p in path.split("/") if p]
  current = "/"
  for part in parts:
    if not os.stat(current).st_mode & 0o001:
      return current, part
    current = os.path.join(current, part)
  return None


def _expose_python(iso: Isolation) -> bool:
  """Lets an unprivileged uid reach the Python installation (mount namespace only).

  A Python installed under a private directory (e.g. /root/.pyenv, /root being 0700)
  is unreachable once the program drops root. Inside our mount namespace, such a
  directory is covered with a tmpfs holding only bind mounts of the children that
  lead to Python; the host's view does not change. Returns False when impossible.
  """
  for _ in range(8):
    blocked: Dict[str, set] = {}
    for path in _needed_paths():
      hit = _first_blocked(path)
      if hit:
        blocked.setdefault(hit[0], set()).add(hit[1])
    if not blocked:
      return True
    if not iso.mount_namespace:
      return False
    for directory, children in blocked.items():
      try:
        _cover_directory(directory, sorted(children))
      except OSError as exc:
        iso.notes.append(f"cannot expose {directory} ({exc})")
        return False
  return False


def _cover_directory(directory: str, children: List[str]) -> None:
  """Mounts a world-traversable tmpfs on `directory`, re-binding only `children`."""
  fds = {c: os.open(os.path.join(directory, c), os.O_PATH) for c in children}
  try:
    _mount("tmpfs", directory, "tmpfs", 0, "mode=0755,size=64k")
    for child, fd in fds.items():
      target = os.path.join(directory, child)
      if os.path.isdir(f"/proc/self/fd/{fd}"):
        os.mkdir(target)
      else:
        open(target, "w").close()
      _mount(f"/proc/self/fd/{fd}", target, None, _MS_BIND | _MS_REC)
  finally:
    for fd in fds.values():
      os.close(fd)


# ---------------------------------------------------------------- the worker


class Worker:
  """Runs jobs one at a time, each in a freshly forked, confined child."""

  def __init__(self, iso: Isolation, host_pid: int, pool_in: int, pool_out: int):
    self.iso = iso
    self.pool_in = pool_in
    self.pool_out = pool_out
    self.jobs_run = 0
    self.is_init = iso.pid_namespace and os.getpid() == 1
    self.uid = iso.uid
    self.base_tasks = 0 if self.uid is not None else _count_user_tasks(os.getuid())
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
      watch = _supervise(pid, out_r, res_r, limits)
    finally:
      os.close(out_r)
      os.close(res_r)
      self._clean_up(pid)
      remove_tree(jobdir)
    result = classify(watch, _parse_events(watch["results"], token, pid, total),
                      total, limits)
    result["seconds"] = time.monotonic() - start
    return result

  def _child_main(self, program: str, tests: Dict[str, Any], limits: Dict[str, Any],
                  jobdir: str, token: str, out_w: int, res_w: int) -> None:
    """The forked child: confine itself, run the harness, exit. Never returns."""
    try:
      os.setsid()
      devnull = os.open(os.devnull, os.O_RDONLY)
      os.dup2(devnull, 0)
      os.dup2(out_w, 1)
      os.dup2(out_w, 2)
      os.dup2(res_w, RESULT_FD, inheritable=False)
      os.closerange(RESULT_FD + 1, 1 << 20)
      _set_rlimits(limits, self.base_tasks)
      if self.uid is not None:
        os.setgroups([])
        os.setresgid(self.uid, self.uid, self.uid)
        os.setresuid(self.uid, self.uid, self.uid)
      _prctl(_PR_SET_NO_NEW_PRIVS, 1)
      _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
      # The uid change made us non-dumpable (/proc/self owned by root); a normal
      # process can read its own /proc entries. Core dumps stay off (RLIMIT_CORE).
      _prctl(_PR_SET_DUMPABLE, 1)
      os.chdir(jobdir)
      os.environ.clear()
      os.environ.update(sandbox_environment(jobdir))
      tempfile.tempdir = jobdir
      sys.stdin = open(0, "r", closefd=False)
      sys.stdout = open(1, "w", closefd=False)
      sys.stderr = open(2, "w", closefd=False)
    except BaseException:  # pylint: disable=broad-except
      os._exit(_EXIT_SETUP_FAILED)  # pylint: disable=protected-access
    try:
      harness.run(program, tests, RESULT_FD, token)
      code = 0
    except BaseException:  # pylint: disable=broad-except
      code = _EXIT_HARNESS_FAILED
    os._exit(code)  # pylint: disable=protected-access

  def _clean_up(self, pid: int) -> None:
    """Kills everything the program left behind, then reaps it."""
    try:
      os.killpg(pid, signal.SIGKILL)
    except OSError:
      pass
    if self.is_init:
      _kill_all_but_me()
    else:
      if self.uid is not None:
        _kill_uid(self.uid)
      _kill_descendants()
    _reap_orphans(max_wait_s=0.5)

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


def sandbox_environment(home: str) -> Dict[str, str]:
  """The whole environment a program sees: nothing inherited from the trainer."""
  return {
      "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home,
      "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0",
      "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
      "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
  }


def _set_rlimits(limits: Dict[str, Any], base_tasks: int) -> None:
  """Address space, CPU, file size, processes/threads, core dumps, descriptors."""
  cpu = max(1, math.ceil(limits["cpu_s"]))
  memory = int(limits["memory_mb"]) << 20
  file_size = int(limits["file_size_mb"]) << 20
  nproc = int(limits["max_processes"]) + base_tasks
  for rlimit, soft, hard in (
      (resource.RLIMIT_CORE, 0, 0),
      (resource.RLIMIT_CPU, cpu, cpu + 1),
      (resource.RLIMIT_AS, memory, memory),
      (resource.RLIMIT_FSIZE, file_size, file_size),
      (resource.RLIMIT_NPROC, nproc, nproc),
      (resource.RLIMIT_NOFILE, 256, 256)):
    current_hard = resource.getrlimit(rlimit)[1]
    if current_hard != resource.RLIM_INFINITY:  # never ask for more than we have
      hard = min(hard, current_hard)
      soft = min(soft, hard)
    resource.setrlimit(rlimit, (soft, hard))


def _supervise(pid: int, out_r: int, res_r: int, limits: Dict[str, Any]) -> Dict[str, Any]:
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


def _kill_all_but_me() -> None:
  """As PID 1 of our own PID namespace: SIGKILL every other process in it."""
  assert os.getpid() == 1
  try:
    os.kill(-1, signal.SIGKILL)
  except ProcessLookupError:
    pass


def _kill_uid(uid: int) -> None:
  """As root outside a PID namespace: SIGKILL every process of the sandbox uid.

  Temporarily takes the sandbox uid as real and effective uid (keeping root as the
  saved uid), so `kill(-1)` reaches exactly that uid's processes.
  """
  if uid < UID_BASE:
    raise ValueError(f"refusing to sweep uid {uid}")
  os.setresuid(uid, uid, 0)
  try:
    if os.getresuid()[:2] == (uid, uid):
      os.kill(-1, signal.SIGKILL)
  except ProcessLookupError:
    pass
  finally:
    os.setresuid(0, 0, 0)


def _kill_descendants(rounds: int = 32) -> None:
  """Outside a PID namespace: SIGKILL our children until there are none left.

  As a child subreaper, the worker inherits every orphaned descendant of a program
  (a daemon that called setsid included), so its children are all that is left.
  """
  me = os.getpid()
  for _ in range(rounds):
    try:
      with open(f"/proc/{me}/task/{me}/children") as f:
        pids = [int(p) for p in f.read().split()]
    except OSError:
      return
    if not pids:
      return
    for pid in pids:
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    for pid in pids:
      try:
        os.waitpid(pid, 0)
      except ChildProcessError:
        pass


def _reap_orphans(max_wait_s: float = 0.5) -> None:
  """Reaps children left over (we are a subreaper / PID 1), waiting briefly."""
  deadline = time.monotonic() + max_wait_s
  while True:
    try:
      pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
      return
    if pid == 0:
      if time.monotonic() > deadline:
        return
      time.sleep(0.001)


def _parse_events(data: bytes, token: str, pid: int, total: int) -> Dict[str, Any]:
  """Parses harness result lines, keeping only those with our token and pid."""
  tests: Dict[int, Tuple[str, str]] = {}
  load: Optional[Tuple[str, str]] = None
  done = False
  prefix = f"{token} {pid} "
  for raw in data.decode("utf-8", "replace").split("\n"):
    if not raw.startswith(prefix):
      continue
    fields = raw[len(prefix):].split(" ", 3)
    try:
      if fields[0] == "T" and len(fields) >= 3:
        index = int(fields[1])
        if 0 <= index < total and index not in tests and fields[2] in harness.CODES:
          tests[index] = (fields[2], fields[3] if len(fields) > 3 else "")
      elif fields[0] == "L" and load is None and len(fields) >= 2:
        load = (fields[1], " ".join(fields[2:]))
      elif fields[0] == "D" and int(fields[1]) == total:
        done = True
    except ValueError:
      continue
  return {"tests": tests, "load": load, "done": done}


_CODE_STATUS = {"oom": "oom", "output": "output_limit", "timeout": "timeout",
                "killed": "killed"}


def classify(watch: Dict[str, Any], events: Dict[str, Any], total: int,
             limits: Dict[str, Any]) -> Dict[str, Any]:
  """Turns what the supervisor saw and what the harness reported into a result."""
  tests = events["tests"]
  passed_count = sum(1 for code, _ in tests.values() if code == "ok")
  failures = [tests[i] for i in sorted(tests) if tests[i][0] != "ok"]

  def result(status: str, detail: str = "") -> Dict[str, Any]:
    return {"passed": status == "passed", "status": status,
            "tests_passed": passed_count, "tests_total": total,
            "detail": harness.first_line(detail)}

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
    if code == _EXIT_SETUP_FAILED:
      return result("error", "sandbox setup failed")
    detail = failures[0][1] if failures else ""
    return result("error", f"exited (status {code}) before all tests ran"
                  + (f"; {detail}" if detail else ""))
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
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
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
    _enter_namespaces(iso)
    if iso.pid_namespace:
      _become_init_or_wait(iso, pool_in, pool_out)
    if iso.mount_namespace:
      _mount_private_proc(iso)
    if iso.mount_namespace:
      _private_temp_dirs(iso)
    if os.geteuid() == 0:
      if _expose_python(iso):
        iso.uid_drop = True
        iso.uid = UID_BASE + host_pid
      else:
        iso.notes.append("python is not reachable by an unprivileged uid: "
                         "programs keep running as root")
    else:
      iso.notes.append("not root: programs run as the trainer's user")
  else:
    iso.notes.append("isolation disabled")
  try:
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
  except OSError:
    pass
  for name in preimport:
    try:
      __import__(name)
    except Exception:  # pylint: disable=broad-except
      iso.notes.append(f"could not pre-import {name}")
  worker = Worker(iso, host_pid, pool_in, pool_out)
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
