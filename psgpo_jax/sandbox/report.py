"""What the harness says and how: result lines, exception descriptions (stdlib only).

`make_reporter` writes the result lines described in `harness.py`; the other helpers
turn an exception raised by untrusted code into a test code and a one-line detail.
"""
from __future__ import annotations

import errno
import os
import sys
import traceback
import types
from typing import Any, Dict

# Outcome of one test: passed, wrong answer/assertion, other exception, memory
# exhausted, output or file size limit, CPU limit (stdio cases), killed by a signal.
CODES = ("ok", "fail", "error", "oom", "output", "timeout", "killed")
DETAIL_CHARS = 200


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
  except BaseException:  # a hostile __str__  # pylint: disable=broad-except
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
  except BaseException:  # pylint: disable=broad-except
    pass
  return first_line(message)


def exception_code(exc: BaseException) -> str:
  """Maps an exception raised by untrusted code to a test code (never "ok")."""
  if isinstance(exc, MemoryError):
    return "oom"
  if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
    return "output"
  if isinstance(exc, AssertionError):
    return "fail"
  return "error"


def make_reporter(fd: int, token: str) -> types.SimpleNamespace:
  """Result-line writers for descriptor `fd` (see the module docstring).

  The writers are closures over references taken now, before the program runs: no
  class attribute or module global that a program could replace is looked up when a
  line is written, and the token is reachable only through this local object.
  Returns a namespace with `test(index, code, detail)`, `load_failed(code, detail)`,
  `hack(kind, detail)` (once per kind) and `done(count)`.
  """
  write, getpid, shorten = os.write, os.getpid, first_line
  hacks_sent = set()

  def send(*fields: Any) -> None:
    # Only str methods and f-strings here: no builtin name is looked up.
    line = f"{token} {getpid()}" + "".join([f" {field}" for field in fields])
    data = (line.replace("\n", " ").replace("\r", " ") + "\n").encode(
        "utf-8", "backslashreplace")
    while data:
      data = data[write(fd, data):]

  def hack(kind: str, detail: str = "") -> None:
    if kind not in hacks_sent:
      hacks_sent.add(kind)
      send("H", kind, shorten(detail))

  return types.SimpleNamespace(
      test=lambda index, code, detail="": send("T", index, code, shorten(detail)),
      load_failed=lambda code, detail: send("L", code, shorten(detail)),
      hack=hack, done=lambda count: send("D", count))


def flush_std_streams() -> None:
  """Flushes the program's stdout/stderr (their output is only counted, not kept)."""
  for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
    try:
      stream.flush()
    except BaseException:  # pylint: disable=broad-except
      pass
