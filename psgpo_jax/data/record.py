"""The Problem record, its JSON form and the hash split: the bottom of `psgpo_jax.data`.

Every source (loaders in `problems`, the synthetic suite, TFDS sets) yields the same frozen
`Problem`; `problem_to_json` / `problem_from_json` store it anywhere (the TFDS builders
among others), and `split_by_hash` makes stable train/eval splits of any problem list.
This module imports no other data module, so every one of them can import it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from psgpo_jax.sandbox.spec import AssertTests, CallTests, StdioTests, TestSpec


@dataclass(frozen=True)
class Problem:
  """One programming problem, whatever its source.

  Attributes:
    id: unique id, prefixed by source ("HumanEval/0", "mbpp/11", "livecodebench/abc301_a").
    prompt: the text the policy is conditioned on (HumanEval: the code prefix).
    tests: the sandbox test spec.
    entry_point: the function under test, when there is one.
    program_prefix: code placed before the completion to form the program.
    reference: a reference completion (response text), when known.
    source: "humaneval" | "mbpp" | "livecodebench" | "apps" | "synthetic".
    metadata: JSON-compatible extras (difficulty, contest date, horizon, ...). Use lists,
      not tuples, so that a JSON round trip gives an equal Problem.
    response_format: "plain" (the response is code) | "fenced" (a chat answer: its code
      is the first fenced block, see `fenced_code`).
  """
  id: str
  prompt: str
  tests: TestSpec
  entry_point: Optional[str] = None
  program_prefix: str = ""
  reference: Optional[str] = None
  source: str = ""
  metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)
  response_format: str = "plain"

  def code(self, completion: str) -> str:
    """The code a response contributes: itself, or its fenced block ("fenced")."""
    return fenced_code(completion) if self.response_format == "fenced" else completion

  def program(self, completion: str) -> str:
    """The program to run: `program_prefix + code(completion)`."""
    return self.program_prefix + self.code(completion)


FENCE = "```"


def fenced_code(text: str) -> str:
  """The code of the first fenced block of a chat answer (```python ... ```).

  The block closes at the next line that starts with ```. An unclosed block (a
  response cut by a stop string or the token limit, or a prefix the PRM labeler
  probes) runs to the end of the text; text without a fence is code as it is. The info
  string after the opening fence ("python", "py") is dropped.

  Args:
    text: the response.
  Returns:
    the block's lines, each ended by a newline ("" for an empty block).
  """
  start = text.find(FENCE)
  if start < 0:
    return text
  body_start = text.find("\n", start)
  if body_start < 0:
    return ""
  body = text[body_start + 1:]
  if body.startswith(FENCE):
    return ""
  end = body.find("\n" + FENCE)          # the closing fence starts a line
  if end >= 0:
    body = body[:end + 1]
  return body if not body or body.endswith("\n") else body + "\n"


# ---------------------------------------------------------------------------------------
# JSON serialisation (used by the TFDS builders and anywhere a Problem is stored).
# ---------------------------------------------------------------------------------------


def tests_to_dict(tests: TestSpec) -> Dict[str, Any]:
  """A test spec as a JSON-compatible dict with a "kind" tag."""
  if isinstance(tests, AssertTests):
    return {"kind": "assert", "tests": list(tests.tests), "setup": tests.setup}
  if isinstance(tests, StdioTests):
    return {"kind": "stdio", "cases": [list(c) for c in tests.cases]}
  if isinstance(tests, CallTests):
    return {"kind": "call", "fn_name": tests.fn_name, "cases": [list(c) for c in tests.cases],
            "class_name": tests.class_name, "arg_format": tests.arg_format}
  raise TypeError(f"not a test spec: {type(tests).__name__}")


def tests_from_dict(d: Mapping[str, Any]) -> TestSpec:
  """Inverse of `tests_to_dict` (tuples restored)."""
  kind = d["kind"]
  if kind == "assert":
    return AssertTests(tuple(d["tests"]), d.get("setup", ""))
  if kind == "stdio":
    return StdioTests(tuple((str(i), str(o)) for i, o in d["cases"]))
  if kind == "call":
    return CallTests(d["fn_name"], tuple((str(i), str(o)) for i, o in d["cases"]),
                     d.get("class_name"), d.get("arg_format", "lines"))
  raise ValueError(f"unknown test kind {kind!r}")


def num_tests(tests: TestSpec) -> int:
  """Number of test snippets or cases in a spec."""
  return len(tests.tests) if isinstance(tests, AssertTests) else len(tests.cases)


def problem_to_dict(problem: Problem) -> Dict[str, Any]:
  """A Problem as a JSON-compatible dict."""
  d = dataclasses.asdict(problem)
  d["tests"] = tests_to_dict(problem.tests)
  d["metadata"] = dict(problem.metadata)
  return d


def problem_from_dict(d: Mapping[str, Any]) -> Problem:
  """Inverse of `problem_to_dict`."""
  d = dict(d)
  d["tests"] = tests_from_dict(d["tests"])
  return Problem(**d)


def problem_to_json(problem: Problem) -> str:
  """A Problem as one JSON string (keys sorted, so equal problems give equal strings)."""
  return json.dumps(problem_to_dict(problem), sort_keys=True, ensure_ascii=False)


def problem_from_json(text: Union[str, bytes]) -> Problem:
  """Inverse of `problem_to_json`."""
  return problem_from_dict(json.loads(text))


# ---------------------------------------------------------------------------------------
# The hash split.
# ---------------------------------------------------------------------------------------


def split_by_hash(problems: Sequence[Problem], eval_fraction: float, salt: str = ""
                  ) -> Tuple[List[Problem], List[Problem]]:
  """(train, eval): a problem goes to eval when a hash of `salt + id` falls below
  `eval_fraction`, so the assignment is stable whatever the order or the other problems."""
  train, evals = [], []
  for problem in problems:
    digest = hashlib.sha256((salt + problem.id).encode("utf-8")).digest()
    (evals if int.from_bytes(digest[:8], "big") / 2.0**64 < eval_fraction else train).append(
        problem)
  return train, evals
