"""The built-in long-horizon task family: its problems and their generator.

Each problem asks for a function `f(x, y)` whose docstring lists H steps, one per line,
in a tiny regular language; the intended solution writes ONE body line per step, in the
same order, the last one a `return`. Step k (0-based) assigns the k-th local of
a, b, c, d, e, g, h, ... (never reassigned), so every line names its own step:

    def f(x, y):
        \"\"\"
        a is x plus 3
        b is a times y
        c is b minus 4 if a above 7 else y
        d is c mod 5
        e is d if x below d else a
        return e times b
        \"\"\"
        a = x + 3
        b = a * y
        c = b - 4 if a > 7 else y
        d = c % 5
        e = d if x < d else a
        return e * b

The prompt is the code prefix up to the closing docstring line (`program_prefix` is the
same text); the response is the body. A step and its line align token by token: the line
is the step with each word of `WORDS` replaced by its symbol (is `=`, plus `+`, minus
`-`, times `*`, div `//`, mod `%`, above `>`, below `<`) and every other token copied.
So a tiny transformer can learn it: to write line k it finds the docstring line that
starts with the k-th local and copies it, translating the operator words. A policy that
gets each line right with probability p solves a horizon-H problem with probability about
p**H: errors compound with length, which is where line-level credit should help.

Step language (u, v: a variable or a digit; t: the step's local; k: a digit):
  t is u plus|minus|times v                       ->  t = u + v | u - v | u * v
  t is u div|mod k                                ->  t = u // k | u % k
  t is u [OP v] if p above|below q else w         ->  t = u [OP v] if p > q else w
  return u [plus|minus|times v]                   ->  return u [+ - * v]

The generator keeps every problem well posed: every local is read later (no dead
stores), nudging any line's value changes the result on at least one test input (so the
unit tests see every line), each conditional's test decides the value on some inputs,
and intermediate values stay small. Held-out problems are separated from training
problems by a hash of the spec, so two splits never share a spec whatever their seeds.

The interpreter and the oracle (`first_error_line`, which decides a response's first
wrong line) are in `synthetic_oracle`; wrong lines, the noisy warm-up corpus and the
tokenizer in `synthetic_corpus`.
"""
from __future__ import annotations

import ast
import hashlib
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from psgpo_jax.data.record import Problem
from psgpo_jax.data.synthetic_oracle import (INDENT, Env, LineError, line_reads_writes,
                                            parse_line, run_line, run_reference)
from psgpo_jax.sandbox.spec import AssertTests

ARGS = ("x", "y")                      # the function's parameters
# Step k's local (f, l, o skipped: the function's name and two look-alikes of 1 and 0).
LOCALS = ("a", "b", "c", "d", "e", "g", "h", "i", "j", "k", "m", "n", "p", "q", "r")
ENTRY_POINT = "f"
MAX_ABS_VALUE = 999                    # bound on every intermediate value of a reference
NUM_TEST_INPUTS = 6
INPUT_RANGE = (0, 20)                  # test inputs x, y are drawn from [lo, hi)
HELD_OUT_FRACTION = 0.2                # share of the spec space reserved for the "test" split
MAX_HORIZON = len(LOCALS) + 1

# The step language, word for token: a step and its line align token by token.
_ARITH = {"plus": "+", "minus": "-", "times": "*"}
_DIVMOD = {"div": "//", "mod": "%"}
_COMPARE = {"above": ">", "below": "<"}
WORDS = {"is": "=", **_ARITH, **_DIVMOD, **_COMPARE}

# ---------------------------------------------------------------------------------------
# The generator.
# ---------------------------------------------------------------------------------------


def _digit(rng: np.random.Generator, lo: int = 1, hi: int = 9) -> str:
  return str(int(rng.integers(lo, hi + 1)))


def _var_or_digit(rng: np.random.Generator, names: Sequence[str], p_digit: float = 0.35
                  ) -> str:
  if not names or rng.random() < p_digit:
    return _digit(rng)
  return str(rng.choice(list(names)))


