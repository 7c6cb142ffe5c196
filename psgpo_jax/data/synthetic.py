"""The built-in long-horizon task family, with an exact first-error oracle.

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

The oracle (`first_error_line`) runs the reference and a candidate line by line on the
test inputs with a small interpreter (no `exec`; assignments, one-line `if`, `return`,
integer arithmetic, comparisons, conditional expressions, max/min/abs; anything else is
an error line) and compares, after each line, the values the rest of the reference still
needs. A line that computes the right state by other means (`c = b + a` for `c = a + b`)
is right.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import operator
import os
import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from psgpo_jax.data.problems import Problem
from psgpo_jax.lines import is_trivial_line
from psgpo_jax.sandbox.spec import AssertTests

ARGS = ("x", "y")                      # the function's parameters
# Step k's local (f, l, o skipped: the function's name and two look-alikes of 1 and 0).
LOCALS = ("a", "b", "c", "d", "e", "g", "h", "i", "j", "k", "m", "n", "p", "q", "r")
ENTRY_POINT = "f"
INDENT = "    "
EOS_TOKEN = "<|endoftext|>"
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
# A tiny interpreter over the suite's grammar (the oracle's and the generator's engine).
# ---------------------------------------------------------------------------------------

_VALUE_LIMIT = 10**12       # candidate values beyond this are treated as an error
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_CMPOPS = {ast.Gt: operator.gt, ast.Lt: operator.lt, ast.GtE: operator.ge,
           ast.LtE: operator.le, ast.Eq: operator.eq, ast.NotEq: operator.ne}
_FUNCS = {"max": (max, 2, 4), "min": (min, 2, 4), "abs": (abs, 1, 1)}   # (fn, min, max args)


class LineError(Exception):
  """A line is outside the grammar or fails when run (the oracle's "wrong line")."""


Env = Dict[str, int]
# A compiled line: env -> (new env, returned value or None, whether it returned).
Compiled = Callable[[Env], Tuple[Env, Optional[int], bool]]


def _check_value(v: int) -> int:
  if abs(v) > _VALUE_LIMIT:
    raise LineError("value out of range")
  return v


def _compile_expr(node: ast.expr) -> Callable[[Env], int]:
  """Compiles an integer expression of the grammar into a closure env -> int."""
  if isinstance(node, ast.Constant):
    if type(node.value) is not int:
      raise LineError("only integer constants")
    value = _check_value(node.value)
    return lambda env: value
  if isinstance(node, ast.Name):
    name = node.id

    def load(env: Env) -> int:
      if name not in env:
        raise LineError(f"undefined name {name}")
      return env[name]
    return load
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
    inner = _compile_expr(node.operand)
    sign = -1 if isinstance(node.op, ast.USub) else 1
    return lambda env: sign * inner(env)
  if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
    fn, left, right = _BINOPS[type(node.op)], _compile_expr(node.left), _compile_expr(node.right)

    def binop(env: Env) -> int:
      try:
        return _check_value(fn(left(env), right(env)))
      except ZeroDivisionError as e:
        raise LineError("division by zero") from e
    return binop
  if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
      and node.func.id in _FUNCS and not node.keywords):
    fn, lo, hi = _FUNCS[node.func.id]
    if not lo <= len(node.args) <= hi or any(isinstance(a, ast.Starred) for a in node.args):
      raise LineError("bad call")
    args = [_compile_expr(a) for a in node.args]
    return lambda env: fn(*(a(env) for a in args))
  if isinstance(node, ast.IfExp):
    test, body, orelse = _compile_test(node.test), _compile_expr(node.body), _compile_expr(
        node.orelse)
    return lambda env: body(env) if test(env) else orelse(env)
  raise LineError(f"expression {type(node).__name__} is outside the grammar")


