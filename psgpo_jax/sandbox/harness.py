"""Test harnesses: run one program against its tests, inside the sandboxed child.

Everything here runs in the forked, already-confined child process (see `worker.py`).
The harness executes the program, runs every test, and reports each outcome on a
dedicated result descriptor, one line per event:

  `<token> <pid> T <index> <code> <detail>`   one test finished
  `<token> <pid> L <code> <detail>`           the program failed to load (nothing ran)
  `<token> <pid> H <kind> <detail>`           a hack monitor fired (assert-style tests)
  `<token> <pid> D <count>`                   all tests ran (written after the last one)

`token` is a per-run random string and `pid` the harness's own process id, so that lines
written by the program's own forked children are ignored. Test codes are
`report.CODES`.

Where the program runs: call-based and stdio tests run it in a forked process that
holds none of the expected outputs and cannot write results (`harness_io.py`); the
comparison happens here, out of its reach. Assert-style tests must run the program's
code and the test snippets in one namespace (`harness_assert.py`); there the harness
keeps its own references, proves that each snippet ran to its end, and reports what
the hack monitors saw (`monitor.py`). Only the standard library is used: the worker
imports these modules before forking.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, List

from psgpo_jax.sandbox import harness_assert, harness_io, report


_OWN_MODULES: List[str] = []


def prepare() -> None:
  """Work done once in the worker, before it forks: names of our modules, snapshots."""
  _OWN_MODULES[:] = _own_module_names()
  harness_assert.prepare()


def _own_module_names() -> List[str]:
  return [n for n in sys.modules if n == "psgpo_jax" or n.startswith("psgpo_jax.")]


def _forget_own_modules() -> None:
  """Drops this package from `sys.modules` before any untrusted code runs.

  A program that imports `psgpo_jax.sandbox.harness` then gets a fresh copy, not
  the modules running it, so patching that copy changes nothing here.
  """
  for name in _OWN_MODULES or _own_module_names():
    sys.modules.pop(name, None)


def run(program: str, tests: Dict[str, Any], result_fd: int, token: str) -> None:
  """Runs `program` against a serialised test spec (see `executor.spec_to_dict`)."""
  reporter = report.make_reporter(result_fd, token)
  kind = tests["kind"]
  if kind == "assert":
    _forget_own_modules()
    harness_assert.run_assert(program, tests["tests"], tests.get("setup", ""), reporter)
  elif kind == "stdio":
    harness_io.run_stdio(program, tests["cases"], result_fd, reporter)
  elif kind == "call":
    harness_io.run_call(program, tests["fn_name"], tests.get("class_name"),
                        tests["cases"], tests.get("arg_format", "lines"), result_fd,
                        reporter)
  else:
    reporter.load_failed("error", f"unknown test kind {kind!r}")
