"""Test harnesses: run one program against its tests, inside the sandboxed child.

Everything here runs in the forked, already-confined child process (see `worker.py`);
nothing here is a security boundary. The harness executes the program, runs every test,
and reports each outcome on a dedicated result descriptor, one line per event:

  `<token> <pid> T <index> <code> <detail>`   one test finished
  `<token> <pid> L <code> <detail>`           the program failed to load (nothing ran)
  `<token> <pid> D <count>`                   all tests ran (written after the last one)

`token` is a per-run random string and `pid` the harness's own process id, so that lines
written by the program's own forked children are ignored. Test codes are `CODES`.
Only the standard library is used: the worker imports this module before forking.
"""
from __future__ import annotations

import builtins
import decimal
import errno
import io
import json
import math
import os
import signal
import sys
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# Outcome of one test: passed, wrong answer/assertion, other exception, memory
# exhausted, output or file size limit, CPU limit (stdio cases), killed by a signal.
CODES = ("ok", "fail", "error", "oom", "output", "timeout", "killed")
DETAIL_CHARS = 200

# Exit codes of a stdio case process (the program run once on one input).
_CASE_OK, _CASE_ERROR, _CASE_OOM, _CASE_OUTPUT = 0, 1, 2, 3
_JSON_SCALARS = (str, int, float, bool, type(None))


def first_line(text: str, limit: int = DETAIL_CHARS) -> str:
  """The first non-empty line of `text`, truncated to `limit` characters."""
  for line in str(text).splitlines():
    line = line.strip()
    if line:
      return line if len(line) <= limit else line[:limit - 3] + "..."
  return ""


def describe_exception(exc: BaseException, sources: Dict[str, str]) -> str:
  """`Type: message`, plus the innermost line of our own sources that raised it.

  Args:
    exc: the exception.
    sources: pseudo file name (`<program>`, `<test 0>`, ...) -> source text.
  """
  try:
    message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
  except BaseException:  # a hostile __str__
    message = type(exc).__name__
  message = first_line(message) or type(exc).__name__
  try:
    where = ""
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
      name = frame.f_code.co_filename
      if name in sources:
        lines = sources[name].splitlines()
        text = lines[lineno - 1].strip() if 0 < lineno <= len(lines) else ""
        where = f" at {name}:{lineno}" + (f" `{text}`" if text else "")
    message += where
  except BaseException:
    pass
  return first_line(message)


class Reporter:
  """Writes result lines on the result descriptor (see the module docstring).

  Function references are captured at construction, so a program that replaces
  `os.write` or `os.getpid` does not change how results are reported.
  """

  def __init__(self, fd: int, token: str):
    self._fd = fd
    self._token = token
    self._write = os.write
    self._getpid = os.getpid

  def _send(self, *fields: Any) -> None:
    line = " ".join([self._token, str(self._getpid())] + [str(f) for f in fields])
    line = line.replace("\n", " ").replace("\r", " ") + "\n"
    data = line.encode("utf-8", "backslashreplace")
    while data:
      data = data[self._write(self._fd, data):]

  def test(self, index: int, code: str, detail: str = "") -> None:
    """Reports the outcome of test `index`."""
    self._send("T", index, code, first_line(detail))

  def load_failed(self, code: str, detail: str) -> None:
    """Reports that the program (or its setup) did not load; no test ran."""
    self._send("L", code, first_line(detail))

  def done(self, count: int) -> None:
    """Reports that all `count` tests ran to completion."""
    self._send("D", count)


def _flush_std_streams() -> None:
  """Flushes the program's stdout/stderr (their output is only counted, not kept)."""
  for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
    try:
      stream.flush()
    except BaseException:
      pass


def _exception_code(exc: BaseException) -> str:
  """Maps an exception raised by untrusted code to a test code."""
  if isinstance(exc, MemoryError):
    return "oom"
  if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
    return "output"
  if isinstance(exc, AssertionError):
    return "fail"
  return "error"


def _load(program: str, setup: str, namespace: Dict[str, Any], reporter: Reporter,
          sources: Dict[str, str]) -> bool:
  """Runs `setup` then `program` in `namespace`; reports and returns False on failure."""
  try:
    for name, source in (("<setup>", setup), ("<program>", program)):
      if source:
        sources[name] = source
        exec(compile(source, name, "exec"), namespace)  # pylint: disable=exec-used
    return True
  except BaseException as exc:  # pylint: disable=broad-except
    code = _exception_code(exc)
    if code == "oom":
      namespace.clear()  # release the program's memory before reporting
    detail = describe_exception(exc, sources)
    if isinstance(exc, SystemExit):
      detail = f"exited before the tests ran ({detail})"
    reporter.load_failed("error" if code == "fail" else code, detail)
    return False


