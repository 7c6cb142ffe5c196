"""Isolated execution of untrusted programs against unit tests (no JAX here).

  from psgpo_jax.sandbox import run_tests, run_many, AssertTests, Limits
  result = run_tests(program, AssertTests((test + f"\\ncheck({entry_point})",)))

  flags = hack_report(program, result, tests)   # RL hack monitors, {kind: bool}

See docs/sandbox.md for what is isolated, how results are classified and what the
hack monitors cover.
"""
from psgpo_jax.sandbox.executor import (Sandbox, default_sandbox, isolation_report,
                                        run_many, run_tests, shutdown_default_sandbox)
from psgpo_jax.sandbox.hacks import any_hack, hack_flags, hack_report
from psgpo_jax.sandbox.spec import (HACK_KINDS, STATUSES, AssertTests, CallTests, Limits,
                                    Result, StdioTests, TestSpec)

__all__ = [
    "AssertTests", "CallTests", "HACK_KINDS", "Limits", "Result", "STATUSES", "Sandbox",
    "StdioTests", "TestSpec", "any_hack", "default_sandbox", "hack_flags", "hack_report",
    "isolation_report", "run_many", "run_tests", "shutdown_default_sandbox",
]