def _pick_two(rng: np.random.Generator, names: Sequence[str], must: Sequence[str]
              ) -> Tuple[str, str]:
  """Two distinct operands, at least one a variable (from `must` when non-empty)."""
  u = str(rng.choice(list(must or names)))
  v = _var_or_digit(rng, [n for n in names if n != u])
  return (v, u) if rng.random() < 0.5 else (u, v)


def _propose_step(rng: np.random.Generator, target: str, defined: Sequence[str],
                  must: Sequence[str]) -> Tuple[str, str]:
  """One non-final step assigning `target`: (spec text, code without indentation)."""
  kind = str(rng.choice(["arith", "arith", "arith", "arith", "divmod", "cond", "cond"]))
  t = target
  if kind == "divmod":
    u = str(rng.choice(list(must or defined)))
    word = str(rng.choice(list(_DIVMOD)))
    k = _digit(rng, 2, 4 if word == "div" else 9)
    return f"{t} is {u} {word} {k}", f"{t} = {u} {_DIVMOD[word]} {k}"
  u, v = _pick_two(rng, defined, must)
  word = str(rng.choice(list(_ARITH)))
  if kind == "arith":
    return f"{t} is {u} {word} {v}", f"{t} = {u} {_ARITH[word]} {v}"
  p = str(rng.choice(list(defined)))
  q = _var_or_digit(rng, [n for n in defined if n != p])
  w = str(rng.choice(list(defined)))
  cmp = str(rng.choice(list(_COMPARE)))
  if rng.random() < 0.3:                        # `t = u if p > q else w`
    return (f"{t} is {u} if {p} {cmp} {q} else {w}",
            f"{t} = {u} if {p} {_COMPARE[cmp]} {q} else {w}")
  return (f"{t} is {u} {word} {v} if {p} {cmp} {q} else {w}",
          f"{t} = {u} {_ARITH[word]} {v} if {p} {_COMPARE[cmp]} {q} else {w}")


def _propose_return(rng: np.random.Generator, defined: Sequence[str],
                    pending: Sequence[str]) -> Tuple[str, str]:
  """The final step; it reads every value not read yet."""
  pending = sorted(pending)
  if len(pending) == 1 and rng.random() < 0.4:
    return f"return {pending[0]}", f"return {pending[0]}"
  if len(pending) == 2:
    u, v = pending if rng.random() < 0.5 else pending[::-1]
  else:
    u, v = _pick_two(rng, defined, pending)
  word = str(rng.choice(list(_ARITH)))
  return f"return {u} {word} {v}", f"return {u} {_ARITH[word]} {v}"


def _sensitive(lines: Sequence[str], inputs: Sequence[Env]) -> bool:
  """Whether nudging any value a line writes (by +-1) changes the result on some input."""
  outputs = [run_reference(lines, env) for env in inputs]
  envs = [dict(env) for env in inputs]
  for k, line in enumerate(lines[:-1]):
    envs = [run_line(line, env)[0] for env in envs]
    for name in _target_names(line):
      if not any(_changes_output(lines[k + 1:], {**env, name: env[name] + delta}, out)
                 for env, out in zip(envs, outputs) for delta in (1, -1)):
        return False
  return True


def _changes_output(rest: Sequence[str], env: Env, expected: int) -> bool:
  try:
    return run_reference(rest, env) != expected
  except LineError:
    return True


def _target_names(line: str) -> frozenset:
  """Names assigned anywhere in a line (conditional targets included)."""
  stmt = parse_line(line)
  return frozenset(n.id for n in ast.walk(stmt)
                   if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))


def _degenerate(code: str) -> bool:
  """`a + a`, `x * 1`, `c // 1`, `u if p > p`, `u if .. else u`: steps that say nothing."""
  if re.search(r"[*/] 1\b|\b1 \*", code):
    return True
  value = ast.parse(code).body[0].value
  if isinstance(value, ast.Name):
    return False
  if isinstance(value, ast.IfExp):
    if ast.unparse(value.test.left) == ast.unparse(value.test.comparators[0]):
      return True
    if ast.unparse(value.body) == ast.unparse(value.orelse):
      return True
    value = value.body
  if isinstance(value, ast.BinOp):
    return ast.unparse(value.left) == ast.unparse(value.right)
  return False


