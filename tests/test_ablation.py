"""The ablation report's arithmetic: run plans, seed statistics and claim verdicts."""
import numpy as np
import pytest

from experiments import ablation, ablation_report


def test_run_plan_is_every_arm_times_seed_then_variants_once():
  plan = ablation.run_plan(["none", "both"], [3, 4], ["min_credit"])
  assert plan == [("none", 3), ("none", 4), ("both", 3), ("both", 4), ("min_credit", 3)]
  with pytest.raises(ValueError, match="Unknown arm 'nope'"):
    ablation.run_plan(["nope"], [0], [])
  with pytest.raises(ValueError, match="Unknown variant"):
    ablation.run_plan(["none"], [0], ["typo"])
  with pytest.raises(ValueError, match="--seeds is empty"):
    ablation.run_plan(["none"], [], [])


def test_setting_config_sets_switches_seed_and_only_rl_stages():
  from configs import ablation as ablation_config
  base = ablation_config.get_config("tiny")
  config = ablation.setting_config(base, "no_length_norm", 7, "/tmp/x")
  assert (config.rl.dense_reward, config.rl.value_init) == (True, "prm")
  assert config.rl.reward.normalize_by_lines is False and config.rl.seed == 7
  assert config.stages == "rl,eval" and base.rl.seed == -1        # the base is not changed
  none = ablation.setting_config(base, "none", 0, "/tmp/y")
  assert (none.rl.dense_reward, none.rl.value_init) == (False, "policy")


def _run(pass_at_1):
  return {"report": {"after": {"summary": {"all": {"pass@1": pass_at_1}}, "greedy_pass@1": 0.5},
                     "before": {"summary": {"all": {"pass@1": 0.1}}, "greedy_pass@1": 0.2}}}


def test_comparison_uses_welch_standard_error_and_two_sigma_verdicts():
  table = ablation_report.setting_table({"a": [_run(0.5), _run(0.6), _run(0.7)],
                                  "b": [_run(0.1), _run(0.2), _run(0.3)]})
  assert table["a"]["after.pass@1"] == pytest.approx((0.6, 0.1))
  c = ablation_report.compare(table, "a", "b")
  assert c["diff"] == pytest.approx(0.4)
  assert c["se"] == pytest.approx((0.01 / 3 + 0.01 / 3) ** 0.5)
  assert ablation_report.verdict(c["diff"], c["se"]) == "held"
  assert ablation_report.verdict(-c["diff"], c["se"]) == "reversed"
  assert ablation_report.verdict(0.01, 0.1) == "not shown (within noise)"


def _curve_run(points, by_horizon=()):
  run = _run(points[max(points)])
  run["metrics"] = [{"step": s - 1, "eval/updates": float(s), "eval/pass@1": v}
                    for s, v in points.items()] + [{"step": 3, "reward/kl": 0.1}]
  run["report"]["after"]["by_horizon"] = [{"lo": h, "hi": h + 1, "pass@1": p, "stderr": se}
                                          for h, p, se in by_horizon]
  return run


def test_learning_curve_mean_skips_the_initial_evaluation_and_enters_the_claims():
  a = [_curve_run({0: 0.1, 10: 0.5, 20: 0.7}), _curve_run({0: 0.1, 10: 0.3, 20: 0.5})]
  b = [_curve_run({0: 0.1, 10: 0.2, 20: 0.4}), _curve_run({0: 0.1, 10: 0.2, 20: 0.2})]
  table = ablation_report.setting_table({"a": a, "b": b})
  assert table["a"]["per_seed"]["curve.pass@1"] == pytest.approx([0.6, 0.4])
  assert table["b"]["curve.pass@1"][0] == pytest.approx(0.25)
  c = ablation_report.compare(table, "a", "b", "curve.pass@1")
  assert c["diff"] == pytest.approx(0.25)
  assert ablation_report.curve_over_seeds(a)[10] == pytest.approx((0.4, 0.1))
  # A run without evaluations during RL has no curve: the metric is left out, not faked.
  assert "curve.pass@1" not in ablation_report.setting_table({"c": [_run(0.5)]})["c"]["per_seed"]


def test_horizon_slope_is_least_squares_with_the_seed_variance_of_each_gain():
  # Gains 0.0 / 0.1 / 0.2 at horizons 2 / 3 / 4; seed spreads differ per horizon.
  a = [_curve_run({1: 0.0}, [(2, 0.50, 0.1), (3, 0.60, 0.1), (4, 0.75, 0.1)]),
       _curve_run({1: 0.0}, [(2, 0.50, 0.1), (3, 0.80, 0.1), (4, 0.65, 0.1)])]
  b = [_curve_run({1: 0.0}, [(2, 0.50, 0.1), (3, 0.60, 0.1), (4, 0.50, 0.1)]),
       _curve_run({1: 0.0}, [(2, 0.50, 0.1), (3, 0.60, 0.1), (4, 0.50, 0.1)])]
  gains, slope, se = ablation_report.horizon_gain_slope({"a": a, "b": b}, "a", "b")
  assert gains == pytest.approx({2: 0.0, 3: 0.1, 4: 0.2})
  assert slope == pytest.approx(np.polyfit([2, 3, 4], [0.0, 0.1, 0.2], 1)[0])
  # Weights (-1/2, 0, 1/2); var(g_4) = var of the mean of (0.75, 0.65) = 0.005 / 2, var(g_2) = 0.
  assert se == pytest.approx(np.sqrt(0.25 * 0.0025))
  assert ablation_report.verdict(slope, se) == "held"
