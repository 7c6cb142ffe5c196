"""The ablation report's arithmetic: run plans, seed statistics and claim verdicts."""
import pytest

from experiments import ablation


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
  table = ablation.setting_table({"a": [_run(0.5), _run(0.6), _run(0.7)],
                                  "b": [_run(0.1), _run(0.2), _run(0.3)]})
  assert table["a"]["after.pass@1"] == pytest.approx((0.6, 0.1))
  c = ablation.compare(table, "a", "b")
  assert c["diff"] == pytest.approx(0.4)
  assert c["se"] == pytest.approx((0.01 / 3 + 0.01 / 3) ** 0.5)
  assert ablation.verdict(c["diff"], c["se"]) == "held"
  assert ablation.verdict(-c["diff"], c["se"]) == "reversed"
  assert ablation.verdict(0.01, 0.1) == "not shown (within noise)"