def _informative(code: str, envs: Sequence[Env], new_envs: Sequence[Env], target: str) -> bool:
  """The new value varies across inputs and copies no existing value; a conditional's
  test decides the value on some inputs."""
  values = [env[target] for env in new_envs]
  if len(set(values)) < 2:
    return False
  if any(values == [env[name] for env in envs] for name in envs[0]):
    return False
  value = ast.parse(code).body[0].value
  if isinstance(value, ast.IfExp):
    then_line = f"{INDENT}{target} = {ast.unparse(value.body)}"
    else_line = f"{INDENT}{target} = {ast.unparse(value.orelse)}"
    test_line = f"{INDENT}{target} = 1 if {ast.unparse(value.test)} else 0"
    matters = set()
    for env in envs:
      a, b = run_line(then_line, env)[0][target], run_line(else_line, env)[0][target]
      if a != b:
        matters.add(run_line(test_line, env)[0][target])
    return matters == {0, 1}
  return True


def _generate_body(rng: np.random.Generator, horizon: int, inputs: Sequence[Env],
                   max_tries: int = 60) -> Optional[List[Tuple[str, str]]]:
  """One attempt at a well-posed body of `horizon` steps: [(spec, code)] or None."""
  defined: List[str] = list(ARGS)
  pending: set = set()
  used_args: set = set()
  envs = [dict(env) for env in inputs]
  steps: List[Tuple[str, str]] = []
  for k in range(horizon):
    final = k == horizon - 1
    target = None if final else LOCALS[k]
    for _ in range(max_tries):
      if final:
        spec, code = _propose_return(rng, defined, sorted(pending))
      else:
        must = sorted(pending) if len(pending) >= 2 else []
        spec, code = _propose_step(rng, target, defined, must)
      line = INDENT + code
      reads, _ = line_reads_writes(line)
      if final and not pending <= reads:
        continue
      new_pending = (pending - reads) | ({target} if target else set())
      if len(new_pending) > 2 or _degenerate(code):
        continue
      try:
        results = [run_line(line, env) for env in envs]
      except LineError:
        continue
      if final:
        values = [value for _, value, _ in results]
        if any(abs(v) > MAX_ABS_VALUE for v in values) or len(set(values)) < 2:
          continue
      else:
        new_envs = [env for env, _, _ in results]
        if any(abs(env[target]) > MAX_ABS_VALUE for env in new_envs):
          continue
        if not _informative(code, envs, new_envs, target):
          continue
      break
    else:
      return None
    steps.append((spec, code))
    used_args |= reads & set(ARGS)
    pending = new_pending
    if not final:
      defined.append(target)
      envs = new_envs
  if not used_args or (horizon >= 3 and used_args != set(ARGS)):
    return None
  if not _sensitive([INDENT + code for _, code in steps], inputs):
    return None
  return steps


def _spec_key(steps: Sequence[Tuple[str, str]]) -> str:
  return "\n".join(spec for spec, _ in steps)


def split_of(steps_text: str, held_out_fraction: float = HELD_OUT_FRACTION) -> str:
  """"train" or "test" from a hash of the spec text: splits never share a spec."""
  digest = hashlib.sha256(steps_text.encode("utf-8")).digest()
  u = int.from_bytes(digest[:8], "big") / 2.0**64
  return "test" if u < held_out_fraction else "train"


def format_prompt(specs: Sequence[str]) -> str:
  """The code prefix the policy sees: signature and the step-per-line docstring."""
  doc = "".join(f"{INDENT}{s}\n" for s in specs)
  return f"def {ENTRY_POINT}({', '.join(ARGS)}):\n{INDENT}\"\"\"\n{doc}{INDENT}\"\"\"\n"


def format_response(code_lines: Sequence[str]) -> str:
  """The body text: each code line indented and newline-terminated."""
  return "".join(f"{INDENT}{c}\n" for c in code_lines)


def _test_inputs(rng: np.random.Generator) -> List[List[int]]:
  lo, hi = INPUT_RANGE
  seen, out = set(), []
  while len(out) < NUM_TEST_INPUTS:
    pair = (int(rng.integers(lo, hi)), int(rng.integers(lo, hi)))
    if pair not in seen:
      seen.add(pair)
      out.append(list(pair))
  return out


