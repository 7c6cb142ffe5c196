"""The paper's ablation on the synthetic suite, and a report that says whether it held.

Trains the four settings (no PRM / dense reward only / value init only / both) for each
seed from ONE SFT policy and ONE PRM, plus the safeguard variants (no length
normalisation, min-form credit) once each, then writes `<report_dir>/results.md` and PNGs
next to it:

  python -m experiments.ablation --config configs/ablation.py --workdir runs/ablation \
      --seeds 0,1,2 --report_dir docs

Everything is resumable: the shared stages run once in `<workdir>/shared`, each RL run
lives in `<workdir>/<setting>/seed<k>` (linked to the shared SFT policy, labels and PRM)
and is skipped when done, so re-running the command only finishes what is missing and
rewrites the report. `--config.*` overrides apply to every run (e.g. `--config.rl.steps=30`).
Seeds vary the RL stage only (`rl.seed`: rollouts, problem order, value head); the SFT
policy, the PRM and the held-out problems are the same for every run.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Mapping, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # pylint: disable=g-import-not-at-top
from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

from configs.ablation import ARMS, apply_arm  # pylint: disable=g-import-not-at-top
from experiments import common  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          "Base config of every run (configs/ablation.py).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", "runs/ablation", "Root of the shared and per-run dirs.")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "RL seeds of each of the four settings.")
_ARMS = flags.DEFINE_string("arms", "none,dense,value,both", "Settings to train (configs/ablation.py).")
_VARIANTS = flags.DEFINE_string("variants", "no_length_norm,min_credit",
                                "Safeguard variants of 'both', run with the first seed ('' = none).")
_REPORT_DIR = flags.DEFINE_string("report_dir", "docs", "Where results.md and the PNGs go.")

SHARED_STAGES = ("sft", "collect", "prm")
# What each variant changes in the 'both' setting.
VARIANTS = {"no_length_norm": {"normalize_by_lines": False},
            "min_credit": {"credit": "min"}}
LABELS = {"none": "no PRM", "dense": "dense reward only", "value": "value init only",
          "both": "both (PSGPO)", "oracle": "oracle dense reward", "no_length_norm": "both, no length normalisation",
          "min_credit": "both, min-form credit"}


# ------------------------------------------------------------------------- running


def run_plan(arms: Sequence[str], seeds: Sequence[int], variants: Sequence[str]
             ) -> List[Tuple[str, int]]:
  """(setting, seed) pairs: every arm x seed, then each variant with the first seed."""
  for name in arms:
    if name not in ARMS:
      raise ValueError(f"Unknown arm {name!r}; choose from {sorted(ARMS)}.")
  for name in variants:
    if name not in VARIANTS:
      raise ValueError(f"Unknown variant {name!r}; choose from {sorted(VARIANTS)}.")
  if not seeds:
    raise ValueError("--seeds is empty; give at least one seed, e.g. --seeds 0,1,2.")
  return [(a, s) for a in arms for s in seeds] + [(v, seeds[0]) for v in variants]


def setting_config(base, setting: str, seed: int, workdir: str):
  """The pipeline config of one RL run: `base` with the setting's switches and seed."""
  config = base.copy_and_resolve_references()
  arm = setting if setting in ARMS else "both"
  apply_arm(config, arm)
  for field, value in VARIANTS.get(setting, {}).items():
    setattr(config.rl.reward, field, value)
  config.rl.seed = seed
  config.workdir = workdir
  config.stages = "rl,eval"
  return config


def link_shared(shared_dir: str, run_dir: str) -> None:
  """Points a run dir's tokenizer and shared stage outputs at the shared run's."""
  os.makedirs(run_dir, exist_ok=True)
  for name in ("tokenizer",) + SHARED_STAGES:
    target, link = os.path.join(shared_dir, name), os.path.join(run_dir, name)
    if not os.path.exists(target):
      raise FileNotFoundError(f"{target} is missing: the shared stages did not finish; "
                              "re-run this command to continue them.")
    if not os.path.lexists(link):
      os.symlink(target, link)


