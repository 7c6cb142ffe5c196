"""Run-time guards and hack monitors for assert-style tests (stdlib only).

Assert-style tests run the program and the test snippets in one process, so the
program can reach whatever the harness uses. Everything here is built before the
program runs, as closures whose bodies look up no global or builtin name, so that
replacing a builtin or a module attribute later does not change how they work:

- `make_restorer()`: puts back the builtins and the functions and classes of the
  watched modules (and their `sys.modules` entries) as they were, and says which
  kinds of patching it undid. The harness calls it around every snippet.
- `make_audit_hook(report_hack)`: a CPython audit hook (hooks cannot be removed)
  that reports frame and object-graph introspection (`sys._getframe`, `inspect`,
  traceback and generator frames, `gc` referrers, trace and profile hooks, ctypes
  memory access) done by the program's own code, and forks, kills and process
  starts made while the program's code is on the stack.
- `comparison_overrides(namespace)`: the program's classes that define rich
  comparisons (or `isinstance` hooks), as an object that always compares equal would.
- `shadowed_builtins(namespace)`: builtin names the program rebound as its own
  globals (`def abs(x): ...`), which the test snippets would then call.

None of this can stop a program that is determined to cheat inside the process
(see docs/sandbox.md); it makes the shortcuts fail and the rest visible.
"""
from __future__ import annotations

import builtins
import os
import sys
from typing import Any, Callable, Dict, List, Tuple

# Modules whose functions and classes test snippets use to judge a result (each
# one watched costs time in every run; the harness itself holds its own references
# to what it uses from os, sys and the rest).
WATCHED_MODULES = (
    "math", "cmath", "operator", "functools", "itertools", "collections", "json",
    "re", "string", "decimal", "fractions", "statistics", "heapq", "bisect", "copy",
    "numpy")
# Builtins a program may rebind without it counting (fast-I/O idioms, module dunders).
SHADOWING_ALLOWED = frozenset(("input", "print", "__name__", "__doc__", "__builtins__",
                               "__spec__", "__loader__", "__package__"))
COMPARISON_METHODS = ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
                      "__instancecheck__", "__subclasscheck__")

_FRAME_EVENTS = ("sys._getframe", "sys._current_frames", "sys._current_exceptions",
                 "gc.get_referrers", "gc.get_referents", "gc.get_objects",
                 "sys.settrace", "sys.setprofile", "object.__getattr__",
                 "ctypes.cdata", "ctypes.addressof", "ctypes.string_at",
                 "ctypes.wstring_at", "ctypes.dlsym")
_PROCESS_EVENTS = ("os.fork", "os.forkpty", "os.kill", "os.killpg", "os.system",
                   "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
                   "signal.pthread_kill")
# Attributes whose read is audited as `object.__getattr__` and yields a frame.
_FRAME_ATTRS = frozenset(("tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back",
                          "f_locals", "f_globals"))
# Library files that hand frames to their caller: look past them for who asked.
_TOOL_FILES = ("inspect.py", "traceback.py", os.path.join("ctypes", "__init__.py"))
# Compiled-at-run-time code that is not the program's: the tests, importlib.
_TRUSTED_SYNTHETIC = ("<test ", "<setup>", "<frozen ")


def _callables_of(module: Any) -> Tuple[Tuple[str, Any], ...]:
  """(name, value) of a module's callable attributes (functions, classes)."""
  try:
    return tuple((k, v) for k, v in vars(module).items() if callable(v))
  except Exception:  # pylint: disable=broad-except
    return ()