def make_problem(rng: np.random.Generator, horizon: int, problem_id: str = "synthetic",
                 max_attempts: int = 500) -> Problem:
  """Generates one well-posed problem of `horizon` lines from `rng`.

  Args:
    rng: a numpy Generator (consumed).
    horizon: number of solution lines, 1..MAX_HORIZON (the last one is the return).
    problem_id: the Problem's id.
  Returns:
    a Problem with AssertTests (one `assert f(x, y) == out` per test input) and
    metadata {"horizon", "args", "inputs", "outputs", "steps", "split"}.
  """
  if not 1 <= horizon <= MAX_HORIZON:
    raise ValueError(f"horizon={horizon} must be in [1, {MAX_HORIZON}].")
  for _ in range(max_attempts):
    inputs = _test_inputs(rng)
    envs = [dict(zip(ARGS, pair)) for pair in inputs]
    steps = _generate_body(rng, horizon, envs)
    if steps is not None:
      break
  else:
    raise RuntimeError(f"could not generate a horizon-{horizon} problem in "
                       f"{max_attempts} attempts")
  specs = [s for s, _ in steps]
  code = [c for _, c in steps]
  lines = [INDENT + c for c in code]
  outputs = [run_reference(lines, env) for env in envs]
  prompt = format_prompt(specs)
  tests = tuple(f"assert {ENTRY_POINT}({', '.join(map(str, pair))}) == {out}"
                for pair, out in zip(inputs, outputs))
  return Problem(
      id=problem_id, prompt=prompt, tests=AssertTests(tests), entry_point=ENTRY_POINT,
      program_prefix=prompt, reference=format_response(code), source="synthetic",
      metadata={"horizon": horizon, "args": list(ARGS), "inputs": inputs,
                "outputs": outputs, "steps": specs, "split": split_of(_spec_key(steps))})


def make_split(seed: int, num_problems: int, horizons: Iterable[int] = range(4, 13),
               split: str = "train", unique: bool = True) -> List[Problem]:
  """A deterministic list of problems of one split.

  Problem i has horizon `horizons[i % len(horizons)]` and is drawn from
  `np.random.default_rng([seed, i, attempt])` until its spec hashes into `split`
  (see `split_of`) and, with `unique`, differs from the specs already drawn.

  Args:
    seed: int seed.
    num_problems: how many problems.
    horizons: the horizons to cycle through (each 1..MAX_HORIZON).
    split: "train" or "test" (held out); disjoint by construction.
    unique: no repeated spec inside the split (raises if a horizon's space runs out:
      horizon 1 has about a hundred specs in all, horizon 2 thousands).
  Returns:
    list of Problems with ids "synthetic/{split}/{seed}/{i}".
  """
  if split not in ("train", "test"):
    raise ValueError(f"split={split!r}; choose 'train' or 'test'.")
  horizons = list(horizons)
  if not horizons:
    raise ValueError("horizons is empty.")
  problems: List[Problem] = []
  seen: set = set()
  for i in range(num_problems):
    horizon = horizons[i % len(horizons)]
    for attempt in range(2000):
      rng = np.random.default_rng([seed, i, attempt, 7919])
      problem = make_problem(rng, horizon, problem_id=f"synthetic/{split}/{seed}/{i}")
      key = "\n".join(problem.metadata["steps"])
      if problem.metadata["split"] == split and not (unique and key in seen):
        break
    else:
      raise ValueError(f"could not draw {num_problems} distinct {split!r} problems at "
                       f"horizon {horizon}: its spec space is too small (use unique=False "
                       "or fewer problems).")
    seen.add(key)
    problems.append(problem)
  return problems


def make_suite(seed: int = 0, num_train: int = 512, num_test: int = 128,
               train_horizons: Iterable[int] = range(1, 13),
               test_horizons: Iterable[int] = range(1, 13)) -> Dict[str, List[Problem]]:
  """{"train": [...], "test": [...]}: the default synthetic suite (disjoint splits)."""
  return {"train": make_split(seed, num_train, train_horizons, "train"),
          "test": make_split(seed + 1, num_test, test_horizons, "test")}
