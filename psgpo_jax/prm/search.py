"""Binary search over the line prefixes of one response (PSGPO, Dai et al. 2024): pure.

A response is split into lines L1..Ln. The prefix up to line m is *correct* (recoverable)
if at least one of K completions sampled from it passes all unit tests. A response that
passes is all-correct without search. For a failing response we search the first *step*
whose prefix is not correct, assuming monotonicity (once a prefix fails, longer ones
fail too). Steps are the lines that count: blank and comment-only lines are skipped
(label 0) when `skip_trivial_lines`.

Search over step prefixes, with invariant "prefix `lo` is correct, prefix `hi` is not":
prefix 0 (the prompt alone) is assumed correct and prefix n (the full, failing response)
is known to fail, so the search starts at (lo, hi) = (0, n), probes m = (lo + hi) // 2 and
stops when hi = lo + 1. Then step `lo` (0-based) is the first bad step: steps before it
are labelled +1, steps from it on -1. A failing response whose every proper prefix is
recoverable gets its last step as the first bad one (only it is labelled -1): completing
it was possible until the last line, which made it fail. Monotonicity is assumed, not
checked: the search's probes are nested (after a failing prefix it only probes shorter
ones, after a recoverable one only longer ones), so one search never sees a violation;
where an oracle exists, the collect stats count the probe outcomes that contradict it
(`probe_false_fail_share`: all K completions of a right prefix failed;
`probe_false_pass_share`: a wrong prefix was completed to a pass), the label noise a
violation would cause, and `labeler.label_agreement_by_k` reports them per K. A response costs at most K * ceil(log2(n)) <=
K * ceil(log2(n + 1)) completions, against K * (n - 1) for a linear scan (Math-Shepherd).

Here: one search as a value advanced one probe at a time (`SearchState`, `new_search`,
`next_probe`, `update`), so that a batch's searches can advance together
(`labeler.label_batch`); the sequential `search_first_bad` and the `linear_first_bad`
scan it is compared with; `label_lines` (line labels from the first bad step); the step
and prefix helpers; the probe interface (`PrefixJob`, `ProbeFn`) and the labeled row
(`Row`). No JAX, no I/O.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# A labeled row: one response, its lines and their labels, and its metadata (JSON).
Row = Dict[str, Any]


# ----------------------------------------------------------------------------- lines


def step_line_indices(trivial: Sequence[bool], skip_trivial_lines: bool) -> List[int]:
  """Indices of the lines that are search steps (all lines, or the non-trivial ones)."""
  return [i for i, t in enumerate(trivial) if not (skip_trivial_lines and t)]


def prefix_text(lines: Sequence[str], steps: Sequence[int], m: int) -> str:
  """The response text up to the end of its m-th step line ('' for m = 0)."""
  if m <= 0:
    return ""
  return "".join(lines[:steps[m - 1] + 1])


# ----------------------------------------------------------------------------- search


@dataclasses.dataclass(frozen=True)
class SearchState:
  """The binary search over the step prefixes of one failing response.

  Attributes:
    n: number of steps.
    lo: longest step prefix known correct (0 = the prompt alone, assumed correct).
    hi: shortest step prefix known incorrect (n = the full response, known to fail).
    trace: the probes so far, as (m, passes) with passes = passing completions of K.
  """
  n: int
  lo: int
  hi: int
  trace: Tuple[Tuple[int, int], ...] = ()

  @property
  def done(self) -> bool:
    return self.hi - self.lo <= 1

  @property
  def first_bad(self) -> int:
    """0-based index of the first bad step (valid once `done`; 0 when n = 0)."""
    return self.lo


def new_search(n: int) -> SearchState:
  """A search over n >= 0 steps: prefix 0 correct, prefix n failing."""
  if n < 0:
    raise ValueError(f"n={n} steps: must be >= 0.")
  return SearchState(n=n, lo=0, hi=n)


def next_probe(state: SearchState) -> Optional[int]:
  """The step prefix length to probe next, or None when the search is over."""
  if state.done:
    return None
  return (state.lo + state.hi) // 2


def update(state: SearchState, m: int, passes: int) -> SearchState:
  """The search after probing prefix m: correct iff `passes` > 0 completions passed."""
  if not state.lo < m < state.hi:
    raise ValueError(f"Probe m={m} is outside the open interval ({state.lo}, {state.hi}).")
  trace = state.trace + ((int(m), int(passes)),)
  if passes > 0:
    return dataclasses.replace(state, lo=m, trace=trace)
  return dataclasses.replace(state, hi=m, trace=trace)


def max_probes(n: int) -> int:
  """Worst-case probes of one search over n steps: ceil(log2(n)) (0 for n <= 1)."""
  return math.ceil(math.log2(n)) if n > 1 else 0


def search_first_bad(n: int, correct: Callable[[int], bool]) -> Tuple[int, int]:
  """Sequential binary search with a correctness function of the prefix length.

  Args:
    n: number of steps.
    correct: m -> bool for 0 < m < n (prefix 0 is assumed correct, prefix n fails).
  Returns:
    (first bad step, 0-based; number of probes).
  """
  state = new_search(n)
  while (m := next_probe(state)) is not None:
    state = update(state, m, int(bool(correct(m))))
  return state.first_bad, len(state.trace)


def linear_first_bad(n: int, correct: Callable[[int], bool]) -> Tuple[int, int]:
  """Linear scan (Math-Shepherd style): the first m whose prefix fails, minus one.

  Returns (first bad step, 0-based; number of probes), probing m = 1, 2, ... < n.
  """
  for m in range(1, n):
    if not correct(m):
      return m - 1, m
  return max(n - 1, 0), max(n - 1, 0)


def label_lines(trivial: Sequence[bool], first_bad_step: Optional[int],
                skip_trivial_lines: bool = True) -> List[int]:
  """Line labels from the first bad step.

  Args:
    trivial: per line, True for blank/comment-only lines.
    first_bad_step: 0-based index (among steps) of the first bad step; None = all
      correct (a passing response).
    skip_trivial_lines: trivial lines are not steps and get label 0.
  Returns:
    One label per line: +1 for steps before the first bad step, -1 from it on, 0 for
    trivial lines when skipped.
  """
  labels, step = [], 0
  for t in trivial:
    if skip_trivial_lines and t:
      labels.append(0)
      continue
    labels.append(1 if first_bad_step is None or step < first_bad_step else -1)
    step += 1
  return labels


# ----------------------------------------------------------------------------- probes


@dataclasses.dataclass(frozen=True)
class PrefixJob:
  """One prefix to probe: K completions are sampled after `prompt + prefix` and tested.

  Attributes:
    index: the response's position in its batch.
    problem: the problem (its `.prompt`, `.tests`, `.program(completion)`).
    prefix: the response text up to the end of the m-th step line.
    m: the number of steps in the prefix.
  """
  index: int
  problem: Any
  prefix: str
  m: int


# probe_fn(jobs) -> per job, the number of passing completions out of K (a bool counts
# as 0/1). The prefix is correct iff that number is > 0.
ProbeFn = Callable[[List[PrefixJob]], Sequence[int]]
