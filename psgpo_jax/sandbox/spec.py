"""Plain-data descriptions of a test suite, limits and results (no JAX, no I/O).

These records are the sandbox's whole interface: the data loaders build test specs,
the executor runs them, and results come back as data, never as exceptions.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple, Union

STATUSES = ("passed", "failed", "timeout", "error", "oom", "killed", "output_limit")

# What the hack monitors look for (static: `hacks.hack_flags`; at run time, for
# assert-style tests: `Result.hacks`). docs/sandbox.md says what each one covers.
HACK_KINDS = ("introspects_frames", "patches_builtins", "patches_modules",
              "overrides_comparison", "exits_early")


@dataclasses.dataclass(frozen=True)
class AssertTests:
  """Assert-style tests (HumanEval, MBPP, the synthetic suite).

  The program is executed first (after `setup`), then every snippet of `tests` runs
  in the program's namespace; a snippet passes when it raises nothing. HumanEval is one
  snippet: `test + "\\ncheck(entry_point)"`; MBPP is one snippet per `assert`.
  """
  tests: Tuple[str, ...]
  setup: str = ""


@dataclasses.dataclass(frozen=True)
class StdioTests:
  """stdin/stdout tests (LiveCodeBench stdin, APPS): `(stdin, expected_stdout)` pairs.

  Output is compared after whitespace normalisation (line-wise strip, trailing blank
  lines dropped).
  """
  cases: Tuple[Tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class CallTests:
  """Call-based tests (LiveCodeBench functional, LeetCode style).

  Each case is `(inputs_json, expected_json)`. `arg_format` says how `inputs_json`
  encodes the positional arguments: `"lines"` (default, as LiveCodeBench writes them)
  is one JSON value per line, one line per argument, so a one-line input is ONE
  argument; `"list"` is a single JSON list of all positional arguments (APPS
  call-based). The callee is `fn_name`, or the method `fn_name` of a fresh
  `class_name()` instance (LeetCode's `Solution`) when `class_name` is given. The
  return value (tuples read as lists) must equal the decoded `expected_json`, floats
  within a relative 1e-6.
  """
  fn_name: str
  cases: Tuple[Tuple[str, str], ...]
  class_name: Optional[str] = None
  arg_format: str = "lines"     # "lines" | "list"


TestSpec = Union[AssertTests, StdioTests, CallTests]


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-program limits, all enforced by the OS (rlimits, process groups, timers)."""
  timeout_s: float = 6.0        # wall clock for the whole program and all its tests
  cpu_s: float = 6.0            # RLIMIT_CPU
  memory_mb: int = 1024         # RLIMIT_AS
  file_size_mb: int = 8         # RLIMIT_FSIZE
  max_processes: int = 32       # RLIMIT_NPROC (for the sandbox uid) / threads
  output_bytes: int = 1 << 16   # captured stdout+stderr cap; more is `output_limit`


@dataclasses.dataclass(frozen=True)
class Result:
  """The outcome of one program against its tests.

  `hacks` lists the `HACK_KINDS` the run-time monitors saw (assert-style tests only:
  call-based and stdio tests are judged out of the program's reach), sorted; it is
  a tuple of strings, so a Result stays plain, hashable, JSON-ready data
  (`Result(**json.loads(json.dumps(dataclasses.asdict(r)))) == r`).
  """
  passed: bool
  status: str                   # one of STATUSES
  tests_passed: int
  tests_total: int
  detail: str = ""              # first error line, truncated
  seconds: float = 0.0
  hacks: Tuple[str, ...] = ()   # run-time hack monitor flags (see HACK_KINDS)

  def __post_init__(self):
    # Read back from JSON, `hacks` is a list: keep Results equal and hashable.
    object.__setattr__(self, "hacks", tuple(self.hacks))

  @property
  def pass_fraction(self) -> float:
    return self.tests_passed / self.tests_total if self.tests_total else 0.0
