"""Stdio and call-based tests: the program runs where the expected outputs are not.

This process (the confined harness child) never runs untrusted code. Before anything
is forked, `_take_expected` moves every expected output out of the job's data into a
private list; each program process then empties its copy of that list first, closes
the result descriptor, and only then runs the program. So the program can reach
neither the expected outputs (no object, frame or `gc` referrer holds them) nor the
result channel, and this process is made non-dumpable, so its memory and descriptors
cannot be read through /proc either. The program's outputs come back as data
(stdout in a file; call results as exact-typed JSON, `compare.to_wire`) and are
compared here.
"""
from __future__ import annotations

import builtins
import errno
import io
import json
import os
import signal
import stat
import sys
import types
from typing import Any, Dict, List, Optional, Sequence, Tuple

from psgpo_jax.sandbox import compare, confine, harness_assert, report

# Exit codes of a program process.
_CASE_OK, _CASE_ERROR, _CASE_OOM, _CASE_OUTPUT = 0, 1, 2, 3
_SIGNAL_CODES = {signal.SIGXCPU: ("timeout", "CPU time limit"),
                 signal.SIGXFSZ: ("output", "file size limit")}
_PROGRAM_CODES = ("error", "oom", "output")   # what a program may report for a case


def _take_expected(cases: Sequence[List[Any]]) -> List[Any]:
  """Moves each case's expected output out of `cases` (in place) into a new list."""
  expected = []
  for case in cases:
    expected.append(case[1])
    case[1] = None
  return expected


def _enter_program_process(expected: List[Any], result_fd: int) -> None:
  """First steps of a forked program process: forget the secrets, then run."""
  expected.clear()
  os.close(result_fd)  # the program never sees the result descriptor
  try:
    confine.prctl(confine.PR_SET_DUMPABLE, 1)  # its own /proc entries stay readable
  except OSError:
    pass


def _hide_this_process() -> None:
  """Makes this process non-dumpable: no /proc/<pid>/mem or fd/ for its children."""
  try:
    confine.prctl(confine.PR_SET_DUMPABLE, 0)
  except OSError:
    pass


def _signal_outcome(sig: int) -> Tuple[str, str]:
  """(test code, detail) for a program process killed by `sig`."""
  if sig in _SIGNAL_CODES:
    return _SIGNAL_CODES[sig]
  try:
    return "killed", f"killed by {signal.Signals(sig).name}"
  except ValueError:
    return "killed", f"killed by signal {sig}"


def _failure_exit_code(exc: BaseException) -> int:
  """Exit code of a program process whose own machinery (not the program) raised `exc`:
  a full output file is "output", exhausted memory "oom", anything else "error"."""
  if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
    return _CASE_OUTPUT
  if isinstance(exc, MemoryError):
    return _CASE_OOM
  return _CASE_ERROR


def _redirect(fd: int, path: str, flags: int) -> None:
  """Points descriptor `fd` at the file `path`."""
  new = os.open(path, flags, 0o600)
  os.dup2(new, fd)
  os.close(new)


def _run_case_process(code: Any, input_path: str, output_path: str) -> None:
  """Body of a stdio case process: stdin from a file, stdout to a file. No return."""
  exit_code = _CASE_OK
  exit_now = os._exit  # pylint: disable=protected-access
  try:
    _redirect(0, input_path, os.O_RDONLY)
    _redirect(1, output_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)),
                                 encoding="utf-8", errors="replace")
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)),
                                  encoding="utf-8", errors="replace")
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
      exec(code, namespace)  # pylint: disable=exec-used
    except SystemExit as exc:
      if exc.code not in (None, 0):
        exit_code = _CASE_ERROR
        print(f"SystemExit: {exc.code}", file=sys.stderr)
    except BaseException as exc:  # pylint: disable=broad-except
      namespace.clear()
      code_name = report.exception_code(exc)
      exit_code = {"oom": _CASE_OOM, "output": _CASE_OUTPUT}.get(code_name, _CASE_ERROR)
      print(report.describe_exception(exc, {"<program>": ""}), file=sys.stderr)
    sys.stdout.flush()
  except BaseException as exc:  # pylint: disable=broad-except
    exit_code = _failure_exit_code(exc)
  finally:
    try:
      sys.stderr.flush()
    finally:
      exit_now(exit_code)