def run_all(base, root: str, plan: Sequence[Tuple[str, int]]) -> None:
  """Runs the shared stages, then every planned RL run (each skipped when done)."""
  from psgpo_jax import pipeline  # pylint: disable=import-outside-toplevel
  shared = base.copy_and_resolve_references()
  shared.workdir = os.path.join(root, "shared")
  shared.stages = ",".join(SHARED_STAGES)
  done = [os.path.exists(os.path.join(shared.workdir, s, "result.json")) for s in SHARED_STAGES]
  if all(done):            # e.g. a linked quickstart run: leave its config and summary alone
    print(f"shared stages {', '.join(SHARED_STAGES)} done in {shared.workdir}: reused")
  else:
    pipeline.run(shared)
  for i, (setting, seed) in enumerate(plan):
    run_dir = os.path.join(root, setting, f"seed{seed}")
    print(f"=== [{i + 1}/{len(plan)}] {LABELS[setting]}, seed {seed}: {run_dir}", flush=True)
    link_shared(shared.workdir, run_dir)
    pipeline.run(setting_config(base, setting, seed, run_dir))


# ------------------------------------------------------------------------- reading


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_run(run_dir: str) -> Dict[str, Any]:
  """One finished run: its eval report (before/after RL) and RL training metrics."""
  from psgpo_jax.logging import read_metrics  # pylint: disable=import-outside-toplevel
  report = _read_json(os.path.join(run_dir, "eval", "report.json"))
  return {"report": report, "rl": _read_json(os.path.join(run_dir, "rl", "result.json")),
          "metrics": list(read_metrics(os.path.join(run_dir, "rl", "metrics.jsonl")))}


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
  """Mean and sample standard deviation (0 for one value)."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def setting_table(runs: Mapping[str, Sequence[Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
  """Per setting: held-out pass@k, greedy pass@1 and the SFT starting point, over seeds.

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
    table[setting] = {"n": len(rows), "per_seed": per_seed,
                      **{k: mean_std(v) for k, v in per_seed.items()}}
  return table


def mean_curve(dicts: Sequence[Mapping[Any, float]]) -> Dict[int, float]:
  """Pointwise mean of {K: value} curves over seeds (JSON's string keys become ints)."""
  curves = [{int(k): float(v) for k, v in d.items()} for d in dicts]
  keys = sorted(set().union(*curves))
  return {k: float(np.mean([c[k] for c in curves if k in c])) for k in keys}


def by_horizon(rows: Sequence[Dict[str, Any]], label: str = "after") -> Dict[int, Tuple[float, float]]:
  """Mean over seeds of pass@1 per horizon, with the seeds' mean binomial stderr."""
  acc: Dict[int, List[Tuple[float, float]]] = {}
  for run in rows:
    for r in run["report"][label]["by_horizon"]:
      acc.setdefault(int(r["lo"]), []).append((float(r["pass@1"]), float(r["stderr"])))
  return {h: (float(np.mean([p for p, _ in v])), float(np.mean([s for _, s in v])))
          for h, v in sorted(acc.items())}


def monitor_curves(rows: Sequence[Dict[str, Any]], key: str) -> Tuple[List[int], List[float]]:
  """A training metric averaged over seeds per step."""
  per_step: Dict[int, List[float]] = {}
  for run in rows:
    for m in run["metrics"]:
      if isinstance(m.get(key), (int, float)):
        per_step.setdefault(int(m["step"]), []).append(float(m[key]))
  steps = sorted(per_step)
  return steps, [float(np.mean(per_step[s])) for s in steps]


