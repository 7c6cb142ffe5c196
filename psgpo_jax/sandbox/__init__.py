"""Isolated execution of untrusted programs against unit tests (no JAX here).

  from psgpo_jax.sandbox import run_tests, run_many, AssertTests, Limits
  result = run_tests(program, AssertTests((test + f"\\ncheck({entry_point})",)))

See docs/sandbox.md for what is isolated and how results are classified.
"""
from psgpo_jax.sandbox.executor import (Sandbox, default_sandbox, isolation_report,
                                        run_many, run_tests, shutdown_default_sandbox)
from psgpo_jax.sandbox.spec import (STATUSES, AssertTests, CallTests, Limits, Result,
                                    StdioTests, TestSpec)

__all__ = [
    "AssertTests", "CallTests", "Limits", "Result", "STATUSES", "Sandbox", "StdioTests",
    "TestSpec", "default_sandbox", "isolation_report", "run_many", "run_tests",
    "shutdown_default_sandbox",
]
