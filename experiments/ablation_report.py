"""The ablation's report: the paper's claims with their standard errors, learning speed,
pass@1 by problem difficulty, the plots, and `results.md` (experiments/ablation.py calls
`write_report`; the statistics are experiments/ablation_stats.py's).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from experiments.ablation_stats import (CURVE_METRIC, DIFFICULTY, by_horizon, compare,
                                        curve_over_seeds, curve_threshold, horizon_gain_slope,
                                        learning_curve, mean_curve, mean_series,
                                        pass_by_difficulty, plateau_gain, setting_table,
                                        steps_to_threshold, verdict)

LABELS = {"none": "no PRM", "dense": "dense reward only", "value": "value init only",
          "both": "both (PSGPO)", "oracle": "oracle dense reward",
          "dense_sum": "dense reward only, summed scores",
          "oracle_progress": "oracle dense reward as progress",
          "min_credit": "both, summed scores, min-form credit"}
CLAIMS = (("Dense PRM rewards help (dense > none)", "dense", "none"),
          ("PRM value initialisation helps (value > none)", "value", "none"),
          ("Both together beat dense only", "both", "dense"),
          ("Both together beat value init only", "both", "value"),
          ("Both together beat no PRM", "both", "none"),
          ("Oracle dense rewards help (oracle > none): the upper bound", "oracle", "none"),
          ("Summed PRM scores are farmed (dense_sum - none)", "dense_sum", "none"),
          ("First-error credit beats summed scores (dense - dense_sum)", "dense", "dense_sum"),
          ("The oracle's first-error credit beats its progress (oracle - oracle_progress)",
           "oracle", "oracle_progress"),
          ("The learned PRM's dense rewards reach the oracle's (dense - oracle)", "dense", "oracle"),
          ("PSGPO reaches the oracle's dense rewards (both - oracle)", "both", "oracle"))


# ------------------------------------------------------------------------- plots


def write_plots(runs: Mapping[str, Sequence[Dict[str, Any]]], out_dir: str) -> Dict[str, str]:
  """learning_curves.png, best_of_k.png, pass_by_horizon.png and training_monitors.png."""
  from psgpo_jax import plots  # pylint: disable=import-outside-toplevel
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
      "learning_curves": plots.plot_learning_curves(
          {k: v for k, v in learning.items() if v},
          os.path.join(out_dir, "learning_curves.png"),
          title="held-out pass@1 during RL (mean ± se over seeds)"),
      "best_of_k": plots.plot_best_of_k(
          curves, os.path.join(out_dir, "best_of_k.png"),
          title="Best-of-K on held-out problems (mean over seeds)"),
      "by_horizon": plots.plot_pass_by_length(
          horizons, os.path.join(out_dir, "pass_by_horizon.png"),
          xlabel="horizon (solution lines)", title="pass@1 by horizon (mean over seeds)"),
      "monitors": plots.plot_panels(
          {LABELS[s]: mean_series([plots.training_series(r["metrics"]) for r in rows])
           for s, rows in runs.items()},
          plots.training_panels(), os.path.join(out_dir, "training_monitors.png"))}


# ------------------------------------------------------------------------- results.md


def _fmt(pair: Tuple[float, float]) -> str:
  return f"{pair[0]:.3f} ± {pair[1]:.3f}"


def _nan_for_null(result: Mapping[str, Any]) -> Dict[str, Any]:
  """Run files write undefined metrics (e.g. AUROC of one class) as null: read them as nan."""
  return {k: float("nan") if v is None else v for k, v in result.items()}


def _run_configs(runs) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """The config of the first run, and of the first run with dense rewards (its λ apply)."""
  configs = [r["config"] for rows in runs.values() for r in rows]
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
      f"dense λ fail/pass {reward['dense_coef_fail']}/{reward['dense_coef_pass']}, "
      f"shaping {reward['shaping']} (baseline {reward['shaping_baseline']}), "
      f"normalised by lines: {reward['normalize_by_lines']} (the settings with dense "
      "rewards; the variants change this as their labels say); "
      f"{len(next(iter(runs.values())))} seed(s) per setting (seeds vary only the RL stage).",
      f"- Evaluation: {run_config['eval']['num_samples']} samples per held-out problem at "
      f"temperature {run_config['eval']['temperature']} after RL (pass@k by the unbiased "
      f"estimator), plus greedy pass@1; during RL, held-out pass@1 every "
      f"{rl['eval_every']} updates with {rl['eval_samples']} samples per problem (the "
      "learning curve).",
      f"- RL wall time, all runs: {seconds / 60:.1f} min on this machine "
      f"(shared stages: sft {sft.get('seconds', 0):.0f} s, collect "
      f"{collect.get('seconds', 0):.0f} s, prm {prm.get('seconds', 0):.0f} s).\n"]


def _pass_at_ks(table) -> List[int]:
  """The k of every held-out pass@k after RL in the table, ascending: [1, 2, ..., 16]."""
  return sorted({int(k.split("@")[1]) for k in table[next(iter(table))]["per_seed"]
                 if k.startswith("after.pass@")})


def _setting_lines(table, runs) -> List[str]:
  ks = _pass_at_ks(table)
  header = ("| setting | seeds | SFT pass@1 | learning-curve pass@1 | after RL pass@1 | "
            + " | ".join(f"pass@{k}" for k in ks if k != 1)
            + " | greedy before | greedy after |")
  out = ["## Held-out pass@1 per setting (mean ± std over seeds)\n", header,
         "|" + "---|" * (header.count("|") - 1)]
  for setting, row in table.items():
    curve = _fmt(row[CURVE_METRIC]) if CURVE_METRIC in row else "-"
    out.append(f"| {LABELS[setting]} | {row['n']} | {_fmt(row['before.pass@1'])} | "
               f"**{curve}** | **{_fmt(row['after.pass@1'])}** | "
               + " | ".join(_fmt(row[f"after.pass@{k}"]) for k in ks if k != 1)
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
  top_k = _pass_at_ks(table)[-1]
  metrics = ("after.pass@1", CURVE_METRIC) + ((f"after.pass@{top_k}",) if top_k > 1 else ())
  out = ["## The paper's claims, here\n",
         "| claim | final pass@1: difference ± se | verdict | learning-curve pass@1: "
         "difference ± se | verdict |"
         + (f" final pass@{top_k}: difference ± se | verdict |" if top_k > 1 else ""),
         "|" + "---|" * (1 + 2 * len(metrics))]
  for text, a, b in CLAIMS:
    if a not in table or b not in table:
      continue
    cells = []
    for metric in metrics:
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
             "setting learns. The final pass@1 is where it ends; the final pass@k of "
             "the most samples, how many problems it still solves at all (what a "
             "sharper policy can lose).\n")
  out.append("**Does the gain grow with the horizon?** Final pass@1 gain over no PRM per "
             "horizon, and the least-squares slope of gain on horizon (± its standard "
             "error from the seed variances):\n")
  for a in ("dense", "both", "oracle"):
    if a in runs and "none" in runs:
      gains, slope, se = horizon_gain_slope(runs, a, "none")
      out.append(f"- {LABELS[a]} - no PRM: " + ", ".join(f"h{h} {g:+.3f}" for h, g in gains.items())
                 + f"; slope {slope:+.4f} ± {se:.4f} per line: {verdict(slope, se)}.")
  return out + [""]


def _speed_lines(runs) -> List[str]:
  """Updates to a threshold and whether each curve still rose at the end."""
  if "none" not in runs or not all(len(learning_curve(r.get("metrics", []))) > 1
                                   for rows in runs.values() for r in rows):
    return []
  threshold = curve_threshold(runs, "none")
  speed = {s: steps_to_threshold(rows, threshold) for s, rows in runs.items()}
  out = ["## How fast each setting learns, and whether it plateaued\n",
         f"Updates until held-out pass@1 first reached {threshold:.3f} (the SFT policy's "
         "pass@1 plus 80% of the no-PRM setting's gain at its last evaluation; a seed that "
         "never reached it counts with its last evaluation's updates, so its mean is a lower "
         "bound), and how much the curve still rose at the end (mean pass@1 over the last "
         "third of the evaluations minus the middle third; 'plateaued' when not above two "
         "standard errors):\n",
         "| setting | updates to threshold | seeds that reached it | fewer updates than no PRM "
         "± se | verdict | rise over the last third ± se | curve |",
         "|---|---|---|---|---|---|---|"]
  for setting, rows in runs.items():
    mean, se, reached = speed[setting]
    base_mean, base_se, _ = speed["none"]
    diff, diff_se = base_mean - mean, float(np.hypot(se, base_se))
    rise, rise_se = plateau_gain(rows)
    state = "still rising" if verdict(rise, rise_se) == "held" else "plateaued"
    cells = ["-", "-"] if setting == "none" else [f"{diff:+.1f} ± {diff_se:.1f}",
                                                  verdict(diff, diff_se)]
    out.append(f"| {LABELS[setting]} | {mean:.1f} ± {se:.1f} | {reached} of {len(rows)} | "
               + " | ".join(cells) + f" | {rise:+.3f} ± {rise_se:.3f} | {state} |")
  return out + [""]


def _difficulty_lines(runs) -> List[str]:
  """pass@1 after RL on the problems of each SFT difficulty class, per setting."""
  sft = next((r["problems"]["before"] for rows in runs.values() for r in rows
              if r.get("problems", {}).get("before")), None)
  if not sft:
    return []
  n = next(iter(sft.values()))["samples"]
  classes = {s: pass_by_difficulty(sft, [r["problems"]["after"] for r in rows])
             for s, rows in runs.items()}
  names = {"never": "never (0)", "rare": f"rare (1-{n // 8})",
           "some": f"some ({n // 8 + 1}-{n // 2})", "most": f"most ({n // 2 + 1}-{n - 1})",
           "always": f"always ({n})"}
  first = next(iter(classes.values()))
  hard = sum(first[c]["share"] for c in ("never", "rare") if c in first)
  out = ["## Where RL gains: pass@1 by the SFT policy's difficulty of each problem\n",
         f"Each held-out problem is classed by how many of the SFT policy's {n} samples "
         f"passed. {hard:.0%} of the problems are 'never' or 'rare' (pass rate about 0, "
         "and for 'rare' pass@16 > 0: RL has a signal to find there). Cells: pass@1 on the "
         "class's problems after RL, mean ± se over seeds.\n",
         "| SFT passes (of %d) | problems | mean horizon | SFT pass@1 | " % n
         + " | ".join(LABELS[s] for s in classes) + " |",
         "|" + "---|" * (4 + len(classes))]
  for name in DIFFICULTY:
    if name not in first:
      continue
    row = first[name]
    cells = []
    for setting in classes:
      seeds = classes[setting][name]["per_seed"]
      se = np.std(seeds, ddof=1) / np.sqrt(len(seeds)) if len(seeds) > 1 else 0.0
      cells.append(f"{np.mean(seeds):.3f} ± {se:.3f}" if seeds else "-")
    out.append(f"| {names[name]} | {row['problems']} | {row['horizon']:.1f} | "
               f"{row['sft']:.3f} | " + " | ".join(cells) + " |")
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
         f"{prm.get('lines', 0)} lines (line position alone: line accuracy "
         f"{prm.get('position/line_accuracy', float('nan')):.3f}, first-error accuracy "
         f"{prm.get('position/first_error_accuracy', float('nan')):.3f}).",
         *_pick_lines(prm),
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


def _pick_lines(prm) -> List[str]:
  """The PRM's pick among each held-out prompt's responses (prm/metrics.within_prompt_pick),
  the line credit dense rewards need: a score that also tells hard prompts from easy ones
  can reach a high AUROC and still rank a prompt's own responses at random."""
  prompts = int(prm.get("responses/pick_prompts", 0) or 0)
  if not prompts:
    return []
  return [f"- Within a prompt: on the {prompts} held-out prompts whose responses both pass "
          f"and fail, the response with the PRM's highest weakest-line score passes in "
          f"{prm.get('responses/pick_passing', float('nan')):.3f} of them (line position "
          f"alone {prm.get('responses_position/pick_passing', float('nan')):.3f}, a random "
          f"pick {prm.get('responses/pick_random', float('nan')):.3f})."]


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


