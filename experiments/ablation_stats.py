"""The ablation's statistics over seeds (experiments/ablation_report.py writes them up).

Two measures per setting, both on the held-out problems:
  * final pass@1: after the last RL step (16 samples per problem, the eval stage);
  * learning-curve pass@1: the mean of the held-out pass@1 measured during RL (every
    `rl.eval_every` updates, `rl.eval_samples` samples per problem), i.e. the area under
    the learning curve per update. It says how fast a setting learns, which the final
    figure hides once every setting has saturated.
Besides: updates until the curve reaches a threshold, whether a curve has plateaued, the
gain's slope over horizons, and pass@1 by the SFT policy's difficulty of each problem.
A claim "held" when the mean difference over seeds exceeds two standard errors (Welch).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

CURVE_METRIC = "curve.pass@1"


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
  """Mean and sample standard deviation (0 for one value)."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def learning_curve(metrics: Sequence[Mapping[str, Any]]) -> Dict[int, float]:
  """{updates: held-out pass@1} from a run's RL metrics rows (0 = before any update)."""
  return {int(m["eval/updates"]): float(m["eval/pass@1"]) for m in metrics
          if isinstance(m.get("eval/pass@1"), (int, float)) and "eval/updates" in m}


def curve_mean(curve: Mapping[int, float]) -> Optional[float]:
  """Mean pass@1 over the evaluations after at least one update (None if there are none)."""
  points = [v for k, v in curve.items() if k > 0]
  return float(np.mean(points)) if points else None