def run_assert(program: str, tests: Sequence[str], setup: str,
               reporter: Reporter) -> None:
  """Assert-style tests: setup + program, then each snippet in the same namespace."""
  namespace: Dict[str, Any] = {"__name__": "__sandbox__", "__builtins__": builtins}
  sources: Dict[str, str] = {}
  if not _load(program, setup, namespace, reporter, sources):
    return
  for index, test in enumerate(tests):
    name = f"<test {index}>"
    sources[name] = test
    try:
      exec(compile(test, name, "exec"), namespace)  # pylint: disable=exec-used
      reporter.test(index, "ok")
    except BaseException as exc:  # pylint: disable=broad-except
      code = _exception_code(exc)
      if code == "oom":
        namespace.clear()
      reporter.test(index, code, f"test {index}: " + describe_exception(exc, sources))
  _flush_std_streams()
  reporter.done(len(tests))


def _parse_args(inputs_json: str, arg_format: str) -> List[Any]:
  """Positional arguments of one call-based case (see `spec.CallTests`)."""
  if arg_format == "list":
    args = json.loads(inputs_json)
    if not isinstance(args, list):
      raise ValueError("inputs must be a JSON list of positional arguments")
    return args
  return [json.loads(line) for line in inputs_json.split("\n") if line.strip()]


def _plain(value: Any) -> Any:
  """Tuples -> lists, recursively, so results compare like their JSON form."""
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  return value


def values_equal(got: Any, expected: Any) -> bool:
  """Structural equality of JSON-like values, floats within 1e-6 (call-based outputs).

  Only plain JSON types compare equal: an object with a permissive `__eq__` does not.
  """
  if isinstance(got, list) and isinstance(expected, list):
    return len(got) == len(expected) and all(
        values_equal(g, e) for g, e in zip(got, expected))
  if isinstance(got, dict) and isinstance(expected, dict):
    return got.keys() == expected.keys() and all(
        values_equal(got[k], expected[k]) for k in got)
  if type(got) not in _JSON_SCALARS or type(expected) not in _JSON_SCALARS:
    return False
  if isinstance(got, float) or isinstance(expected, float):
    if isinstance(got, str) or isinstance(expected, str) or got is None or expected is None:
      return False
    return math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9)
  return got == expected


def _resolve_callee(namespace: Dict[str, Any], fn_name: str,
                    class_name: Optional[str]) -> Callable[[], Callable[..., Any]]:
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


def _short_repr(value: Any, limit: int = 60) -> str:
  """A bounded repr for mismatch details."""
  try:
    text = repr(value)
  except BaseException:
    text = f"<{type(value).__name__}>"
  return text if len(text) <= limit else text[:limit - 3] + "..."


def run_call(program: str, fn_name: str, class_name: Optional[str],
             cases: Sequence[Tuple[str, str]], arg_format: str,
             reporter: Reporter) -> None:
  """Call-based tests: call `fn_name` (or a method of `class_name()`) per case."""
  namespace: Dict[str, Any] = {"__name__": "__sandbox__", "__builtins__": builtins}
  sources: Dict[str, str] = {}
  if not _load(program, "", namespace, reporter, sources):
    return
  try:
    callee_factory = _resolve_callee(namespace, fn_name, class_name)
  except BaseException as exc:  # pylint: disable=broad-except
    reporter.load_failed("error", describe_exception(exc, sources))
    return
  for index, (inputs_json, expected_json) in enumerate(cases):
    try:
      args = _parse_args(inputs_json, arg_format)
      expected = _plain(json.loads(expected_json))
      got = _plain(callee_factory()(*args))
      if values_equal(got, expected):
        reporter.test(index, "ok")
      else:
        reporter.test(index, "fail", f"case {index}: expected "
                      f"{_short_repr(expected)}, got {_short_repr(got)}")
    except BaseException as exc:  # pylint: disable=broad-except
      code = _exception_code(exc)
      reporter.test(index, "error" if code == "fail" else code,
                    f"case {index}: " + describe_exception(exc, sources))
  _flush_std_streams()
  reporter.done(len(cases))


def normalize_output(text: str) -> List[str]:
  """Line-wise stripped lines, trailing blank lines dropped (stdio comparison)."""
  lines = [line.strip() for line in text.splitlines()]
  while lines and not lines[-1]:
    lines.pop()
  return lines