def _compile_test(node: ast.expr) -> Callable[[Env], bool]:
  """Compiles a (possibly chained) integer comparison into a closure env -> bool."""
  if not isinstance(node, ast.Compare) or any(type(op) not in _CMPOPS for op in node.ops):
    raise LineError("condition must be a comparison")
  ops = [_CMPOPS[type(op)] for op in node.ops]
  operands = [_compile_expr(node.left)] + [_compile_expr(c) for c in node.comparators]

  def test(env: Env) -> bool:
    values = [o(env) for o in operands]
    return all(op(a, b) for op, a, b in zip(ops, values, values[1:]))
  return test


def _compile_simple(stmt: ast.stmt) -> Callable[[Env], Env]:
  """Compiles an assignment (`t = e`, `s, t = e1, e2`, `t += e`) into env -> new env."""
  if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
    target = stmt.targets[0]
    if isinstance(target, ast.Name):
      name, value = target.id, _compile_expr(stmt.value)
      return lambda env: {**env, name: value(env)}
    if (isinstance(target, ast.Tuple) and isinstance(stmt.value, ast.Tuple)
        and len(target.elts) == len(stmt.value.elts)
        and all(isinstance(t, ast.Name) for t in target.elts)):
      names = [t.id for t in target.elts]
      values = [_compile_expr(v) for v in stmt.value.elts]

      def assign_many(env: Env) -> Env:
        new = [v(env) for v in values]      # all right-hand sides first, as Python does
        out = dict(env)
        out.update(zip(names, new))
        return out
      return assign_many
  if (isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name)
      and type(stmt.op) in _BINOPS):
    name = stmt.target.id
    value = _compile_expr(ast.BinOp(left=ast.Name(id=name, ctx=ast.Load()), op=stmt.op,
                                    right=stmt.value))
    return lambda env: {**env, name: value(env)}
  raise LineError(f"statement {type(stmt).__name__} is outside the grammar")


def parse_line(line: str) -> ast.stmt:
  """Parses one response line of the suite's grammar, or raises `LineError`.

  Args:
    line: one body line, without its newline: exactly 4 spaces, then one statement.
  Returns:
    the statement's AST node (assignment, one-line `if`, or `return`).
  """
  if not line.startswith(INDENT) or line[len(INDENT):len(INDENT) + 1].isspace():
    raise LineError("a body line is indented by exactly 4 spaces")
  try:
    module = ast.parse(line[len(INDENT):])
  except (SyntaxError, ValueError) as e:
    raise LineError(f"syntax error: {e}") from e
  if len(module.body) != 1:
    raise LineError("one statement per line")
  return module.body[0]


@functools.lru_cache(maxsize=65536)
def compile_line(line: str) -> Compiled:
  """Compiles one body line into a closure `env -> (env, returned_value, returned)`.

  Raises `LineError` for anything outside the grammar. Pure and cached by text.
  """
  stmt = parse_line(line)
  if isinstance(stmt, ast.Return):
    if stmt.value is None:
      return lambda env: (env, None, True)
    value = _compile_expr(stmt.value)
    return lambda env: (env, value(env), True)
  if isinstance(stmt, ast.If):
    if stmt.orelse or len(stmt.body) != 1:
      raise LineError("a one-line `if` has one assignment and no `else`")
    test, body = _compile_test(stmt.test), _compile_simple(stmt.body[0])
    return lambda env: (body(env) if test(env) else env, None, False)
  simple = _compile_simple(stmt)
  return lambda env: (simple(env), None, False)


def run_line(line: str, env: Env) -> Tuple[Env, Optional[int], bool]:
  """Runs one body line on `env`; raises `LineError` when it is wrong by construction."""
  return compile_line(line)(env)


@functools.lru_cache(maxsize=65536)
def line_reads_writes(line: str) -> Tuple[frozenset, frozenset]:
  """(names read, names surely written) by one grammatical line.

  A conditional assignment reads its target (the old value may survive) and surely
  writes nothing; `t += e` reads and writes t; a return reads its names.
  """
  stmt = parse_line(line)
  reads, writes = set(), set()
  called = {id(n.func) for n in ast.walk(stmt) if isinstance(n, ast.Call)}
  for node in ast.walk(stmt):
    if isinstance(node, ast.Name) and id(node) not in called:
      (writes if isinstance(node.ctx, ast.Store) else reads).add(node.id)
  if isinstance(stmt, ast.AugAssign):
    reads.add(stmt.target.id)
  if isinstance(stmt, ast.If):
    reads |= writes
    writes = set()
  return frozenset(reads), frozenset(writes)