def _read_text(path: str, limit: int = 64 << 20) -> str:
  """Reads a file written by a program process ("" if it left none).

  Never follows a symlink and reads only a regular file, at most `limit` bytes: the
  program may have replaced the file with a link, a FIFO or a device.
  """
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
  except OSError:
    return ""
  try:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
      return ""
    chunks, size = [], 0
    while size < limit:
      chunk = os.read(fd, min(1 << 20, limit - size))
      if not chunk:
        break
      chunks.append(chunk)
      size += len(chunk)
    return b"".join(chunks).decode("utf-8", "replace")
  finally:
    os.close(fd)


def _write_fresh(path: str, data: bytes) -> None:
  """Writes `data` to a new file at `path`, whatever a program left there."""
  try:
    os.unlink(path)
  except FileNotFoundError:
    pass
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
  try:
    while data:
      data = data[os.write(fd, data):]
  finally:
    os.close(fd)


def _judge_stdio_case(index: int, status: int, got: str, expected: str,
                      reporter: types.SimpleNamespace) -> None:
  """Reports one stdio case from its process's wait status and output."""
  if os.WIFSIGNALED(status):
    code, why = _signal_outcome(os.WTERMSIG(status))
    reporter.test(index, code, f"case {index}: {why}")
    return
  exit_code = os.WEXITSTATUS(status)
  if exit_code == _CASE_OOM:
    reporter.test(index, "oom", f"case {index}: MemoryError")
  elif exit_code == _CASE_OUTPUT:
    reporter.test(index, "output", f"case {index}: file size limit")
  elif exit_code != _CASE_OK:
    reporter.test(index, "error", f"case {index}: runtime error (exit {exit_code})")
  elif compare.outputs_match(got, expected):
    reporter.test(index, "ok")
  else:
    reporter.test(index, "fail", f"case {index}: expected "
                  f"{compare.short_repr(expected.strip())}, "
                  f"got {compare.short_repr(got.strip())}")


def run_stdio(program: str, cases: Sequence[List[str]], result_fd: int,
              reporter: types.SimpleNamespace) -> None:
  """stdin/stdout tests: one fresh forked process per case, run as `__main__`."""
  try:
    code = compile(program, "<program>", "exec")
  except BaseException as exc:  # pylint: disable=broad-except
    reporter.load_failed("error", report.describe_exception(exc, {"<program>": program}))
    return
  _hide_this_process()
  expected = _take_expected(cases)
  inputs = [case[0] for case in cases]
  input_path, output_path = os.path.abspath("stdin.txt"), os.path.abspath("stdout.txt")
  for index in range(len(inputs)):
    _write_fresh(input_path, inputs[index].encode("utf-8"))
    pid = os.fork()
    if pid == 0:
      _enter_program_process(expected, result_fd)
      _run_case_process(code, input_path, output_path)
    _, status = os.waitpid(pid, 0)
    _judge_stdio_case(index, status, _read_text(output_path), expected[index], reporter)
  reporter.done(len(inputs))


# ---------------------------------------------------------------- call-based


def _parse_args(inputs_json: str, arg_format: str) -> List[Any]:
  """Positional arguments of one call-based case (see `spec.CallTests`)."""
  if arg_format == "list":
    args = json.loads(inputs_json)
    if not isinstance(args, list):
      raise ValueError("inputs must be a JSON list of positional arguments")
    return args
  return [json.loads(line) for line in inputs_json.split("\n") if line.strip()]


def _resolve_callee(namespace: Dict[str, Any], fn_name: str,
                    class_name: Optional[str]) -> Any:
  """Returns a factory of the function under test (a fresh instance per case)."""
  if class_name:
    cls = namespace.get(class_name)
    if cls is None:
      raise NameError(f"class {class_name!r} is not defined")
    if not hasattr(cls, fn_name):
      raise AttributeError(f"{class_name} has no method {fn_name!r}")
    return lambda: getattr(cls(), fn_name)
  fn = namespace.get(fn_name)
  if fn is None or not callable(fn):
    raise NameError(f"function {fn_name!r} is not defined")
  return lambda: fn