def compare(table: Mapping[str, Mapping[str, Any]], a: str, b: str,
            metric: str = "after.pass@1") -> Dict[str, float]:
  """Difference of means a - b and its standard error (Welch) over seeds."""
  va, vb = (np.asarray(table[x]["per_seed"][metric]) for x in (a, b))
  se = np.sqrt((va.var(ddof=1) / len(va) if len(va) > 1 else 0.0)
               + (vb.var(ddof=1) / len(vb) if len(vb) > 1 else 0.0))
  return {"diff": float(va.mean() - vb.mean()), "se": float(se)}


def verdict(diff: float, se: float) -> str:
  """'held' when the difference is positive by more than two standard errors."""
  if se > 0 and diff > 2 * se:
    return "held"
  if se > 0 and diff < -2 * se:
    return "reversed"
  return "not shown (within noise)" if se > 0 else ("held (one seed)" if diff > 0 else
                                                    "not shown (one seed)")


def horizon_gain_slope(table_rows: Mapping[str, Sequence[Dict[str, Any]]], a: str, b: str
                       ) -> Tuple[Dict[int, float], float]:
  """pass@1 gain of a over b per horizon, and the least-squares slope of gain on horizon."""
  ha, hb = by_horizon(table_rows[a]), by_horizon(table_rows[b])
  gains = {h: ha[h][0] - hb[h][0] for h in ha if h in hb}
  hs = np.asarray(sorted(gains), np.float64)
  slope = float(np.polyfit(hs, [gains[h] for h in sorted(gains)], 1)[0]) if len(hs) > 1 else 0.0
  return gains, slope


# ------------------------------------------------------------------------- writing