def liveness(lines: Sequence[str]) -> List[frozenset]:
  """Names still needed after each line: `live[k]` = read later before being rewritten."""
  live: List[frozenset] = [frozenset()] * len(lines)
  needed: frozenset = frozenset()
  for k in range(len(lines) - 1, -1, -1):
    live[k] = needed
    reads, writes = line_reads_writes(lines[k])
    needed = (needed - writes) | reads
  return live


# ---------------------------------------------------------------------------------------
# Responses and the oracle.
# ---------------------------------------------------------------------------------------


def response_lines(response: str) -> List[str]:
  """Splits a response into lines at `\\n`, dropping trailing blank lines.

  Returns:
    the lines without newlines; `"    a = x\\n    return a\\n"` -> 2 lines.
  """
  lines = response.split("\n")
  while lines and not lines[-1].strip():
    lines.pop()
  return lines


def _inputs(problem: Problem) -> List[Env]:
  args = problem.metadata["args"]
  return [dict(zip(args, values)) for values in problem.metadata["inputs"]]


def _states_match(ref, cand, live: frozenset) -> bool:
  """Compares (env, returned_value, returned) states on the live names."""
  ref_env, ref_value, ref_returned = ref
  cand_env, cand_value, cand_returned = cand
  if ref_returned or cand_returned:
    return ref_returned and cand_returned and ref_value == cand_value
  return all(name in cand_env and cand_env[name] == ref_env[name] for name in live)


def line_correctness(problem: Problem, response: str) -> List[bool]:
  """Per response line: whether the program state is still right after it.

  Lines are compared in order with the reference's lines, on every test input: after line
  k the candidate must hold the same values as the reference for every name the rest of
  the reference reads (or return the same value where the reference returns). The first
  wrong line and every later line are False (a wrong state is not repaired by alignment).
  Lines outside the grammar, lines that fail to run, extra lines and early returns are
  wrong. A response that stops early has only right lines here but is still incomplete:
  use `first_error_line`, which reports that case.

  Args:
    problem: a synthetic problem (needs `reference` and metadata `args`, `inputs`).
    response: the candidate body text.
  Returns:
    one bool per line of `response_lines(response)`.
  """
  error = first_error_line(problem, response)
  n = len(response_lines(response))
  if error is None:
    return [True] * n
  return [k < error for k in range(n)]


def first_error_line(problem: Problem, response: str) -> Optional[int]:
  """0-based index of the first wrong response line, or None if every line is right.

  Exact on the problem's test inputs (see `line_correctness` for what "right" means).
  When the response is a correct prefix that stops before the reference's last line,
  the result is `len(response_lines(response))`: the first MISSING line. Blank and
  comment-only lines are neutral (never the error; skipped when aligning with the
  reference), as they are for PRM labels and dense rewards.
  None implies the response passes the tests; the converse fails only for responses that
  repair a wrong state later or pad with extra harmless lines.

  Args:
    problem: a synthetic problem.
    response: the candidate body, lines of the form `"    <stmt>\\n"`.
  Returns:
    int in [0, len(lines)] or None.
  """
  if not problem.reference:
    raise ValueError(f"{problem.id}: the oracle needs the problem's reference.")
  ref_lines = response_lines(problem.reference)
  cand_lines = response_lines(response)
  live = liveness(ref_lines)
  ref_states = [(env, None, False) for env in _inputs(problem)]
  cand_states = list(ref_states)
  step = 0                                  # reference line the next code line must match
  for k, line in enumerate(cand_lines):
    if is_trivial_line(line):               # blank / comment-only: neutral, as in labels
      continue
    if step >= len(ref_lines):
      return k
    try:
      compiled = compile_line(line)
      new_cand = [compiled(env) for env, _, _ in cand_states]
    except (LineError, RecursionError, MemoryError, OverflowError, TypeError):
      return k
    ref_states = [run_line(ref_lines[step], env) for env, _, _ in ref_states]
    if not all(_states_match(r, c, live[step]) for r, c in zip(ref_states, new_cand)):
      return k
    cand_states = new_cand
    step += 1
  if step < len(ref_lines):
    return len(cand_lines)
  return None