def setting_table(runs: Mapping[str, Sequence[Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
  """Per setting: held-out pass@k, greedy pass@1, the SFT starting point and (when every
  run has one) the learning-curve mean `CURVE_METRIC`, over seeds.

  Returns {setting: {"n", "<metric>": (mean, std), "per_seed": {metric: [...]}}}.
  """
  table = {}
  for setting, rows in runs.items():
    per_seed: Dict[str, List[float]] = {}
    for run in rows:
      for label in ("before", "after"):
        out = run["report"][label]
        for key, value in out["summary"]["all"].items():
          if key.startswith("pass@"):
            per_seed.setdefault(f"{label}.{key}", []).append(float(value))
        per_seed.setdefault(f"{label}.greedy_pass@1", []).append(float(out["greedy_pass@1"]))
    means = [curve_mean(learning_curve(run.get("metrics", []))) for run in rows]
    if rows and all(m is not None for m in means):
      per_seed[CURVE_METRIC] = means
    table[setting] = {"n": len(rows), "per_seed": per_seed,
                      **{k: mean_std(v) for k, v in per_seed.items()}}
  return table


def curve_over_seeds(rows: Sequence[Dict[str, Any]]) -> Dict[int, Tuple[float, float]]:
  """{updates: (mean, standard error)} of the held-out pass@1 curve over a setting's seeds."""
  per_step: Dict[int, List[float]] = {}
  for run in rows:
    for step, value in learning_curve(run["metrics"]).items():
      per_step.setdefault(step, []).append(value)
  return {s: (float(np.mean(v)), float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1
              else 0.0) for s, v in sorted(per_step.items())}


def mean_curve(dicts: Sequence[Mapping[Any, float]]) -> Dict[int, float]:
  """Pointwise mean of {K: value} curves over seeds (JSON's string keys become ints)."""
  curves = [{int(k): float(v) for k, v in d.items()} for d in dicts]
  keys = sorted(set().union(*curves))
  return {k: float(np.mean([c[k] for c in curves if k in c])) for k in keys}


def per_seed_by_horizon(rows: Sequence[Dict[str, Any]], label: str = "after"
                        ) -> Dict[int, List[Tuple[float, float]]]:
  """{horizon: [(pass@1, binomial stderr) of each seed]}."""
  acc: Dict[int, List[Tuple[float, float]]] = {}
  for run in rows:
    for r in run["report"][label]["by_horizon"]:
      acc.setdefault(int(r["lo"]), []).append((float(r["pass@1"]), float(r["stderr"])))
  return dict(sorted(acc.items()))


def by_horizon(rows: Sequence[Dict[str, Any]], label: str = "after") -> Dict[int, Tuple[float, float]]:
  """Mean over seeds of pass@1 per horizon, with the seeds' mean binomial stderr."""
  return {h: (float(np.mean([p for p, _ in v])), float(np.mean([s for _, s in v])))
          for h, v in per_seed_by_horizon(rows, label).items()}


def mean_series(series: Sequence[Mapping[str, Sequence[Tuple[float, float]]]]
                ) -> Dict[str, List[Tuple[float, float]]]:
  """Pointwise mean over seeds of {key: [(x, y)]} series (e.g. `plots.training_series` of
  each run): {key: [(x, mean y over the seeds that have x)]}."""
  acc: Dict[str, Dict[float, List[float]]] = {}
  for one in series:
    for key, points in one.items():
      for x, y in points:
        acc.setdefault(key, {}).setdefault(float(x), []).append(float(y))
  return {key: [(x, float(np.mean(ys))) for x, ys in sorted(by_x.items())]
          for key, by_x in acc.items()}


def _mean_and_variance(values: Sequence[float]) -> Tuple[float, float]:
  """Mean of `values` and the variance of that mean (0 for one value)."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.var(ddof=1) / len(v)) if len(v) > 1 else 0.0


def compare(table: Mapping[str, Mapping[str, Any]], a: str, b: str,
            metric: str = "after.pass@1") -> Dict[str, float]:
  """Difference of means a - b and its standard error (Welch) over seeds."""
  (ma, va), (mb, vb) = (_mean_and_variance(table[x]["per_seed"][metric]) for x in (a, b))
  return {"diff": ma - mb, "se": float(np.sqrt(va + vb))}


def verdict(diff: float, se: float) -> str:
  """'held' when the difference is positive by more than two standard errors."""
  if se > 0 and diff > 2 * se:
    return "held"
  if se > 0 and diff < -2 * se:
    return "reversed"
  return "not shown (within noise)" if se > 0 else ("held (one seed)" if diff > 0 else
                                                    "not shown (one seed)")


def horizon_gain_slope(runs: Mapping[str, Sequence[Dict[str, Any]]], a: str, b: str
                       ) -> Tuple[Dict[int, float], float, float]:
  """Final pass@1 gain of a over b per horizon, the least-squares slope of gain on horizon,
  and the slope's standard error.

  The gain g_h is a difference of seed means with variance var_a(h)/n_a + var_b(h)/n_b
  (seed variances; a one-seed setting uses its binomial stderr instead). The slope is
  sum_h w_h g_h with w_h = (h - mean h) / sum (h - mean h)^2, so its variance is
  sum_h w_h^2 var(g_h), horizons being disjoint problem sets.
  """
  pa, pb = per_seed_by_horizon(runs[a]), per_seed_by_horizon(runs[b])
  gains, variances = {}, {}
  for h in pa:
    if h not in pb:
      continue
    stats = []
    for seeds in (pa[h], pb[h]):
      mean, var = _mean_and_variance([p for p, _ in seeds])
      stats.append((mean, var if len(seeds) > 1 else seeds[0][1] ** 2))
    gains[h] = stats[0][0] - stats[1][0]
    variances[h] = stats[0][1] + stats[1][1]
  hs = np.asarray(sorted(gains), np.float64)
  if len(hs) < 2:
    return gains, 0.0, 0.0
  w = (hs - hs.mean()) / np.sum((hs - hs.mean()) ** 2)
  slope = float(np.sum(w * np.asarray([gains[h] for h in sorted(gains)])))
  se = float(np.sqrt(np.sum(w ** 2 * np.asarray([variances[h] for h in sorted(gains)]))))
  return gains, slope, se


# ------------------------------------------------------------------------- learning speed


def first_reaching(curve: Mapping[int, float], threshold: float) -> Optional[int]:
  """The fewest updates after which held-out pass@1 was at least `threshold` (None: never)."""
  hits = [k for k, v in sorted(curve.items()) if k > 0 and v >= threshold]
  return hits[0] if hits else None


def curve_threshold(runs: Mapping[str, Sequence[Dict[str, Any]]], reference: str = "none",
                    share: float = 0.8) -> float:
  """SFT pass@1 plus `share` of the `reference` setting's mean gain at its last evaluation:
  the level "steps to threshold" counts updates to (every setting starts at the same SFT
  policy, so the start is the mean curve value at 0 updates over all runs)."""
  starts = [c[0] for rows in runs.values() for c in map(_run_curve, rows) if 0 in c]
  ends = [c[max(c)] for c in map(_run_curve, runs[reference]) if c]
  return float(np.mean(starts) + share * (np.mean(ends) - np.mean(starts)))


def steps_to_threshold(rows: Sequence[Dict[str, Any]], threshold: float
                       ) -> Tuple[float, float, int]:
  """Mean and standard error over seeds of the updates until the curve reached
  `threshold`, and how many seeds reached it. A seed that never did counts with its last
  evaluation's updates, so the mean is then a lower bound."""
  steps, reached = [], 0
  for curve in filter(None, map(_run_curve, rows)):
    hit = first_reaching(curve, threshold)
    reached += hit is not None
    steps.append(hit if hit is not None else max(curve))
  mean, var = _mean_and_variance(steps)
  return mean, float(np.sqrt(var)), reached


def plateau_gain(rows: Sequence[Dict[str, Any]]) -> Tuple[float, float]:
  """How much a setting still rose at the end: per seed, the mean held-out pass@1 over
  the last third of its evaluations (after 0 updates) minus the mean over the middle
  third; returns the mean over seeds and its standard error. Within two standard errors
  of 0 (or below), the curve has plateaued."""
  gains = []
  for curve in map(_run_curve, rows):
    points = [v for k, v in sorted(curve.items()) if k > 0]
    third = len(points) // 3
    if third == 0:
      continue
    gains.append(np.mean(points[-third:]) - np.mean(points[-2 * third:-third]))
  if not gains:
    return float("nan"), float("nan")
  mean, var = _mean_and_variance(gains)
  return mean, float(np.sqrt(var))


def _run_curve(run: Mapping[str, Any]) -> Dict[int, float]:
  return learning_curve(run.get("metrics", []))


# ------------------------------------------------------------------------- difficulty


DIFFICULTY = ("never", "rare", "some", "most", "always")


def problem_pass_counts(samples: Iterable[Mapping[str, Any]]) -> Dict[str, Dict[str, int]]:
  """{task_id: {"passed", "samples", "horizon"}} from an eval stage's samples_*.jsonl rows
  (one row per sample, each with task_id, passed and, on the synthetic suite, horizon)."""
  counts: Dict[str, Dict[str, int]] = {}
  for row in samples:
    c = counts.setdefault(row["task_id"], {"passed": 0, "samples": 0,
                                           "horizon": int(row.get("horizon", 0))})
    c["passed"] += bool(row["passed"])
    c["samples"] += 1
  return counts


def difficulty(passed: int, samples: int) -> str:
  """A problem's class by the SFT policy's `passed` of `samples`: never (0), rare (at most
  1/8 of them: pass rate about 0, yet pass@samples > 0, where RL has a signal to find),
  some (up to half), most (more than half, not all), always (all)."""
  if passed == 0:
    return "never"
  if passed == samples:
    return "always"
  if passed * 8 <= samples:
    return "rare"
  return "some" if passed * 2 <= samples else "most"


def pass_by_difficulty(sft: Mapping[str, Mapping[str, int]],
                       after: Sequence[Mapping[str, Mapping[str, int]]]
                       ) -> Dict[str, Dict[str, Any]]:
  """Per difficulty class (of the SFT policy's counts `sft`): the problems in it, their mean
  horizon, the SFT pass@1 on them, and each seed's pass@1 on them after RL (`after`: one
  count table per seed). Classes without problems are left out."""
  out = {}
  for name in DIFFICULTY:
    ids = [t for t, c in sft.items() if difficulty(c["passed"], c["samples"]) == name]
    if not ids:
      continue
    rate = lambda counts: float(np.mean([counts[t]["passed"] / counts[t]["samples"]
                                         for t in ids]))
    out[name] = {"problems": len(ids), "share": len(ids) / len(sft),
                 "horizon": float(np.mean([sft[t]["horizon"] for t in ids])),
                 "sft": rate(sft), "per_seed": [rate(c) for c in after if c]}
  return out
