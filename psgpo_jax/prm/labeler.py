"""Labels one batch of responses through any probe; the labels' agreement with an oracle.

Batched: the searches of a whole batch of responses advance together (`label_batch`).
Each round gathers every unfinished response's midpoint prefix and hands all of them to
one `probe_fn` call (one sampler call with K samples per prefix, one sandbox call over all
completions); rounds = ceil(log2(max n)).

The probe is K sampled completions (`collect.PolicyProbe`; `collect.labeler = "search"`)
or the first-error oracle (`oracle_probe`; `collect.labeler = "oracle"`). `LabelingConfig`
holds the knobs of label collection. Label noise: `_agreement` compares searched rows with
an oracle's first wrong line (`oracle_labels`), `label_agreement_by_k` does so per K on
the same sampled completions (`CachedProbe`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from psgpo_jax.lines import is_trivial_line, split_lines
from psgpo_jax.prm.search import (PrefixJob, ProbeFn, Row, SearchState, label_lines,
                                  new_search, next_probe, prefix_text, step_line_indices,
                                  update)
from psgpo_jax.prm.select import SELECTIONS

LABELERS = ("search", "oracle")
OracleFn = Callable[[Any, str], Optional[int]]


# ----------------------------------------------------------------------------- batches


@dataclasses.dataclass(frozen=True)
class LabelingConfig:
  """Knobs of label collection (the `collect` config section, plus sampling limits).

  Attributes:
    completions: K, completions sampled per probed prefix.
    temperature: sampling temperature of responses and completions.
    responses_per_prompt: responses sampled (and labeled) per prompt.
    batch_responses: responses whose searches advance together (one shard).
    skip_trivial_lines: blank/comment-only lines are not search steps (label 0).
    selection: which rows train the PRM: revised | failed | all.
    drop_uniform_prompts: drop prompts where all or none of the responses pass (their
      failing responses are then not searched at all).
    balance: subsample lines so that positive and negative lines balance.
    max_new_tokens: longest response or completion, in tokens.
    top_p, top_k: sampling filters.
    labeler: "search" (K sampled completions per probed prefix) or "oracle" (the same
      binary search, each probe answered exactly by the problems' first-error oracle: the
      labels a perfect prover would give, at no sampling cost).
  """
  completions: int = 20
  temperature: float = 1.0
  responses_per_prompt: int = 4
  batch_responses: int = 64
  skip_trivial_lines: bool = True
  selection: str = "revised"
  drop_uniform_prompts: bool = False
  balance: bool = False
  max_new_tokens: int = 128
  top_p: float = 1.0
  top_k: int = 0
  labeler: str = "search"

  def __post_init__(self):
    if self.labeler not in LABELERS:
      raise ValueError(f"collect.labeler={self.labeler!r}; choose one of {LABELERS}.")
    if self.selection not in SELECTIONS:
      raise ValueError(f"collect.selection={self.selection!r}; choose one of {SELECTIONS}.")
    if self.completions < 1 or self.responses_per_prompt < 1 or self.batch_responses < 1:
      raise ValueError("collect.completions, responses_per_prompt and batch_responses must "
                       "be >= 1.")

  @property
  def prompts_per_batch(self) -> int:
    """Whole prompts per batch (so per-prompt selection stays within one shard)."""
    return max(1, self.batch_responses // self.responses_per_prompt)

  @classmethod
  def from_config(cls, config: Any) -> "LabelingConfig":
    """From a pipeline config (its `collect` and `sampling` sections)."""
    c, s = config.collect, config.sampling
    return cls(completions=int(c.completions), temperature=float(c.temperature),
               responses_per_prompt=int(c.responses_per_prompt),
               batch_responses=int(c.batch_responses),
               skip_trivial_lines=bool(c.skip_trivial_lines), selection=str(c.selection),
               drop_uniform_prompts=bool(c.drop_uniform_prompts), balance=bool(c.balance),
               max_new_tokens=int(s.max_new_tokens), top_p=float(s.top_p),
               top_k=int(s.top_k), labeler=str(c.get("labeler", "search")))


def oracle_probe(oracle_fn: "OracleFn") -> ProbeFn:
  """A probe answered by the first-error oracle instead of K sampled completions.

  A prefix is recoverable (1) iff the oracle finds no wrong line in it: a correct prefix
  that stops early can still be completed. Exact, so the binary search over it finds the
  oracle's first wrong step (`collect.labeler = "oracle"`).
  """
  def probe(jobs: List[PrefixJob]) -> List[int]:
    out = []
    for job in jobs:
      first = oracle_fn(job.problem, job.prefix)
      out.append(int(first is None or first >= len(split_lines(job.prefix))))
    return out
  return probe


def label_batch(problems: Sequence[Any], responses: Sequence[str], passed: Sequence[bool],
                probe_fn: ProbeFn, config: LabelingConfig,
                search: Optional[Sequence[bool]] = None) -> List[Row]:
  """Labels the lines of a batch of responses; all searches advance together.

  Args:
    problems: N problems (one per response).
    responses: N response texts.
    passed: N outcomes of the full responses (True = all tests pass).
    probe_fn: the batched "sample K completions from each prefix and test them" step;
      called once per round with every unfinished response's midpoint prefix.
    config: `completions` (K, for the cost count) and `skip_trivial_lines`.
    search: N flags; a failing response with False is not searched (labels None).
  Returns:
    N rows: lines, trivial flags, line_labels (None if not searched), first_bad (0-based
    line index of the first bad line, None for passing responses), first_bad_step,
    passed, searched, completions_spent (K x probes), rounds (its probes) and trace
    (its probes as {"round", "m", "passes"}).
  """
  n_resp = len(responses)
  if not len(problems) == len(passed) == n_resp:
    raise ValueError(f"{len(problems)} problems, {n_resp} responses and {len(passed)} "
                     f"outcomes: must be equal.")
  search = [True] * n_resp if search is None else list(search)
  lines = [split_lines(r) for r in responses]
  trivial = [[is_trivial_line(l) for l in ls] for ls in lines]
  steps = [step_line_indices(t, config.skip_trivial_lines) for t in trivial]
  states: Dict[int, SearchState] = {
      i: new_search(len(steps[i])) for i in range(n_resp) if not passed[i] and search[i]}
  rounds: Dict[int, List[int]] = {i: [] for i in states}
  round_index = 0
  while True:
    probes = [(i, next_probe(s)) for i, s in states.items()]
    probes = [(i, m) for i, m in probes if m is not None]
    if not probes:
      break
    jobs = [PrefixJob(i, problems[i], prefix_text(lines[i], steps[i], m), m)
            for i, m in probes]
    results = list(probe_fn(jobs))
    if len(results) != len(jobs):
      raise ValueError(f"probe_fn returned {len(results)} results for {len(jobs)} prefixes.")
    for (i, m), passes in zip(probes, results):
      states[i] = update(states[i], m, int(passes))
      rounds[i].append(round_index)
    round_index += 1

  rows = []
  for i in range(n_resp):
    row: Row = {"response": responses[i], "lines": lines[i], "trivial": trivial[i],
                "passed": bool(passed[i]), "searched": False, "first_bad": None,
                "first_bad_step": None, "line_labels": None, "completions_spent": 0,
                "rounds": 0, "trace": []}
    if passed[i]:
      row["line_labels"] = label_lines(trivial[i], None, config.skip_trivial_lines)
    elif i in states:
      state = states[i]
      first = state.first_bad
      row.update(searched=True, first_bad_step=first,
                 first_bad=steps[i][first] if steps[i] else None,
                 line_labels=label_lines(trivial[i], first, config.skip_trivial_lines),
                 completions_spent=config.completions * len(state.trace),
                 rounds=len(state.trace),
                 trace=[{"round": r, "m": m, "passes": p}
                        for r, (m, p) in zip(rounds[i], state.trace)])
    rows.append(row)
  return rows


# ----------------------------------------------------------------------------- agreement


def _agreement(rows: Sequence[Row], skip_trivial_lines: bool = True) -> Dict[str, float]:
  """Binary-search labels against the oracle's first error line (searched rows).

  Besides first-wrong-line and per-line agreement, it counts the probes whose outcome
  contradicts the oracle, i.e. the label noise: a search never probes a prefix on the far
  side of an outcome it has seen, so non-monotone outcomes cannot show inside one search;
  against the oracle they can. `probe_false_fail_share`: of the probes whose prefix the
  oracle calls right, the share where all K completions failed (too few samples);
  `probe_false_pass_share`: of the probes whose prefix it calls wrong, the share where a
  completion passed (a later line repaired the state).
  """
  searched = [r for r in rows if r["searched"] and "oracle_first_bad" in r]
  if not searched:
    return {}
  exact = np.mean([r["first_bad"] == r["oracle_first_bad"] for r in searched])
  line_hits, line_total = 0, 0
  false = {True: 0, False: 0}            # oracle says right / wrong -> contradicting probes
  total = {True: 0, False: 0}
  for r in searched:
    oracle = oracle_labels(r["trivial"], r["lines"], r["oracle_first_bad"])
    for y, o in zip(r["line_labels"], oracle):
      if y != 0:
        line_total += 1
        line_hits += int(y == o)
    step_lines = [j for j, t in enumerate(r["trivial"]) if not (skip_trivial_lines and t)]
    first = r["oracle_first_bad"]
    right_steps = len(step_lines) if first is None else sum(j < first for j in step_lines)
    for probe in r["trace"]:
      right = probe["m"] <= right_steps
      total[right] += 1
      false[right] += int((probe["passes"] > 0) != right)
  return {"oracle_first_bad_agreement": float(exact),
          "oracle_line_agreement": line_hits / max(line_total, 1),
          "oracle_rows": len(searched),
          "probe_outcomes": total[True] + total[False],
          "probe_false_fail_share": false[True] / max(total[True], 1),
          "probe_false_pass_share": false[False] / max(total[False], 1)}


def oracle_labels(trivial: Sequence[bool], lines: Sequence[str],
                  oracle_first_bad: Optional[int]) -> List[int]:
  """Line labels implied by an oracle's first wrong line (0-based; None = no error)."""
  del lines
  return [0 if t else (1 if oracle_first_bad is None or i < oracle_first_bad else -1)
          for i, t in enumerate(trivial)]