def write_report(shared: Mapping[str, Any], runs: Mapping[str, Sequence[Dict[str, Any]]],
                 out_dir: str, command: str, left_out: Sequence[str] = ()) -> str:
  """Writes results.md (and its PNGs) from the shared stages' record and the finished
  runs' records (experiments/ablation_records.py); returns its path. `left_out` names the
  planned runs without a record ('<setting>/seed<k>'): the report says it is partial."""
  os.makedirs(out_dir, exist_ok=True)
  base_config, results = shared["config"], shared["results"]
  sft, collect, prm = results["sft"], results["collect"], _nan_for_null(results["prm"])
  agreement = shared.get("agreement_by_k", [])
  table = setting_table(runs)
  plots = write_plots(runs, out_dir)
  lines = ["# Replication on the synthetic suite: the paper's ablation at CPU scale\n",
           f"Produced by `{command}` (experiments/ablation.py). Every number below comes "
           "from the runs' records (experiments/ablation_records.py), committed next to "
           "this page; re-running the command rewrites it.\n"]
  if left_out:
    lines += [f"**A report so far**: {len(left_out)} planned run(s) have no record yet "
              f"({', '.join(left_out)}); the command without `--report_only` trains them "
              "and rewrites this page.\n"]
  lines += _setup_lines(base_config, sft, collect, prm, runs)
  lines += _setting_lines(table, runs)
  lines += _claim_lines(table, runs)
  lines += _speed_lines(runs)
  lines += _difficulty_lines(runs)
  lines += ["## Plots\n"] + [f"![{name}]({os.path.basename(p)})\n" for name, p in plots.items()]
  lines += _prm_lines(collect, prm, agreement)
  lines += _monitor_lines(runs)
  path = os.path.join(out_dir, "results.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return path