def _tokens_equal(got_line: str, expected_line: str) -> bool:
  """Whitespace-separated tokens equal, numbers compared as decimals (`1.0 == 1`)."""
  got, expected = got_line.split(), expected_line.split()
  if len(got) != len(expected):
    return False
  for g, e in zip(got, expected):
    if g == e:
      continue
    try:
      if decimal.Decimal(g) != decimal.Decimal(e):
        return False
    except (decimal.InvalidOperation, ValueError):
      return False
  return True


def outputs_match(got: str, expected: str) -> bool:
  """Compares stdout with the expected output after whitespace normalisation."""
  got_lines, expected_lines = normalize_output(got), normalize_output(expected)
  if got_lines == expected_lines:
    return True
  return len(got_lines) == len(expected_lines) and all(
      _tokens_equal(g, e) for g, e in zip(got_lines, expected_lines))


def _run_case_process(code: Any, input_path: str, output_path: str,
                      result_fd: int) -> None:
  """Body of the per-case process: stdin from a file, stdout to a file. No return."""
  exit_code = _CASE_OK
  try:
    os.close(result_fd)  # the program never sees the result descriptor
    fd = os.open(input_path, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    fd = os.open(output_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.close(fd)
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
      code_name = _exception_code(exc)
      exit_code = {"oom": _CASE_OOM, "output": _CASE_OUTPUT}.get(code_name, _CASE_ERROR)
      print(describe_exception(exc, {"<program>": ""}), file=sys.stderr)
    sys.stdout.flush()
  except OSError as exc:
    exit_code = _CASE_OUTPUT if exc.errno == errno.EFBIG else _CASE_ERROR
  except MemoryError:
    exit_code = _CASE_OOM
  except BaseException:  # pylint: disable=broad-except
    exit_code = _CASE_ERROR
  finally:
    try:
      sys.stderr.flush()
    finally:
      os._exit(exit_code)  # pylint: disable=protected-access


def _read_text(path: str) -> str:
  """Reads a file written by a case process."""
  with open(path, "rb") as f:
    return f.read().decode("utf-8", "replace")


def run_stdio(program: str, cases: Sequence[Tuple[str, str]], result_fd: int,
              reporter: Reporter) -> None:
  """stdin/stdout tests: one fresh forked process per case, run as `__main__`.

  This process never runs untrusted code: each case runs in a forked child that
  has closed the result descriptor, so the program cannot write results.
  """
  try:
    code = compile(program, "<program>", "exec")
  except BaseException as exc:  # pylint: disable=broad-except
    reporter.load_failed("error", describe_exception(exc, {"<program>": program}))
    return
  input_path, output_path = os.path.abspath("stdin.txt"), os.path.abspath("stdout.txt")
  for index, (stdin, expected) in enumerate(cases):
    with open(input_path, "wb") as f:
      f.write(stdin.encode("utf-8"))
    pid = os.fork()
    if pid == 0:
      _run_case_process(code, input_path, output_path, result_fd)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
      sig = os.WTERMSIG(status)
      if sig == signal.SIGXCPU:
        reporter.test(index, "timeout", f"case {index}: CPU time limit")
      elif sig == signal.SIGXFSZ:
        reporter.test(index, "output", f"case {index}: file size limit")
      else:
        reporter.test(index, "killed",
                      f"case {index}: killed by {signal.Signals(sig).name}")
      continue
    exit_code = os.WEXITSTATUS(status)
    if exit_code == _CASE_OOM:
      reporter.test(index, "oom", f"case {index}: MemoryError")
    elif exit_code == _CASE_OUTPUT:
      reporter.test(index, "output", f"case {index}: file size limit")
    elif exit_code != _CASE_OK:
      reporter.test(index, "error", f"case {index}: runtime error (exit {exit_code})")
    else:
      got = _read_text(output_path)
      if outputs_match(got, expected):
        reporter.test(index, "ok")
      else:
        reporter.test(index, "fail", f"case {index}: expected "
                      f"{_short_repr(expected.strip())}, got {_short_repr(got.strip())}")
  reporter.done(len(cases))


def run(program: str, tests: Dict[str, Any], result_fd: int, token: str) -> None:
  """Runs `program` against a serialised test spec (see `worker.spec_to_dict`)."""
  reporter = Reporter(result_fd, token)
  kind = tests["kind"]
  if kind == "assert":
    run_assert(program, tests["tests"], tests.get("setup", ""), reporter)
  elif kind == "stdio":
    run_stdio(program, tests["cases"], result_fd, reporter)
  elif kind == "call":
    run_call(program, tests["fn_name"], tests.get("class_name"), tests["cases"],
             tests.get("arg_format", "lines"), reporter)
  else:
    reporter.load_failed("error", f"unknown test kind {kind!r}")
