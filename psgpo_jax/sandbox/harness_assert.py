"""Assert-style tests: the program and the test snippets share one namespace.

The program has to run in this process (the snippets call it directly), so nothing
the program can reach may decide the verdict:

- Every reference the harness uses after the program ran (`exec`, the exception
  class it catches, the reporter, the guards) is a local taken before the program
  ran, or a closure cell; no builtin or module global is looked up on the way from
  "the snippet returned" to "the result line is written". All test snippets are
  compiled before the program runs.
- Each snippet is compiled with one more statement at its end that stores a per-run
  random value under a per-run random name; the snippet counts as passed only if
  that value is there afterwards, so "no exception" never means "nothing ran".
- Before and after each snippet, builtins, the watched modules and
  `__builtins__` are put back as they were (`monitor.make_restorer`), and trace and
  profile hooks are removed; what had changed is reported as a hack.
- An audit hook reports frame introspection and process tricks by the program
  (`monitor.make_audit_hook`); classes with comparison overrides and early exits
  (SystemExit, KeyboardInterrupt, other BaseExceptions) and builtins shadowed by
  the program's own globals are reported too.

What cannot be prevented here (an object whose `__eq__` always returns True, a
function that reads the expected value from its caller's frame) is reported on the
`H` lines and ends up in `Result.hacks`; docs/sandbox.md has the list.
"""
from __future__ import annotations

import builtins
import os
import sys
import types
from typing import Any, Dict, List, Optional, Sequence, Tuple

from psgpo_jax.sandbox import monitor, report

Compiled = Tuple[Optional[types.CodeType], str, str]   # (code, proof value, error)


def _compile_with_proof(source: str, filename: str, key: str,
                        value: str) -> Compiled:
  """Compiles `source` followed by `<key> = '<value>'` (the proof it ran to its end).

  The proof is one more statement at column 0 after a newline: it closes whatever
  block the source ended in and changes nothing else (a source that does not
  compile alone does not compile with it either). Returns (code, value, "") or
  (None, value, error detail) when it does not compile.
  """
  try:
    code = compile(f"{source}\n{key} = {value!r}\n", filename, "exec")
    return code, value, ""
  except BaseException as exc:  # pylint: disable=broad-except
    return None, value, report.describe_exception(exc, {filename: source})


def _compile_tests(tests: Sequence[str], key: str) -> List[Compiled]:
  """Every snippet compiled with its own random proof value (see above)."""
  return [_compile_with_proof(test, f"<test {index}>", key, os.urandom(8).hex())
          for index, test in enumerate(tests)]


_prepared: Dict[str, Any] = {}


def prepare() -> None:
  """Takes the builtins/modules snapshot once, in the worker, before any fork.

  Each run then only compares against it (see `monitor.make_restorer`); without
  this call every run takes its own snapshot first, which is slower only.
  """
  _prepared["restore"] = monitor.make_restorer()


def program_module() -> Dict[str, Any]:
  """The program's globals: the `__dict__` of a module `__sandbox__` in `sys.modules`.

  Registered so that library code that looks up a class's module (dataclasses,
  pickle, typing) finds it; named `__sandbox__` so `if __name__ == "__main__":`
  blocks do not run.
  """
  module = types.ModuleType("__sandbox__")
  module.__builtins__ = builtins
  sys.modules["__sandbox__"] = module
  return module.__dict__


def _load(program: str, setup: str, namespace: Dict[str, Any], sources: Dict[str, str],
          catch: type) -> Optional[BaseException]:
  """Runs `setup` then `program` in `namespace`; returns the exception, if any.

  `catch` is BaseException as taken before the program ran (it may replace the
  builtin before raising).
  """
  try:
    for name, source in (("<setup>", setup), ("<program>", program)):
      if source:
        sources[name] = source
        exec(compile(source, name, "exec"), namespace)  # pylint: disable=exec-used
    return None
  except catch as exc:  # pylint: disable=broad-except
    return exc


def _load_failure(exc: BaseException, sources: Dict[str, str]) -> Tuple[str, str]:
  """(code, detail) for a program or setup that raised while loading."""
  code = report.exception_code(exc)
  detail = report.describe_exception(exc, sources)
  if isinstance(exc, SystemExit):
    detail = f"exited before the tests ran ({detail})"
  return ("error" if code == "fail" else code), detail


def run_assert(program: str, tests: Sequence[str], setup: str,
               reporter: types.SimpleNamespace) -> None:
  """Setup + program, then each snippet in the same namespace (see the module doc)."""
  # Everything below the program's first line uses only these locals.
  trusted_exec, base_exception, plain_exception = exec, BaseException, Exception
  str_type, exact_type, is_instance, index_range = str, type, isinstance, range
  settrace, setprofile, gettrace, getprofile = (sys.settrace, sys.setprofile,
                                                sys.gettrace, sys.getprofile)
  test_report, hack, done, load_failed = (reporter.test, reporter.hack, reporter.done,
                                          reporter.load_failed)
  describe, exception_code, flush = (report.describe_exception, report.exception_code,
                                     report.flush_std_streams)
  builtins_module, count = builtins, len(tests)
  proof_key = "_proof_" + os.urandom(8).hex()
  compiled = _compile_tests(tests, proof_key)
  restore = _prepared.get("restore") or monitor.make_restorer()
  sys.addaudithook(monitor.make_audit_hook(hack))

  def guard() -> None:
    """Undoes patching and hooks; reports what it found."""
    for kind in restore():
      hack(kind, "changed by the program")
    if gettrace() is not None or getprofile() is not None:
      settrace(None)
      setprofile(None)
      hack("introspects_frames", "a trace or profile hook was set")
    if namespace.get("__builtins__") is not builtins_module:
      namespace["__builtins__"] = builtins_module
      hack("patches_builtins", "__builtins__ replaced")

  def early_exit(exc: BaseException) -> None:
    """Reports SystemExit, KeyboardInterrupt and other non-Exception raises."""
    if not is_instance(exc, plain_exception):
      hack("exits_early", f"{exact_type(exc).__name__} raised")

  namespace = program_module()
  sources: Dict[str, str] = {}
  failure = _load(program, setup, namespace, sources, base_exception)
  guard()
  if failure is not None:
    early_exit(failure)
    code, detail = _load_failure(failure, sources)
    if code == "oom":
      namespace.clear()  # release the program's memory before reporting
    load_failed(code, detail)
    return
  for name in monitor.comparison_overrides(namespace):
    hack("overrides_comparison", f"class {name} defines comparisons")
  for name in monitor.shadowed_builtins(namespace):
    hack("patches_builtins", f"the builtin {name} is shadowed")
  for index in index_range(count):
    code, proof, error = compiled[index]
    name = f"<test {index}>"
    sources[name] = tests[index]
    if code is None:
      test_report(index, "error", f"test {index}: {error}")
      continue
    guard()
    try:
      trusted_exec(code, namespace)
      ran = namespace.pop(proof_key, None)
      guard()
      if exact_type(ran) is str_type and ran == proof:
        test_report(index, "ok")
      else:
        test_report(index, "error", f"test {index}: did not run to its end")
    except base_exception as exc:  # pylint: disable=broad-except
      guard()
      early_exit(exc)
      result = exception_code(exc)
      if result == "oom":
        namespace.clear()
      test_report(index, result, f"test {index}: " + describe(exc, sources))
  flush()
  guard()
  done(count)
