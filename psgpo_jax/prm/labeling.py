"""PRM line labels by batched binary search over line prefixes (PSGPO, Dai et al. 2024).

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
`label_agreement_by_k` and the oracle agreement in the collect stats measure the
label noise that a violation would cause. A response costs at most K * ceil(log2(n)) <=
K * ceil(log2(n + 1)) completions, against K * (n - 1) for a linear scan (Math-Shepherd).

Batched: the searches of a whole batch of responses advance together. Each round gathers
every unfinished response's midpoint prefix and hands all of them to one `probe_fn`
call (one sampler call with K samples per prefix, one sandbox call over all
completions); rounds = ceil(log2(max n)).

Layers:
  * pure search: `SearchState`, `new_search`, `next_probe`, `update`, `label_lines`;
  * `label_batch(problems, responses, passed, probe_fn, config)`: one batch, any probe;
  * selection and balancing of the labeled rows (`select_rows`, `balance_lines`);
  * `run_collection(...)`: batches -> resumable JSONL shards + `collect_stats.json`;
  * `collect_labels(...)`: the production wiring (sampler + sandbox + tokenizer).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import time
from typing import (Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence,
                    Tuple)

import numpy as np

from psgpo_jax.jsonio import write_json, write_text
from psgpo_jax.lines import is_trivial_line, split_lines  # re-exported: callers use these names

Row = Dict[str, Any]
SELECTIONS = ("revised", "failed", "all")
LABELERS = ("search", "oracle")
SHARD_PATTERN = "labels-{:05d}.jsonl"
STATS_FILE = "collect_stats.json"


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


# ----------------------------------------------------------------------------- selection


def uniform_prompts(rows: Sequence[Row]) -> set:
  """problem_ids whose responses all pass or all fail."""
  outcomes: Dict[Any, set] = {}
  for row in rows:
    outcomes.setdefault(row["problem_id"], set()).add(bool(row["passed"]))
  return {pid for pid, seen in outcomes.items() if len(seen) == 1}


def is_selected(row: Row, selection: str) -> bool:
  """Whether a labeled row trains the PRM under `selection`.

  revised: failed, with a verified-correct prefix (first bad step > 0);
  failed: every failed (and searched) response; all: failed and searched, or passed.
  """
  if row["line_labels"] is None:
    return False
  if selection == "all":
    return True
  if row["passed"]:
    return False
  if selection == "failed":
    return True
  if selection == "revised":
    return (row["first_bad_step"] or 0) > 0
  raise ValueError(f"selection={selection!r}; choose one of {SELECTIONS}.")


def select_rows(rows: Sequence[Row], selection: str, drop_uniform_prompts: bool = False
                ) -> List[bool]:
  """Per row, whether it is selected (rows must hold whole prompts' responses)."""
  dropped = uniform_prompts(rows) if drop_uniform_prompts else set()
  return [row["problem_id"] not in dropped and is_selected(row, selection) for row in rows]


def balance_lines(rows: Sequence[Row], seed: int = 0) -> List[Row]:
  """Subsamples lines so positive and negative lines are equally many.

  Adds `line_used` (1 = the line trains the PRM) to copies of `rows`: a random subset of
  the majority label's lines is switched off. Trivial (label 0) lines stay used.
  """
  pos = [(r, l) for r, row in enumerate(rows) for l, y in enumerate(row["line_labels"])
         if y > 0]
  neg = [(r, l) for r, row in enumerate(rows) for l, y in enumerate(row["line_labels"])
         if y < 0]
  major = pos if len(pos) > len(neg) else neg
  excess = abs(len(pos) - len(neg))
  rng = np.random.default_rng(seed)
  off = set(tuple(major[k]) for k in rng.choice(len(major), size=excess, replace=False)) \
      if excess else set()
  out = []
  for r, row in enumerate(rows):
    used = [0 if (r, l) in off else 1 for l in range(len(row["line_labels"]))]
    out.append({**row, "line_used": used})
  return out


def label_counts(rows: Iterable[Row]) -> Dict[str, int]:
  """Positive, negative and trivial (0) line counts of labeled rows."""
  counts = {"positive_lines": 0, "negative_lines": 0, "trivial_lines": 0}
  for row in rows:
    used = row.get("line_used") or [1] * len(row["line_labels"] or [])
    for y, u in zip(row["line_labels"] or [], used):
      if not u:
        continue
      key = "positive_lines" if y > 0 else "negative_lines" if y < 0 else "trivial_lines"
      counts[key] += 1
  return counts


# ----------------------------------------------------------------------------- shards


def shard_path(out_dir: str, index: int) -> str:
  return os.path.join(out_dir, SHARD_PATTERN.format(index))


def write_shard(out_dir: str, index: int, rows: Sequence[Row]) -> str:
  """Writes one batch's rows as JSONL atomically (temp file + rename); returns the path."""
  return write_text(shard_path(out_dir, index),
                    "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def read_shard(path: str) -> List[Row]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def shard_indices(out_dir: str) -> List[int]:
  """Indices of the complete shards in `out_dir` (temp files are ignored)."""
  out = []
  for path in glob.glob(os.path.join(out_dir, "labels-*.jsonl")):
    match = re.fullmatch(r"labels-(\d+)\.jsonl", os.path.basename(path))
    if match:
      out.append(int(match.group(1)))
  return sorted(out)


def load_labels(out_dir: str, selected_only: bool = True) -> List[Row]:
  """All rows of a collection's shards, in order (only the selected ones by default)."""
  rows = []
  for index in shard_indices(out_dir):
    rows.extend(read_shard(shard_path(out_dir, index)))
  return [r for r in rows if r.get("selected")] if selected_only else rows


# ----------------------------------------------------------------------------- collection

# respond_fn(batch_index, problems) -> (responses, passed, extras): one entry per response,
# responses_per_prompt per problem, problem-major; extras is a list of per-row dicts (e.g.
# line_end_token_indices) or None.
RespondFn = Callable[[int, Sequence[Any]], Tuple[List[str], List[bool], Optional[List[Row]]]]
OracleFn = Callable[[Any, str], Optional[int]]


def _problem_id(problem: Any, fallback: int) -> Any:
  for name in ("problem_id", "id", "task_id", "name"):
    value = getattr(problem, name, None)
    if value is not None:
      return value
  return fallback


def _agreement(rows: Sequence[Row]) -> Dict[str, float]:
  """Binary-search first bad line vs the oracle's first error line (searched rows)."""
  searched = [r for r in rows if r["searched"] and "oracle_first_bad" in r]
  if not searched:
    return {}
  exact = np.mean([r["first_bad"] == r["oracle_first_bad"] for r in searched])
  line_hits, line_total = 0, 0
  for r in searched:
    oracle = oracle_labels(r["trivial"], r["lines"], r["oracle_first_bad"])
    for y, o in zip(r["line_labels"], oracle):
      if y != 0:
        line_total += 1
        line_hits += int(y == o)
  return {"oracle_first_bad_agreement": float(exact),
          "oracle_line_agreement": line_hits / max(line_total, 1),
          "oracle_rows": len(searched)}


def oracle_labels(trivial: Sequence[bool], lines: Sequence[str],
                  oracle_first_bad: Optional[int]) -> List[int]:
  """Line labels implied by an oracle's first wrong line (0-based; None = no error)."""
  del lines
  return [0 if t else (1 if oracle_first_bad is None or i < oracle_first_bad else -1)
          for i, t in enumerate(trivial)]


def run_collection(problems: Sequence[Any], respond_fn: RespondFn,
                   probe_for_batch: Callable[[int], ProbeFn], config: LabelingConfig,
                   out_dir: str, oracle_fn: Optional[OracleFn] = None,
                   log_fn: Optional[Callable[[int, Dict[str, float]], None]] = None
                   ) -> Dict[str, Any]:
  """Labels `problems` batch by batch into resumable shards; returns the collection stats.

  Batch b holds `config.prompts_per_batch` whole prompts; its rows go to
  `out_dir/labels-{b:05d}.jsonl` (written atomically once the batch is done), and a
  batch whose shard exists is skipped, so a crash loses at most the batch in flight.
  Each row carries `selected` (selection + uniform-prompt drop of `config`). Stats are
  written to `out_dir/collect_stats.json`.

  Args:
    problems: the prompts to label.
    respond_fn: samples and tests the responses of one batch (see `RespondFn`).
    probe_for_batch: batch index -> the batched prefix probe of that batch (see
      `label_batch`); keyed by batch so that a resumed run samples as an uninterrupted
      one would.
    config: the labeling knobs.
    out_dir: the shard directory.
    oracle_fn: optional (problem, response) -> first wrong line (0-based) or None; its
      value is stored per row (`oracle_first_bad`) and agreement goes to the stats.
    log_fn: optional callback (batch_index, batch metrics).
  """
  os.makedirs(out_dir, exist_ok=True)
  per_batch = config.prompts_per_batch
  num_batches = math.ceil(len(problems) / per_batch)
  done = set(shard_indices(out_dir))
  new_batches = 0
  for b in range(num_batches):
    if b in done:
      continue
    start = time.time()
    batch = list(problems[b * per_batch:(b + 1) * per_batch])
    responses, passed, extras = respond_fn(b, batch)
    k = config.responses_per_prompt
    if len(responses) != k * len(batch):
      raise ValueError(f"respond_fn returned {len(responses)} responses for {len(batch)} "
                       f"prompts x {k}.")
    owners = [batch[i // k] for i in range(len(responses))]
    ids = [_problem_id(p, b * per_batch + i // k) for i, p in
           zip(range(len(responses)), owners)]
    search = [True] * len(responses)
    if config.drop_uniform_prompts:
      none_pass = {pid for pid in set(ids)
                   if not any(ok for p, ok in zip(ids, passed) if p == pid)}
      search = [pid not in none_pass for pid in ids]
    t_search = time.time()
    rows = label_batch(owners, responses, passed, probe_for_batch(b), config, search=search)
    search_seconds = time.time() - t_search
    for i, row in enumerate(rows):
      row["problem_id"] = ids[i]
      row["prompt"] = getattr(owners[i], "prompt", "")
      row["batch"] = b
      if extras is not None:
        row.update(extras[i])
      if oracle_fn is not None:
        row["oracle_first_bad"] = oracle_fn(owners[i], responses[i])
    for row, keep in zip(rows, select_rows(rows, config.selection,
                                           config.drop_uniform_prompts)):
      row["selected"] = bool(keep)
    seconds = time.time() - start
    for row in rows:
      row["batch_seconds"] = seconds
    write_shard(out_dir, b, rows)
    new_batches += 1
    if log_fn is not None:
      log_fn(b, {**_stats(rows, config), "batch_seconds": seconds,
                 "search_seconds": search_seconds})
  rows = load_labels(out_dir, selected_only=False)
  stats = _stats(rows, config)
  # Wall time of every finished batch, this run's and earlier (interrupted) runs'.
  stats["wall_seconds"] = sum({r["batch"]: r.get("batch_seconds", 0.0) for r in rows}.values())
  stats["seconds_per_response"] = stats["wall_seconds"] / max(len(rows), 1)
  stats["batches"] = num_batches
  stats["batches_run_now"] = new_batches
  _write_json(os.path.join(out_dir, STATS_FILE), stats)
  return stats


def _stats(rows: Sequence[Row], config: LabelingConfig) -> Dict[str, Any]:
  """Collection statistics of labeled rows (cost, pass rate, label balance, agreement)."""
  n = max(len(rows), 1)
  searched = [r for r in rows if r["searched"]]
  selected = [r for r in rows if r.get("selected")]
  spent = sum(r["completions_spent"] for r in rows)
  linear = sum(config.completions * max(len([t for t in r["trivial"]
                                             if not (config.skip_trivial_lines and t)]) - 1, 0)
               for r in searched)
  stats = {"responses": len(rows), "pass_rate": sum(r["passed"] for r in rows) / n,
           "searched": len(searched), "selected": len(selected),
           "completions": spent, "completions_per_response": spent / n,
           "completions_per_searched": spent / max(len(searched), 1),
           "linear_scan_completions": linear,
           "max_rounds": max((r["rounds"] for r in rows), default=0),
           "mean_lines": float(np.mean([len(r["lines"]) for r in rows])) if rows else 0.0,
           "revised_share": (sum((r["first_bad_step"] or 0) > 0 for r in searched)
                             / max(len(searched), 1)),
           "completions_k": config.completions}
  counts = label_counts(selected)
  stats.update({f"selected_{k}": v for k, v in counts.items()})
  signed = counts["positive_lines"] + counts["negative_lines"]
  stats["selected_positive_share"] = counts["positive_lines"] / max(signed, 1)
  stats.update(_agreement(rows))
  return stats


def _read_json(path: str) -> Optional[Dict[str, Any]]:
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _write_json(path: str, value: Any) -> None:
  write_json(path, value, sort_keys=True)


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
    "mean_first_bad_minus_oracle" (signed, lines; > 0 = the search blames later)}.
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
    agreement = _agreement(rows)
    offsets = [r["first_bad"] - r["oracle_first_bad"] for r in rows
               if r["first_bad"] is not None and r["oracle_first_bad"] is not None]
    out.append({"k": k, "first_bad_agreement": agreement.get("oracle_first_bad_agreement", 0.0),
                "line_agreement": agreement.get("oracle_line_agreement", 0.0),
                "completions_per_response": float(np.mean([r["completions_spent"]
                                                           for r in rows])) if rows else 0.0,
                "mean_first_bad_minus_oracle": float(np.mean(offsets)) if offsets else 0.0})
  return out


# ----------------------------------------------------------------------------- production


def _encode(tokenizer: Any, text: str) -> List[int]:
  from psgpo_jax.rollout import encode  # pylint: disable=import-outside-toplevel
  return encode(tokenizer, text) if text else []


class PolicyProbe:
  """The production probe: K completions per prefix from a completer policy, then tests.

  One call = one sampler call (`num_samples = K` completions for every prefix, continuing
  `prompt + prefix`) and one sandbox call over all P * K programs
  `problem.program(prefix + completion)`. Call `i` samples with `fold_in(rng, i)`.

  Attributes:
    completions: programs sampled and tested so far.
    calls: sampler calls so far.
    seconds: {"sample", "test"} wall seconds spent.
  """

  def __init__(self, params: Any, model_cfg: Any, tokenizer: Any, sampling_config: Any,
               run_many_fn: Callable[[List[Tuple[str, Any]]], Sequence[Any]], rng: Any,
               mesh: Any = None):
    self.params, self.model_cfg, self.tokenizer = params, model_cfg, tokenizer
    self.sampling_config, self.run_many_fn, self.rng, self.mesh = (sampling_config,
                                                                   run_many_fn, rng, mesh)
    self.completions, self.calls = 0, 0
    self.seconds = {"sample": 0.0, "test": 0.0}

  @property
  def k(self) -> int:
    return self.sampling_config.num_samples

  def outcomes(self, jobs: List[PrefixJob]) -> List[List[bool]]:
    """Per job, K booleans: completion passed all tests."""
    import jax  # pylint: disable=import-outside-toplevel
    from psgpo_jax.sampling import generate  # pylint: disable=import-outside-toplevel
    if not jobs:
      return []
    start = time.time()
    out = generate(self.params, self.model_cfg,
                   [_encode(self.tokenizer, j.problem.prompt) for j in jobs],
                   jax.random.fold_in(self.rng, self.calls), self.sampling_config,
                   tokenizer=self.tokenizer,
                   prefixes=[_encode(self.tokenizer, j.prefix) or None for j in jobs],
                   mesh=self.mesh)
    self.calls += 1
    mid = time.time()
    k = self.k
    programs = [(job.problem.program(job.prefix + out.texts[j * k + s]), job.problem.tests)
                for j, job in enumerate(jobs) for s in range(k)]
    results = self.run_many_fn(programs)
    self.completions += len(programs)
    self.seconds["sample"] += mid - start
    self.seconds["test"] += time.time() - mid
    return [[bool(results[j * k + s].passed) for s in range(k)] for j in range(len(jobs))]

  def __call__(self, jobs: List[PrefixJob]) -> List[int]:
    return [sum(o) for o in self.outcomes(jobs)]


def make_respond_fn(params: Any, model_cfg: Any, tokenizer: Any, sampling_config: Any,
                    run_many_fn: Callable[[List[Tuple[str, Any]]], Sequence[Any]], rng: Any,
                    mesh: Any = None) -> RespondFn:
  """Samples `sampling_config.num_samples` responses per problem and tests them.

  Batch b samples with `fold_in(rng, b)`. Extras per row: `line_end_token_indices` (the
  end token of each line within the response's own token ids, `tokenization.line_spans`),
  `response_tokens`, `status`, `tests_passed`, `tests_total`.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from psgpo_jax.sampling import generate  # pylint: disable=import-outside-toplevel
  from psgpo_jax.tokenization import line_spans  # pylint: disable=import-outside-toplevel

  def respond(b: int, problems: Sequence[Any]):
    k = sampling_config.num_samples
    prompt_ids = [_encode(tokenizer, p.prompt) for p in problems]
    out = generate(params, model_cfg, prompt_ids, jax.random.fold_in(rng, b),
                   sampling_config, tokenizer=tokenizer, mesh=mesh)
    owners = [problems[i // k] for i in range(len(out.texts))]
    results = run_many_fn([(p.program(t), p.tests) for p, t in zip(owners, out.texts)])
    extras = []
    for i, (text, result) in enumerate(zip(out.texts, results)):
      response_ids = _encode(tokenizer, text)
      spans = line_spans(tokenizer, prompt_ids[i // k], response_ids)
      if spans.num_lines != len(split_lines(text)):
        raise ValueError(f"Line split mismatch for response {text!r}: tokenization found "
                         f"{spans.num_lines} lines, labeling {len(split_lines(text))}.")
      extras.append({"line_end_token_indices": [int(e) for e in spans.end_token],
                     "response_tokens": len(response_ids), "status": result.status,
                     "tests_passed": result.tests_passed, "tests_total": result.tests_total})
    return list(out.texts), [bool(r.passed) for r in results], extras

  return respond


def sampling_config_for(config: Any, tokenizer: Any, num_samples: int, temperature: float):
  """The `SamplingConfig` of a pipeline config's `sampling` section, for labeling."""
  from psgpo_jax.sampling import SamplingConfig  # pylint: disable=import-outside-toplevel
  values = dict(config.sampling)
  eos = tokenizer.eos_token_id
  return SamplingConfig.from_dict(values).replace(
      num_samples=int(num_samples), temperature=float(temperature),
      pad_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos),
      eos_ids=(int(eos),) if eos is not None else None)


def default_oracle(problems: Sequence[Any]) -> Optional[OracleFn]:
  """The synthetic suite's `first_error_line` when every problem is synthetic, else None."""
  if problems and all(getattr(p, "source", "") == "synthetic" for p in problems):
    from psgpo_jax.data import synthetic  # pylint: disable=import-outside-toplevel
    return synthetic.first_error_line
  return None


def collect_labels(policy_params: Any, model_cfg: Any, tokenizer: Any,
                   problems: Sequence[Any], config: Any, out_dir: str, rng: Any,
                   completer_params: Any = None, run_many_fn: Any = None,
                   oracle_fn: Optional[OracleFn] = None, writer: Any = None,
                   agreement_ks: Sequence[int] = (), agreement_responses: int = 32,
                   mesh: Any = None) -> Dict[str, Any]:
  """Collects binary-search PRM labels end to end; resumable (see `run_collection`).

  Args:
    policy_params: CausalLM params that sample the responses to label.
    model_cfg: their ModelConfig (the completer shares it).
    tokenizer: a transformers tokenizer (pad and eos set).
    problems: Problems (`.prompt`, `.tests`, `.program`); `config.collect.num_prompts`
      of them are used.
    config: the pipeline config (`collect`, `sampling`, `sandbox` sections).
    out_dir: shard directory (labels-XXXXX.jsonl, collect_stats.json).
    rng: PRNG key.
    completer_params: the policy that samples the K completions (default: the policy).
    run_many_fn: `(jobs) -> results` (default: a `Sandbox` pool with the config's limits).
    oracle_fn: (problem, response) -> first wrong line; default the synthetic oracle
      when every problem is synthetic.
    writer: optional MetricWriter: per-batch metrics under `collect/`.
    agreement_ks: if given (and an oracle exists), agreement with the oracle as a
      function of K on up to `agreement_responses` searched responses, written to
      `agreement_by_k.json` and into the stats.
    mesh: optional mesh for the sampler.
  Returns:
    The collection stats (also in `out_dir/collect_stats.json`).
  """
  import jax  # pylint: disable=import-outside-toplevel
  from psgpo_jax import sandbox  # pylint: disable=import-outside-toplevel
  labeling = LabelingConfig.from_config(config)
  problems = list(problems)[:int(config.collect.num_prompts)]
  oracle_fn = oracle_fn or default_oracle(problems)
  pool = None
  if run_many_fn is None:
    limits = sandbox.Limits(timeout_s=float(config.sandbox.timeout_s),
                            memory_mb=int(config.sandbox.memory_mb))
    pool = sandbox.Sandbox(int(config.sandbox.num_workers) or None, limits=limits,
                           cache_size=int(config.sandbox.cache_size))
    run_many_fn = pool.run_many
  completer_params = policy_params if completer_params is None else completer_params
  respond_rng, probe_rng, agree_rng = jax.random.split(rng, 3)
  respond_cfg = sampling_config_for(config, tokenizer, labeling.responses_per_prompt,
                                    labeling.temperature)
  probe_cfg = sampling_config_for(config, tokenizer, labeling.completions,
                                  labeling.temperature)
  respond_fn = make_respond_fn(policy_params, model_cfg, tokenizer, respond_cfg, run_many_fn,
                               respond_rng, mesh)
  probes: List[PolicyProbe] = []

  if labeling.labeler == "oracle" and oracle_fn is None:
    raise ValueError("collect.labeler='oracle' needs problems with a first-error oracle "
                     "(data.source=synthetic); use collect.labeler=search.")

  def probe_for_batch(b: int) -> ProbeFn:
    if labeling.labeler == "oracle":
      return oracle_probe(oracle_fn)
    probe = PolicyProbe(completer_params, model_cfg, tokenizer, probe_cfg, run_many_fn,
                        jax.random.fold_in(probe_rng, b), mesh)
    probes.append(probe)
    return probe

  def log_fn(b: int, metrics: Dict[str, float]) -> None:
    probe = probes[-1] if probes else None
    if probe is not None:
      metrics = {**metrics, "sample_seconds": probe.seconds["sample"],
                 "test_seconds": probe.seconds["test"]}
    if writer is not None:
      writer.write(b, metrics, prefix="collect/")

  try:
    stats = run_collection(problems, respond_fn, probe_for_batch, labeling, out_dir,
                           oracle_fn, log_fn)
    if agreement_ks and oracle_fn is not None:
      path = os.path.join(out_dir, "agreement_by_k.json")
      report = _read_json(path)
      if report is None:
        by_id = {_problem_id(p, i): p for i, p in enumerate(problems)}
        rows = [r for r in load_labels(out_dir, selected_only=False)
                if r["searched"] and r["problem_id"] in by_id][:agreement_responses]
        probe = PolicyProbe(completer_params, model_cfg, tokenizer,
                            probe_cfg.replace(num_samples=max(agreement_ks)), run_many_fn,
                            agree_rng, mesh)
        report = label_agreement_by_k([by_id[r["problem_id"]] for r in rows],
                                      [r["response"] for r in rows], probe.outcomes,
                                      oracle_fn, agreement_ks, labeling.skip_trivial_lines)
        _write_json(path, report)
      stats["agreement_by_k"] = report
      _write_json(os.path.join(out_dir, STATS_FILE), stats)
  finally:
    if pool is not None:
      pool.close()
  if writer is not None:
    writer.write(0, {k: v for k, v in stats.items() if isinstance(v, (int, float))},
                 prefix="collect/total/")
  return stats