def oracle_line_labels(problem: Problem, lines: Sequence[str]) -> List[int]:
  """The oracle's PRM labels of a response's lines: what the binary search estimates.

  A code line is +1 when the prefix ending with it is still right (it can be completed
  to a passing program: every code line up to it is right), -1 from the first wrong line
  on; blank and comment-only lines are 0 (neutral), as in collected labels.

  Args:
    problem: a synthetic problem.
    lines: the response's lines, without newlines (e.g. `tokenization.LineSpans.lines`).
  Returns:
    one int in {-1, 0, +1} per line.
  """
  error = first_error_line(problem, "\n".join(lines))
  return [0 if is_trivial_line(line) else (1 if error is None or k < error else -1)
          for k, line in enumerate(lines)]


def is_correct(problem: Problem, response: str) -> bool:
  """Whether every response line is right (the oracle's verdict on the whole response)."""
  return first_error_line(problem, response) is None


def run_reference(lines: Sequence[str], env: Env) -> int:
  """Runs a body (lines without newlines) on one input and returns its value."""
  for line in lines:
    env, value, returned = run_line(line, env)
    if returned:
      return value
  raise LineError("no return")


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


# ---------------------------------------------------------------------------------------
# Wrong lines, noisy warm-up data.
# ---------------------------------------------------------------------------------------


def _mutations(code: str, names: Sequence[str], rng: np.random.Generator) -> List[str]:
  """Plausible wrong versions of one of the suite's code lines (unindented), shuffled.

  One space-separated token changes: a digit, a name (to another of `names`), or an operator to a
  related one (+ -, * +, // %, > <).
  """
  out: List[str] = []
  digits = [str(d) for d in range(1, 10)]
  op_swaps = {"+": ["-", "*"], "-": ["+"], "*": ["+"], "//": ["%"], "%": ["//"],
              ">": ["<"], "<": [">"]}
  tokens = code.split()
  for i, tok in enumerate(tokens):
    alts: List[str] = []
    if tok.isdigit():
      alts = [d for d in digits if d != tok]
    elif tok in names:
      alts = [n for n in names if n != tok]
    elif tok in op_swaps:
      alts = op_swaps[tok]
    for alt in alts:
      out.append(" ".join(tokens[:i] + [alt] + tokens[i + 1:]))
  order = rng.permutation(len(out))
  return [out[i] for i in order]


def corrupt_line(problem: Problem, response: str, index: int, rng: np.random.Generator
                 ) -> Optional[str]:
  """Replaces line `index` of `response` by a plausible wrong line.

  The wrong line is chosen so that the oracle's first error of the result is exactly
  `index` (given that the earlier lines are right). Later lines are kept as they are.

  Returns:
    the corrupted response, or None when no mutation of that line is wrong on the tests.
  """
  lines = response_lines(response)
  code = lines[index][len(INDENT):]
  names = list(ARGS) + list(LOCALS[:index + 1])
  for wrong in _mutations(code, names, rng):
    candidate = lines[:index] + [INDENT + wrong] + lines[index + 1:]
    text = "".join(l + "\n" for l in candidate)
    if first_error_line(problem, text) == index:
      return text
  return None