class CachedProbe:
  """A probe that samples `max_k` completions per prefix once and answers any K <= max_k.

  For comparing K values on the same responses: `for_k(k)` is a `ProbeFn` that counts
  the passes among the first k of the prefix's completions. `outcomes_fn(jobs)` must
  return, per job, a sequence of `max_k` booleans (completion passed).
  """

  def __init__(self, outcomes_fn: Callable[[List[PrefixJob]], Sequence[Sequence[bool]]],
               max_k: int):
    self.outcomes_fn = outcomes_fn
    self.max_k = max_k
    self.cache: Dict[Tuple[int, str], List[bool]] = {}

  def for_k(self, k: int) -> ProbeFn:
    if not 1 <= k <= self.max_k:
      raise ValueError(f"k={k} must be within [1, {self.max_k}].")

    def probe(jobs: List[PrefixJob]) -> List[int]:
      missing = [j for j in jobs if (j.index, j.prefix) not in self.cache]
      if missing:
        for job, outcomes in zip(missing, self.outcomes_fn(missing)):
          self.cache[(job.index, job.prefix)] = [bool(o) for o in outcomes]
      return [sum(self.cache[(j.index, j.prefix)][:k]) for j in jobs]

    return probe


def label_agreement_by_k(problems: Sequence[Any], responses: Sequence[str],
                         outcomes_fn: Callable[[List[PrefixJob]], Sequence[Sequence[bool]]],
                         oracle_fn: OracleFn, ks: Sequence[int],
                         skip_trivial_lines: bool = True) -> List[Dict[str, float]]:
  """Agreement of binary-search labels with an oracle's first wrong line, per K.

  All responses are failing ones. Completions are sampled once, `max(ks)` per probed
  prefix (`CachedProbe`), and K = k uses the first k of them, so the K values differ
  only in K.

  Returns:
    Per k: {"k", "first_bad_agreement" (exact first bad line), "line_agreement"
    (step lines whose label matches the oracle's), "completions_per_response",
    "mean_first_bad_minus_oracle" (signed, lines; > 0 = the search blames later),
    "probe_false_fail_share", "probe_false_pass_share" (probe outcomes that contradict
    the oracle, `_agreement`)}.
  """
  cached = CachedProbe(outcomes_fn, max(ks))
  oracle = [oracle_fn(p, r) for p, r in zip(problems, responses)]
  out = []
  for k in sorted(ks):
    config = LabelingConfig(completions=k, skip_trivial_lines=skip_trivial_lines)
    rows = label_batch(problems, responses, [False] * len(responses), cached.for_k(k),
                       config)
    for row, o in zip(rows, oracle):
      row["oracle_first_bad"] = o
    agreement = _agreement(rows, skip_trivial_lines)
    offsets = [r["first_bad"] - r["oracle_first_bad"] for r in rows
               if r["first_bad"] is not None and r["oracle_first_bad"] is not None]
    out.append({"k": k, "first_bad_agreement": agreement.get("oracle_first_bad_agreement", 0.0),
                "line_agreement": agreement.get("oracle_line_agreement", 0.0),
                "completions_per_response": float(np.mean([r["completions_spent"]
                                                           for r in rows])) if rows else 0.0,
                "mean_first_bad_minus_oracle": float(np.mean(offsets)) if offsets else 0.0,
                "probe_false_fail_share": agreement.get("probe_false_fail_share", 0.0),
                "probe_false_pass_share": agreement.get("probe_false_pass_share", 0.0)})
  return out