def make_restorer() -> Callable[[], List[str]]:
  """Snapshots builtins and the watched modules now; returns `restore() -> kinds`.

  `restore()` undoes every change to the snapshot (replaced, deleted or, for
  builtins, added names; replaced `sys.modules` entries) and returns the hack kinds
  it found: "patches_builtins", "patches_modules" (possibly both, or none).
  """
  builtins_dict, modules_dict, missing = vars(builtins), sys.modules, object()
  saved_builtins = tuple(builtins_dict.items())
  builtin_names = frozenset(builtins_dict)
  watched = tuple((name, modules_dict[name], vars(modules_dict[name]),
                   _callables_of(modules_dict[name]))
                  for name in WATCHED_MODULES if name in modules_dict)

  def restore() -> List[str]:
    kinds = []
    changed = False
    for key, value in saved_builtins:
      if builtins_dict.get(key, missing) is not value:
        builtins_dict[key] = value
        changed = True
    for key in [k for k in builtins_dict if k not in builtin_names]:
      del builtins_dict[key]
      changed = True
    if changed:
      kinds.append("patches_builtins")
    changed = False
    for name, module, namespace, saved in watched:
      if modules_dict.get(name, missing) is not module:
        modules_dict[name] = module
        changed = True
      for key, value in saved:
        if namespace.get(key, missing) is not value:
          namespace[key] = value
          changed = True
    if changed:
      kinds.append("patches_modules")
    return kinds

  return restore


def make_audit_hook(report_hack: Callable[[str, str], None]) -> Callable[[str, tuple], None]:
  """An audit hook that calls `report_hack(kind, detail)` for the program's hacks.

  Frame introspection counts when the first caller outside `_TOOL_FILES` is code the
  program compiled (`<program>`, or any other `<...>` name but the tests' own);
  process events count when such code is anywhere on the stack. Install it with
  `sys.addaudithook`; it ignores its own re-entrant events.
  """
  getframe, busy = sys._getframe, [False]  # pylint: disable=protected-access
  frame_events, process_events = frozenset(_FRAME_EVENTS), frozenset(_PROCESS_EVENTS)
  frame_attrs, tools, trusted = _FRAME_ATTRS, _TOOL_FILES, _TRUSTED_SYNTHETIC

  def untrusted(name: str) -> bool:
    return name[:1] == "<" and not name.startswith(trusted)

  def hook(event: str, args: tuple) -> None:
    is_frame, is_process = event in frame_events, event in process_events
    if not (is_frame or is_process) or busy[0]:
      return
    if event == "object.__getattr__" and (args[1:2] or ("",))[0] not in frame_attrs:
      return
    busy[0] = True
    try:
      frame = getframe(1)
      while is_frame and frame is not None and frame.f_code.co_filename.endswith(tools):
        frame = frame.f_back
      while frame is not None:
        if untrusted(frame.f_code.co_filename):
          report_hack("introspects_frames" if is_frame else "exits_early",
                      f"{event} called by the program")
          return
        if is_frame:
          return
        frame = frame.f_back
    finally:
      busy[0] = False

  return hook


def _written_by_program(method: Any) -> bool:
  """True unless `method` is a function generated by a library (e.g. dataclasses)."""
  code = getattr(method, "__code__", None)
  filename = getattr(code, "co_filename", "<program>")
  return not (isinstance(filename, str) and filename == "<string>")


def comparison_overrides(namespace: Dict[str, Any]) -> List[str]:
  """Names of the program's classes (module `__sandbox__`) defining comparisons.

  Comparisons that a library generated (dataclasses' field-wise `__eq__`) do not
  count; the program's own, functions or otherwise, do.
  """
  found = []
  for name, value in list(namespace.items()):
    try:
      if not (isinstance(value, type) and value.__module__ == "__sandbox__"):
        continue
      methods = vars(value)
      if any(_written_by_program(methods[m]) for m in COMPARISON_METHODS if m in methods):
        found.append(name)
    except Exception:  # pylint: disable=broad-except
      continue
  return found


def shadowed_builtins(namespace: Dict[str, Any]) -> List[str]:
  """Globals of the program that replace a builtin of the same name."""
  real = vars(builtins)
  return [name for name in list(namespace)
          if name in real and name not in SHADOWING_ALLOWED
          and namespace[name] is not real[name]]
