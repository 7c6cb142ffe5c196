"""The ablation's report: statistics over seeds, the paper's claims with their standard
errors, the plots, and `results.md` (experiments/ablation.py calls `write_report`).

Two measures per setting, both on the held-out problems:
  * final pass@1: after the last RL step (16 samples per problem, the eval stage);
  * learning-curve pass@1: the mean of the held-out pass@1 measured during RL (every
    `rl.eval_every` updates, `rl.eval_samples` samples per problem), i.e. the area under
    the learning curve per update. It says how fast a setting learns, which the final
    figure hides once every setting has saturated.
A claim "held" when the mean difference over seeds exceeds two standard errors (Welch).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

LABELS = {"none": "no PRM", "dense": "dense reward only", "value": "value init only",
          "both": "both (PSGPO)", "oracle": "oracle dense reward",
          "no_length_norm": "both, no length normalisation",
          "min_credit": "both, min-form credit"}
CURVE_METRIC = "curve.pass@1"
CLAIMS = (("Dense PRM rewards help (dense > none)", "dense", "none"),
          ("PRM value initialisation helps (value > none)", "value", "none"),
          ("Both together beat dense only", "both", "dense"),
          ("Both together beat value init only", "both", "value"),
          ("Both together beat no PRM", "both", "none"),
          ("Oracle dense rewards help (oracle > none): the upper bound", "oracle", "none"),
          ("The learned PRM's dense rewards reach the oracle's (dense - oracle)", "dense", "oracle"),
          ("PSGPO reaches the oracle's dense rewards (both - oracle)", "both", "oracle"))


# ------------------------------------------------------------------------- reading


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_run(run_dir: str) -> Dict[str, Any]:
  """One finished run: its eval report (before/after RL) and RL training metrics."""
  from psgpo_jax.logging import read_metrics  # pylint: disable=import-outside-toplevel
  report = _read_json(os.path.join(run_dir, "eval", "report.json"))
  return {"report": report, "rl": _read_json(os.path.join(run_dir, "rl", "result.json")),
          "metrics": list(read_metrics(os.path.join(run_dir, "rl", "metrics.jsonl"))),
          "dir": run_dir}


def collect_runs(root: str, plan: Sequence[Tuple[str, int]]) -> Dict[str, List[Dict[str, Any]]]:
  """Finished runs grouped by setting, in plan order."""
  runs: Dict[str, List[Dict[str, Any]]] = {}
  for setting, seed in plan:
    runs.setdefault(setting, []).append(read_run(os.path.join(root, setting, f"seed{seed}")))
  return runs


# ------------------------------------------------------------------------- statistics


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


def monitor_curves(rows: Sequence[Dict[str, Any]], key: str) -> Tuple[List[int], List[float]]:
  """A training metric averaged over seeds per step."""
  per_step: Dict[int, List[float]] = {}
  for run in rows:
    for m in run["metrics"]:
      if isinstance(m.get(key), (int, float)):
        per_step.setdefault(int(m["step"]), []).append(float(m[key]))
  steps = sorted(per_step)
  return steps, [float(np.mean(per_step[s])) for s in steps]


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


# ------------------------------------------------------------------------- plots


def write_plots(runs: Mapping[str, Sequence[Dict[str, Any]]], out_dir: str) -> Dict[str, str]:
  """learning_curves.png, best_of_k.png, pass_by_horizon.png and training_monitors.png."""
  from psgpo_jax import eval_plots  # pylint: disable=import-outside-toplevel
  from psgpo_jax.stages import TRAINING_PLOT_KEYS  # pylint: disable=import-outside-toplevel
  first = next(iter(runs.values()))
  curves = {"SFT policy": mean_curve([r["report"]["before"]["best_of_k"] for r in first])}
  curves.update({LABELS[s]: mean_curve([r["report"]["after"]["best_of_k"] for r in rows])
                 for s, rows in runs.items()})
  as_rows = lambda points: [{"lo": h, "hi": h + 1, "pass@1": m, "stderr": se}
                            for h, (m, se) in points.items()]
  horizons = {"SFT policy": as_rows(by_horizon(first, "before"))}
  horizons.update({LABELS[s]: as_rows(by_horizon(rows)) for s, rows in runs.items()})
  learning = {LABELS[s]: curve_over_seeds(rows) for s, rows in runs.items()}
  return {
      "learning_curves": eval_plots.plot_learning_curves(
          {k: v for k, v in learning.items() if v},
          os.path.join(out_dir, "learning_curves.png"),
          title="held-out pass@1 during RL (mean ± se over seeds)"),
      "best_of_k": eval_plots.plot_best_of_k(
          curves, os.path.join(out_dir, "best_of_k.png"),
          title="Best-of-K on held-out problems (mean over seeds)"),
      "by_horizon": eval_plots.plot_pass_by_length(
          horizons, os.path.join(out_dir, "pass_by_horizon.png"),
          xlabel="horizon (solution lines)", title="pass@1 by horizon (mean over seeds)"),
      "monitors": _plot_monitors(runs, TRAINING_PLOT_KEYS,
                                 os.path.join(out_dir, "training_monitors.png"))}


def _plot_monitors(runs: Mapping[str, Sequence[Dict[str, Any]]],
                   keys: Sequence[Tuple[str, str]], path: str) -> str:
  """One panel per (metric, title), one line per setting (mean over seeds per step)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(2, 3, figsize=(13, 7))
  for ax, (key, title) in zip(axes.flat, keys):
    for setting, rows in runs.items():
      steps, values = monitor_curves(rows, key)
      if steps:
        ax.plot(steps, values, label=LABELS[setting], marker="." if len(steps) < 10 else None)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("RL step")
    ax.grid(alpha=0.3)
  axes.flat[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


# ------------------------------------------------------------------------- results.md


def _fmt(pair: Tuple[float, float]) -> str:
  return f"{pair[0]:.3f} ± {pair[1]:.3f}"


def _nan_for_null(result: Mapping[str, Any]) -> Dict[str, Any]:
  """Run files write undefined metrics (e.g. AUROC of one class) as null: read them as nan."""
  return {k: float("nan") if v is None else v for k, v in result.items()}


def _run_configs(runs) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """The config of the first run, and of the first run with dense rewards (its λ apply)."""
  configs = [_read_json(os.path.join(r["dir"], "config.json"))
             for rows in runs.values() for r in rows]
  dense = [c for c in configs if c["rl"]["dense_reward"]]
  return configs[0], (dense or configs)[0]


def _setup_lines(base_config, sft, collect, prm, runs) -> List[str]:
  run_config, dense_config = _run_configs(runs)
  rl, reward = run_config["rl"], dense_config["rl"]["reward"]
  seconds = sum(r["rl"].get("seconds", 0) for rows in runs.values() for r in rows)
  data = base_config["data"]
  return [
      "## Setup\n",
      f"- Model: Qwen2-style decoder, hidden {base_config['model']['hidden_size']}, "
      f"{base_config['model']['num_hidden_layers']} layers; synthetic suite horizons "
      f"{data['min_horizon']}-{data['max_horizon']} ({data['num_train']} train / "
      f"{data['num_eval']} held-out problems).",
      f"- One SFT policy ({base_config['sft']['steps']} steps, noise "
      f"{base_config['sft']['noise']}; held-out greedy pass@1 "
      f"{sft.get('eval_greedy_pass@1', float('nan')):.3f}) and one PRM shared by all runs.",
      f"- RL per run: {rl['steps']} steps x {rl['prompts_per_step']} prompts x "
      f"{rl['samples_per_prompt']} samples, policy lr {rl['policy_lr']}, value lr "
      f"{rl['value_lr']}, KL {rl['reward']['kl_coef']} ({rl['reward']['kl_estimator']}), "
      f"dense λ fail/pass {reward['dense_coef_fail']}/{reward['dense_coef_pass']} "
      "(the settings with dense rewards); "
      f"{len(next(iter(runs.values())))} seed(s) per setting (seeds vary only the RL stage).",
      f"- Evaluation: {run_config['eval']['num_samples']} samples per held-out problem at "
      f"temperature {run_config['eval']['temperature']} after RL (pass@k by the unbiased "
      f"estimator), plus greedy pass@1; during RL, held-out pass@1 every "
      f"{rl['eval_every']} updates with {rl['eval_samples']} samples per problem (the "
      "learning curve).",
      f"- RL wall time, all runs: {seconds / 60:.1f} min on this machine "
      f"(shared stages: sft {sft.get('seconds', 0):.0f} s, collect "
      f"{collect.get('seconds', 0):.0f} s, prm {prm.get('seconds', 0):.0f} s).\n"]


def _setting_lines(table, runs) -> List[str]:
  ks = sorted({k.split("@")[1] for k in table[next(iter(table))]["per_seed"]
               if k.startswith("after.pass@")}, key=int)
  header = ("| setting | seeds | SFT pass@1 | learning-curve pass@1 | after RL pass@1 | "
            + " | ".join(f"pass@{k}" for k in ks if k != "1")
            + " | greedy before | greedy after |")
  out = ["## Held-out pass@1 per setting (mean ± std over seeds)\n", header,
         "|" + "---|" * (header.count("|") - 1)]
  for setting, row in table.items():
    curve = _fmt(row[CURVE_METRIC]) if CURVE_METRIC in row else "-"
    out.append(f"| {LABELS[setting]} | {row['n']} | {_fmt(row['before.pass@1'])} | "
               f"**{curve}** | **{_fmt(row['after.pass@1'])}** | "
               + " | ".join(_fmt(row[f"after.pass@{k}"]) for k in ks if k != "1")
               + f" | {_fmt(row['before.greedy_pass@1'])} | {_fmt(row['after.greedy_pass@1'])} |")
  curves = {s: curve_over_seeds(rows) for s, rows in runs.items()}
  steps = sorted(set().union(*[c.keys() for c in curves.values()]))
  if steps:
    out += ["", "Held-out pass@1 during RL (mean over seeds), by number of updates:\n",
            "| setting | " + " | ".join(str(s) for s in steps) + " |",
            "|" + "---|" * (len(steps) + 1)]
    for setting, curve in curves.items():
      out.append(f"| {LABELS[setting]} | "
                 + " | ".join(f"{curve[s][0]:.3f}" if s in curve else "-" for s in steps) + " |")
  return out + [""]


def _claim_lines(table, runs) -> List[str]:
  with_curve = all(CURVE_METRIC in row["per_seed"] for row in table.values())
  out = ["## The paper's claims, here\n",
         "| claim | final pass@1: difference ± se | verdict | learning-curve pass@1: "
         "difference ± se | verdict |", "|---|---|---|---|---|"]
  for text, a, b in CLAIMS:
    if a not in table or b not in table:
      continue
    cells = []
    for metric in ("after.pass@1", CURVE_METRIC):
      if metric == CURVE_METRIC and not with_curve:
        cells += ["-", "-"]
        continue
      c = compare(table, a, b, metric)
      cells += [f"{c['diff']:+.3f} ± {c['se']:.3f}", verdict(c["diff"], c["se"])]
    out.append(f"| {text} | " + " | ".join(cells) + " |")
  out.append("\nA claim 'held' when the mean difference over seeds exceeds two standard "
             "errors (Welch), 'reversed' when it is below minus two, 'within noise' "
             "otherwise. The learning-curve pass@1 is the mean held-out pass@1 over the "
             "evaluations during RL (the area under the learning curve): how fast a "
             "setting learns. The final pass@1 is where it ends.\n")
  out.append("**Does the gain grow with the horizon?** Final pass@1 gain over no PRM per "
             "horizon, and the least-squares slope of gain on horizon (± its standard "
             "error from the seed variances):\n")
  for a in ("dense", "both", "oracle"):
    if a in runs and "none" in runs:
      gains, slope, se = horizon_gain_slope(runs, a, "none")
      out.append(f"- {LABELS[a]} - no PRM: " + ", ".join(f"h{h} {g:+.3f}" for h, g in gains.items())
                 + f"; slope {slope:+.4f} ± {se:.4f} per line: {verdict(slope, se)}.")
  return out + [""]


def _prm_lines(collect, prm, agreement) -> List[str]:
  out = ["## PRM quality and labels\n",
         f"- PRM on held-out labeled responses: AUROC {prm.get('auroc', float('nan')):.3f} "
         f"(at init {prm.get('init/auroc', float('nan')):.3f}, line position alone "
         f"{prm.get('position/auroc', float('nan')):.3f}), line accuracy "
         f"{prm.get('line_accuracy', float('nan')):.3f}, first-error accuracy "
         f"{prm.get('first_error_accuracy', float('nan')):.3f} against the binary-search "
         f"labels and {prm.get('oracle_first_error_accuracy', float('nan')):.3f} against the "
         f"suite's oracle; {prm.get('responses', 0)} held-out responses, "
         f"{prm.get('lines', 0)} lines.",
         f"- Binary-search labels: {collect.get('responses', 0)} responses (pass rate "
         f"{collect.get('pass_rate', float('nan')):.3f}), "
         f"{collect.get('completions_per_response', float('nan')):.1f} completions per "
         f"response vs {collect.get('linear_scan_completions', 0) / max(1, collect.get('responses', 1)):.1f} "
         f"for a linear scan; first-wrong-line agreement with the oracle "
         f"{collect.get('oracle_first_bad_agreement', float('nan')):.3f}, per-line "
         f"{collect.get('oracle_line_agreement', float('nan')):.3f}."]
  if agreement:
    out.append("- Agreement with the oracle's first wrong line by K (completions per probe): "
               + ", ".join(f"K={int(r['k'])}: {float(r['first_bad_agreement']):.3f}"
                           for r in agreement) + ".")
  return out + [""]


def _monitor_lines(runs) -> List[str]:
  out = ["## Reward-hacking monitors (last quarter of training, mean over seeds)\n",
         "| setting | train pass rate | lines / response | trivial line share | mean PRM score | KL |",
         "|---|---|---|---|---|---|"]
  for setting, rows in runs.items():
    vals = []
    for key in ("final_pass_rate", "final_lines_per_response", "final_trivial_line_share",
                "final_prm_score_mean", "final_kl"):
      xs = [r["rl"][key] for r in rows if key in r["rl"]]
      vals.append(f"{np.mean(xs):.3f}" if xs else "-")
    out.append(f"| {LABELS[setting]} | " + " | ".join(vals) + " |")
  return out + [""]


def write_report(root: str, runs: Mapping[str, Sequence[Dict[str, Any]]], out_dir: str,
                 command: str) -> str:
  """Writes results.md (and its PNGs) from finished runs; returns its path."""
  os.makedirs(out_dir, exist_ok=True)
  shared = os.path.join(root, "shared")
  base_config = _read_json(os.path.join(shared, "config.json"))
  sft, collect = (_read_json(os.path.join(shared, s, "result.json")) for s in ("sft", "collect"))
  prm = _nan_for_null(_read_json(os.path.join(shared, "prm", "result.json")))
  agreement_path = os.path.join(shared, "collect", "agreement_by_k.json")
  agreement = _read_json(agreement_path) if os.path.exists(agreement_path) else []
  table = setting_table(runs)
  plots = write_plots(runs, out_dir)
  lines = ["# Replication on the synthetic suite: the paper's ablation at CPU scale\n",
           f"Produced by `{command}` (experiments/ablation.py). Every number below comes "
           "from that run's files; re-running the command rewrites this page.\n"]
  lines += _setup_lines(base_config, sft, collect, prm, runs)
  lines += _setting_lines(table, runs)
  lines += _claim_lines(table, runs)
  lines += ["## Plots\n"] + [f"![{name}]({os.path.basename(p)})\n" for name, p in plots.items()]
  lines += _prm_lines(collect, prm, agreement)
  lines += _monitor_lines(runs)
  path = os.path.join(out_dir, "results.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return path