def corrupt_response(problem: Problem, rng: np.random.Generator,
                     index: Optional[int] = None) -> Tuple[str, int]:
  """A wrong response with a known first error line.

  Args:
    problem: a synthetic problem.
    rng: numpy Generator.
    index: the line to corrupt; a random line when None.
  Returns:
    (response, first_error_index): the reference with line `index` replaced by a
    plausible wrong line (later lines unchanged), and `index`.
  """
  reference = problem.reference or ""
  num_lines = len(response_lines(reference))
  order = [index] if index is not None else rng.permutation(num_lines).tolist()
  for k in order:
    text = corrupt_line(problem, reference, int(k), rng)
    if text is not None:
      return text, int(k)
  raise ValueError(f"no line of {problem.id} could be corrupted at {order}")


def sft_corpus(problems: Sequence[Problem], noise: float = 0.0, seed: int = 0
               ) -> List[Tuple[str, str]]:
  """(prompt, response) pairs for the supervised warm-up.

  Args:
    problems: synthetic problems (their references are the targets).
    noise: probability that each line is replaced by a plausible wrong line (later lines
      stay the reference's), so a policy fitted on it is weak but not hopeless.
    seed: int seed of the noise.
  Returns:
    list of (prompt, response) string pairs, one per problem, in order.
  """
  if not 0.0 <= noise <= 1.0:
    raise ValueError(f"noise={noise} must be in [0, 1].")
  rng = np.random.default_rng([seed, 104729])
  pairs = []
  for problem in problems:
    reference = problem.reference or ""
    lines = response_lines(reference)
    for k in range(len(lines)):
      if noise > 0 and rng.random() < noise:
        wrong = corrupt_line(problem, reference, k, rng)
        if wrong is not None:
          lines[k] = response_lines(wrong)[k]
    pairs.append((problem.prompt, "".join(l + "\n" for l in lines)))
  return pairs


# ---------------------------------------------------------------------------------------
# The suite's tokenizer.
# ---------------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_corpus(seed: int = 0, num_problems: int = 200) -> List[str]:
  """Texts the tokenizer is trained on: prompts, references and plausible wrong lines."""
  problems = make_split(seed, num_problems, range(1, 13), "train", unique=False)
  texts = []
  for p, (_, noisy) in zip(problems, sft_corpus(problems, noise=0.3, seed=seed)):
    texts.append(p.prompt + (p.reference or ""))
    texts.append(noisy)
  return texts


def build_tokenizer(out_dir: str, seed: int = 0, vocab_size: int = 512,
                    num_problems: int = 200, overwrite: bool = False) -> str:
  """Trains (or reuses) the suite's byte-level BPE tokenizer and saves it to `out_dir`.

  Pre-tokenization splits at newlines first (a newline is always its own token, so line
  ends and prompt/response boundaries tokenize the same in any context), then as GPT-2
  does. The full byte alphabet is kept, so any text encodes. `<|endoftext|>` is the only
  special token: EOS and pad. Reused when `out_dir` already holds a tokenizer trained with
  the same settings.

  Args:
    out_dir: directory to write tokenizer.json, tokenizer_config.json,
      special_tokens_map.json (loadable by `transformers.AutoTokenizer.from_pretrained`).
    seed: seed of the problems it is trained on.
    vocab_size: upper bound on the vocabulary (the suite's text saturates well below 1024).
  Returns:
    out_dir.
  """
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

  settings = {"seed": seed, "vocab_size": vocab_size, "num_problems": num_problems,
              "format": 1}
  config_path = os.path.join(out_dir, "tokenizer_config.json")
  if not overwrite and all(os.path.exists(os.path.join(out_dir, f)) for f in TOKENIZER_FILES):
    with open(config_path) as f:
      if json.load(f).get("psgpo_synthetic") == settings:
        return out_dir
  tokenizer = Tokenizer(models.BPE(unk_token=None))
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
  ])
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tokenizer.train_from_iterator(tokenizer_corpus(seed, num_problems), trainer=trainer)
  os.makedirs(out_dir, exist_ok=True)
  tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "bos_token": None, "unk_token": None,
      "model_max_length": 1024, "clean_up_tokenization_spaces": False,
      "add_bos_token": False, "add_eos_token": False, "psgpo_synthetic": settings,
  }
  with open(config_path, "w") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
    json.dump({"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN}, f, indent=2)
  return out_dir
