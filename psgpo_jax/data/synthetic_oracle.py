"""The synthetic suite's line interpreter and its exact first-error oracle.

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
import operator
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from psgpo_jax.data.record import Problem
from psgpo_jax.lines import is_trivial_line

INDENT = "    "

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


# What running a candidate line can raise besides a grammar error: each makes it wrong.
_RUN_ERRORS = (LineError, RecursionError, MemoryError, OverflowError, TypeError)


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
  the reference reads (or return the same value where the reference returns), or the rest
  of the reference, run from its state, must still return the expected outputs. The first
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
  A line whose state differs from the reference's is still right when the reference's
  remaining lines, run from that state, return the expected output on every test input
  (the rest of the program masks the difference, e.g. a factor that is 0 on these
  inputs): then the prefix can be completed to a passing program, which is what a
  binary-search label means. None implies the response passes the tests; the converse
  fails only for responses that repair a wrong state with lines the reference does not
  have, or pad with extra harmless lines.

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
  outputs = problem.metadata["outputs"]
  ref_states = [(env, None, False) for env in _inputs(problem)]
  cand_states = list(ref_states)
  step = 0                                  # reference line the next code line must match
  for k, line in enumerate(cand_lines):
    if is_trivial_line(line):               # blank / comment-only: neutral, as in labels
      continue
    if step >= len(ref_lines) or all(returned for _, _, returned in cand_states):
      return k                              # an extra line, or dead code after a return
    try:
      compiled = compile_line(line)
      new_cand = [state if state[2] else compiled(state[0]) for state in cand_states]
    except _RUN_ERRORS:
      return k
    ref_states = [run_line(ref_lines[step], env) for env, _, _ in ref_states]
    if not (all(_states_match(r, c, live[step]) for r, c in zip(ref_states, new_cand))
            or _reference_completes(ref_lines[step + 1:], new_cand, outputs)):
      return k
    cand_states = new_cand
    step += 1
  if step < len(ref_lines) and not all(returned for _, _, returned in cand_states):
    return len(cand_lines)
  return None


def _reference_completes(rest: Sequence[str], states, outputs: Sequence[int]) -> bool:
  """Whether the reference's lines `rest`, run from each candidate (env, value, returned)
  state, return the expected output on every test input."""
  for (env, value, returned), expected in zip(states, outputs):
    try:
      for line in rest:
        if returned:
          break
        env, value, returned = run_line(line, env)
    except _RUN_ERRORS:
      return False
    if not returned or value != expected:
      return False
  return True


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