def _call_process(program: str, fn_name: str, class_name: Optional[str],
                  inputs: Sequence[str], arg_format: str, results_path: str) -> None:
  """Body of the call-based program process: load, call each case, record. No return.

  Writes one JSON line per event to `results_path`: `["R"]` once loaded,
  `["L", code, detail]` if loading failed, and per case `["V", index, value]`
  (`compare.to_wire` of the return value) or `["E", index, code, detail]`.
  """
  exit_now = os._exit  # pylint: disable=protected-access
  exit_code, dumps = _CASE_OK, json.dumps
  sources = {"<program>": program}
  try:
    out = open(results_path, "w", encoding="utf-8")
    record = lambda *fields: (out.write(dumps(list(fields)) + "\n"), out.flush())
    namespace = harness_assert.program_module()
    try:
      exec(compile(program, "<program>", "exec"), namespace)  # pylint: disable=exec-used
      factory = _resolve_callee(namespace, fn_name, class_name)
    except BaseException as exc:  # pylint: disable=broad-except
      code, detail = report.exception_code(exc), report.describe_exception(exc, sources)
      if isinstance(exc, SystemExit):
        detail = f"exited before the tests ran ({detail})"
      record("L", "error" if code == "fail" else code, detail)
      return
    record("R")
    for index, inputs_json in enumerate(inputs):
      try:
        value = compare.to_wire(factory()(*_parse_args(inputs_json, arg_format)))
      except BaseException as exc:  # pylint: disable=broad-except
        code = report.exception_code(exc)
        record("E", index, "error" if code == "fail" else code,
               f"case {index}: " + report.describe_exception(exc, sources))
        continue
      record("V", index, value)
  except BaseException as exc:  # pylint: disable=broad-except
    exit_code = _failure_exit_code(exc)
  finally:
    try:
      report.flush_std_streams()
    finally:
      exit_now(exit_code)


def _read_call_records(path: str) -> Tuple[bool, Optional[List[Any]], Dict[int, List[Any]]]:
  """(loaded, load failure record, first record per case index) from the results file."""
  loaded, failure, per_case = False, None, {}
  for line in _read_text(path).splitlines():
    try:
      fields = json.loads(line)
    except (ValueError, RecursionError):
      continue
    if type(fields) is not list or not fields:
      continue
    if fields[0] == "R":
      loaded = True
    elif fields[0] == "L" and len(fields) == 3 and failure is None:
      failure = fields
    elif fields[0] in ("V", "E") and len(fields) >= 3 and type(fields[1]) is int:
      per_case.setdefault(fields[1], fields)
  return loaded, failure, per_case


def _judge_call_case(index: int, record: Optional[List[Any]], expected_json: str,
                     ended: Tuple[str, str], reporter: types.SimpleNamespace) -> None:
  """Reports one call-based case from the program's record (None: none written)."""
  if record is None:
    reporter.test(index, ended[0], f"case {index}: {ended[1]}")
  elif record[0] == "E":
    code = record[2] if record[2] in _PROGRAM_CODES else "error"
    reporter.test(index, code, str(record[3]) if len(record) > 3 else f"case {index}")
  else:
    try:
      got = compare.from_wire(record[2])
    except (ValueError, RecursionError):
      reporter.test(index, "error", f"case {index}: malformed result")
      return
    try:
      expected = compare.plain(json.loads(expected_json))
    except ValueError:
      reporter.test(index, "error", f"case {index}: the expected output is not JSON")
      return
    if compare.values_equal(got, expected):
      reporter.test(index, "ok")
    else:
      reporter.test(index, "fail", f"case {index}: expected "
                    f"{compare.short_repr(expected)}, got {compare.short_repr(got)}")


def _how_it_ended(status: int) -> Tuple[str, str]:
  """(code, detail) for cases the program process never recorded."""
  if os.WIFSIGNALED(status):
    return _signal_outcome(os.WTERMSIG(status))
  if os.WEXITSTATUS(status) == _CASE_OUTPUT:
    return "output", "file size limit"
  if os.WEXITSTATUS(status) == _CASE_OOM:
    return "oom", "MemoryError"
  return "error", f"the program exited (status {os.WEXITSTATUS(status)}) before returning"


def run_call(program: str, fn_name: str, class_name: Optional[str],
             cases: Sequence[List[str]], arg_format: str, result_fd: int,
             reporter: types.SimpleNamespace) -> None:
  """Call-based tests: one forked process calls `fn_name` per case; compared here."""
  _hide_this_process()
  expected = _take_expected(cases)
  inputs = [case[0] for case in cases]
  results_path = os.path.abspath("call_results.jsonl")
  pid = os.fork()
  if pid == 0:
    _enter_program_process(expected, result_fd)
    _call_process(program, fn_name, class_name, inputs, arg_format, results_path)
  _, status = os.waitpid(pid, 0)
  loaded, failure, per_case = _read_call_records(results_path)
  if failure is not None:
    code = failure[1] if failure[1] in _PROGRAM_CODES else "error"
    reporter.load_failed(code, str(failure[2]))
    return
  if not loaded:
    code, why = _how_it_ended(status)
    reporter.load_failed(code, why.replace("before returning", "before the tests ran"))
    return
  ended = _how_it_ended(status)
  for index in range(len(inputs)):
    _judge_call_case(index, per_case.get(index), expected[index], ended, reporter)
  reporter.done(len(inputs))