def write_plots(runs: Mapping[str, Sequence[Dict[str, Any]]], out_dir: str) -> Dict[str, str]:
  """best_of_k.png, pass_by_horizon.png and training_monitors.png in `out_dir`."""
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
  return {
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


def _fmt(pair: Tuple[float, float]) -> str:
  return f"{pair[0]:.3f} ± {pair[1]:.3f}"


def write_report(root: str, runs: Mapping[str, Sequence[Dict[str, Any]]], out_dir: str,
                 command: str) -> str:
  """Writes results.md (and its PNGs) from finished runs; returns its path."""
  os.makedirs(out_dir, exist_ok=True)
  shared = os.path.join(root, "shared")
  base_config = _read_json(os.path.join(shared, "config.json"))
  sft, collect = (_read_json(os.path.join(shared, s, "result.json")) for s in ("sft", "collect"))
  # Run files write undefined metrics (e.g. AUROC of one class) as null: report them as nan.
  prm = {k: float("nan") if v is None else v
         for k, v in _read_json(os.path.join(shared, "prm", "result.json")).items()}
  agreement_path = os.path.join(shared, "collect", "agreement_by_k.json")
  agreement = _read_json(agreement_path) if os.path.exists(agreement_path) else {}
  any_run = next(iter(runs.values()))[0]
  run_config = _read_json(os.path.join(any_run["dir"], "config.json"))
  table = setting_table(runs)
  plots = write_plots(runs, out_dir)
  rl = run_config["rl"]
  seconds = sum(r["rl"].get("seconds", 0) for rows in runs.values() for r in rows)
  L = []
  L.append("# Replication on the synthetic suite: the paper's ablation at CPU scale\n")
  L.append(f"Produced by `{command}` (experiments/ablation.py). Every number below comes "
           "from that run's files; re-running the command rewrites this page.\n")
  L.append("## Setup\n")
  L.append(f"- Model: Qwen2-style decoder, hidden {base_config['model']['hidden_size']}, "
           f"{base_config['model']['num_hidden_layers']} layers; synthetic suite horizons "
           f"{base_config['data']['min_horizon']}-{base_config['data']['max_horizon']} "
           f"({base_config['data']['num_train']} train / {base_config['data']['num_eval']} "
           "held-out problems).")
  L.append(f"- One SFT policy ({base_config['sft']['steps']} steps, noise "
           f"{base_config['sft']['noise']}; held-out greedy pass@1 "
           f"{sft.get('eval_greedy_pass@1', float('nan')):.3f}) and one PRM shared by all runs.")
  L.append(f"- RL per run: {rl['steps']} steps x {rl['prompts_per_step']} prompts x "
           f"{rl['samples_per_prompt']} samples, policy lr {rl['policy_lr']}, value lr "
           f"{rl['value_lr']}, KL {rl['reward']['kl_coef']} ({rl['reward']['kl_estimator']}), "
           f"dense λ fail/pass {rl['reward']['dense_coef_fail']}/{rl['reward']['dense_coef_pass']}; "
           f"{len(next(iter(runs.values())))} seed(s) per setting (seeds vary only the RL stage).")
  L.append(f"- Evaluation: {run_config['eval']['num_samples']} samples per held-out problem at "
           f"temperature {run_config['eval']['temperature']} (pass@k by the unbiased "
           "estimator), plus greedy pass@1.")
  L.append(f"- RL wall time, all runs: {seconds / 60:.1f} min on this machine "
           f"(shared stages: sft {sft.get('seconds', 0):.0f} s, collect "
           f"{collect.get('seconds', 0):.0f} s, prm {prm.get('seconds', 0):.0f} s).\n")

  L.append("## Held-out pass@1 per setting (mean ± std over seeds)\n")
  ks = sorted({k.split("@")[1] for k in table[next(iter(table))]["per_seed"]
               if k.startswith("after.pass@")}, key=int)
  header = "| setting | seeds | SFT pass@1 | after RL pass@1 | " + " | ".join(
      f"pass@{k}" for k in ks if k != "1") + " | greedy before | greedy after |"
  L.append(header)
  L.append("|" + "---|" * (header.count("|") - 1))
  for setting, row in table.items():
    L.append(f"| {LABELS[setting]} | {row['n']} | {_fmt(row['before.pass@1'])} | "
             f"**{_fmt(row['after.pass@1'])}** | "
             + " | ".join(_fmt(row[f"after.pass@{k}"]) for k in ks if k != "1")
             + f" | {_fmt(row['before.greedy_pass@1'])} | {_fmt(row['after.greedy_pass@1'])} |")
  L.append("")

  L.append("## The paper's claims, here\n")
  claims = []
  def claim(text, a, b):
    if a in table and b in table:
      c = compare(table, a, b)
      claims.append((text, c, verdict(c["diff"], c["se"])))
  claim("Dense PRM rewards help (dense > none)", "dense", "none")
  claim("PRM value initialisation helps (value > none)", "value", "none")
  claim("Both together beat dense only", "both", "dense")
  claim("Both together beat value init only", "both", "value")
  claim("Both together beat no PRM", "both", "none")
  claim("Oracle dense rewards help (oracle > none): the upper bound", "oracle", "none")
  claim("The learned PRM's dense rewards reach the oracle's (dense - oracle)", "dense", "oracle")
  claim("PSGPO reaches the oracle's dense rewards (both - oracle)", "both", "oracle")
  L.append("| claim | difference in held-out pass@1 | standard error | verdict |")
  L.append("|---|---|---|---|")
  for text, c, v in claims:
    L.append(f"| {text} | {c['diff']:+.3f} | {c['se']:.3f} | {v} |")
  L.append("\nA claim 'held' when the mean difference over seeds exceeds two standard "
           "errors (Welch); 'within noise' otherwise.\n")
  for a in ("both", "oracle"):
    if a in runs and "none" in runs:
      gains, slope = horizon_gain_slope(runs, a, "none")
      L.append(f"**The gain grows with response length** ({LABELS[a]} - no PRM, pass@1 per "
               "horizon): " + ", ".join(f"h{h}: {g:+.3f}" for h, g in gains.items())
               + f"; least-squares slope {slope:+.4f} per line: "
               + ("held" if slope > 0 else "not shown") + " here.\n")

  L.append("## Plots\n")
  for name, path in plots.items():
    L.append(f"![{name}]({os.path.basename(path)})\n")

  L.append("## PRM quality and labels\n")
  L.append(f"- PRM on held-out labeled responses: AUROC {prm.get('auroc', float('nan')):.3f} "
           f"(at init {prm.get('init/auroc', float('nan')):.3f}, line position alone "
           f"{prm.get('position/auroc', float('nan')):.3f}), line accuracy "
           f"{prm.get('line_accuracy', float('nan')):.3f}, first-error accuracy "
           f"{prm.get('first_error_accuracy', float('nan')):.3f} against the binary-search "
           f"labels and {prm.get('oracle_first_error_accuracy', float('nan')):.3f} against the "
           f"suite's oracle; {prm.get('responses', 0)} held-out responses, "
           f"{prm.get('lines', 0)} lines.")
  L.append(f"- Binary-search labels: {collect.get('responses', 0)} responses (pass rate "
           f"{collect.get('pass_rate', float('nan')):.3f}), "
           f"{collect.get('completions_per_response', float('nan')):.1f} completions per "
           f"response vs {collect.get('linear_scan_completions', 0) / max(1, collect.get('responses', 1)):.1f} "
           f"for a linear scan; first-wrong-line agreement with the oracle "
           f"{collect.get('oracle_first_bad_agreement', float('nan')):.3f}, per-line "
           f"{collect.get('oracle_line_agreement', float('nan')):.3f}.")
  if agreement:
    L.append("- Agreement with the oracle's first wrong line by K (completions per probe): "
             + ", ".join(f"K={k}: {v:.3f}" for k, v in _agreement_items(agreement)) + ".")
  L.append("")
  L.append("## Reward-hacking monitors (last quarter of training, mean over seeds)\n")
  L.append("| setting | train pass rate | lines / response | trivial line share | mean PRM score | KL |")
  L.append("|---|---|---|---|---|---|")
  for setting, rows in runs.items():
    vals = []
    for key in ("final_pass_rate", "final_lines_per_response", "final_trivial_line_share",
                "final_prm_score_mean", "final_kl"):
      xs = [r["rl"][key] for r in rows if key in r["rl"]]
      vals.append(f"{np.mean(xs):.3f}" if xs else "-")
    L.append(f"| {LABELS[setting]} | " + " | ".join(vals) + " |")
  L.append("")
  path = os.path.join(out_dir, "results.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(L) + "\n")
  return path


def _agreement_items(agreement: Sequence[Mapping[str, Any]]) -> List[Tuple[int, float]]:
  """(K, first-wrong-line agreement) pairs from collect/agreement_by_k.json rows."""
  return [(int(row["k"]), float(row["first_bad_agreement"])) for row in agreement]


def collect_runs(root: str, plan: Sequence[Tuple[str, int]]) -> Dict[str, List[Dict[str, Any]]]:
  """Finished runs grouped by setting, in plan order."""
  runs: Dict[str, List[Dict[str, Any]]] = {}
  for setting, seed in plan:
    run_dir = os.path.join(root, setting, f"seed{seed}")
    run = read_run(run_dir)
    run["dir"] = run_dir
    runs.setdefault(setting, []).append(run)
  return runs


def main(argv) -> None:
  del argv
  if not any(a.startswith(("--verbosity", "-v=")) for a in sys.argv):
    logging.set_verbosity(logging.WARNING)
  root = os.path.abspath(_WORKDIR.value)
  seeds = [int(s) for s in _SEEDS.value.split(",") if s.strip()]
  arms = [a for a in _ARMS.value.split(",") if a.strip()]
  variants = [v for v in _VARIANTS.value.split(",") if v.strip()]
  plan = run_plan(arms, seeds, variants)
  run_all(_CONFIG.value, root, plan)
  command = "python -m experiments.ablation " + " ".join(sys.argv[1:])
  path = write_report(root, collect_runs(root, plan), os.path.abspath(_REPORT_DIR.value),
                      command)
  print(f"report: {path}")


if __name__ == "__main__":
  common.check_config_flags(sys.argv, __doc__)
  app.run(main)
