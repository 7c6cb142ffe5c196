"""Process confinement: namespaces, mounts, uid drop, rlimits, leftover sweeps.

`setup_isolation` runs once per worker (before it serves jobs) and records in an
`Isolation` what the OS granted: new PID, network and mount namespaces (a user
namespace too when not root), a private /proc, private tmpfs mounts on /tmp,
/var/tmp and /dev/shm, and, as root, a uid/gid of its own for programs (`UID_BASE` +
the worker's host pid, so a fork bomb counts against its own process cap only).
`confine_child` runs in each forked child before the harness: own session, rlimits,
uid drop, no new privileges, a scrubbed environment, a fresh working directory.
The sweeps (`kill_leftovers`) kill whatever a program left behind. docs/sandbox.md
has the full list.
"""
from __future__ import annotations

import ctypes
import math
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

UID_BASE = 1_000_000_000          # sandbox uid = UID_BASE + the worker's host pid
PRIVATE_TMPFS = (("/tmp", "256m"), ("/var/tmp", "64m"), ("/dev/shm", "64m"))

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)


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


def prctl(option: int, arg: int) -> None:
  """`prctl(option, arg, 0, 0, 0)`; raises OSError on failure."""
  _check(_libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0),
                     ctypes.c_ulong(0), ctypes.c_ulong(0)), f"prctl {option}")


def count_user_tasks(uid: int) -> int:
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

  A Python installed under a private directory (e.g. a pyenv under a home directory of
  mode 0700) is unreachable once the program drops root. Inside our mount namespace, such a
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


def setup_isolation(iso: Isolation, host_pid: int,
                    become_init: Callable[[], None]) -> None:
  """Enters namespaces and prepares mounts and the uid drop, recording it in `iso`.

  Args:
    iso: filled in with what the OS granted.
    host_pid: the worker's pid before any PID namespace (names the sandbox uid).
    become_init: called right after a PID namespace was entered, to fork its PID 1
      (returns in the new PID 1 only).
  """
  _enter_namespaces(iso)
  if iso.pid_namespace:
    become_init()
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


# ---------------------------------------------------------------- per program


def sandbox_environment(home: str) -> Dict[str, str]:
  """The whole environment a program sees: nothing inherited from the trainer."""
  return {
      "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home,
      "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0",
      "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
      "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
  }


def set_rlimits(limits: Dict[str, Any], base_tasks: int) -> None:
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



def confine_child(limits: Dict[str, Any], base_tasks: int, uid: Optional[int],
                  jobdir: str) -> None:
  """In a freshly forked child: rlimits, uid drop, no new privileges, environment.

  Raises OSError when a step fails (the caller then exits without running anything).
  """
  set_rlimits(limits, base_tasks)
  if uid is not None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
  prctl(PR_SET_NO_NEW_PRIVS, 1)
  prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
  # The uid change made us non-dumpable (/proc/self owned by root); a normal
  # process can read its own /proc entries. Core dumps stay off (RLIMIT_CORE).
  prctl(PR_SET_DUMPABLE, 1)
  os.chdir(jobdir)
  os.environ.clear()
  os.environ.update(sandbox_environment(jobdir))
  tempfile.tempdir = jobdir


# ---------------------------------------------------------------- sweeps


def kill_leftovers(pid: int, is_init: bool, uid: Optional[int]) -> None:
  """Kills everything a program (process group `pid`) left behind, then reaps it."""
  try:
    os.killpg(pid, signal.SIGKILL)
  except OSError:
    pass
  if is_init:
    _kill_all_but_me()
  else:
    if uid is not None:
      _kill_uid(uid)
    _kill_descendants()
  _reap_orphans(max_wait_s=0.5)


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

