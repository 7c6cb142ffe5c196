"""The ablation report's arithmetic: run plans, seed statistics and claim verdicts."""
import json

import numpy as np
import pytest

from experiments import ablation, ablation_report, ablation_stats


def test_run_plan_is_every_arm_times_seed_then_variants_once():
  plan = ablation.run_plan(["none", "both"], [3, 4], ["min_credit"])
  assert plan == [("none", 3), ("none", 4), ("both", 3), ("both", 4), ("min_credit", 3)]
  assert ablation.run_plan(["none"], [3, 4], ["dense_sum"], [0, 1])[-2:] == [
      ("dense_sum", 0), ("dense_sum", 1)]
  with pytest.raises(ValueError, match="Unknown arm 'nope'"):
    ablation.run_plan(["nope"], [0], [])
  with pytest.raises(ValueError, match="Unknown variant"):
    ablation.run_plan(["none"], [0], ["typo"])
  with pytest.raises(ValueError, match="--seeds is empty"):
    ablation.run_plan(["none"], [], [])


def test_setting_config_sets_switches_seed_and_only_rl_stages():
  from configs import ablation as ablation_config
  base = ablation_config.get_config("tiny")
  assert (base.rl.reward.credit, base.rl.reward.normalize_by_lines) == ("first_error", False)
  config = ablation.setting_config(base, "dense_sum", 7, "/tmp/x")
  assert (config.rl.dense_reward, config.rl.value_init) == (True, "policy")
  assert (config.rl.reward.shaping, config.rl.reward.normalize_by_lines) == ("none", True)
  assert config.rl.seed == 7 and config.stages == "rl,eval"
  assert (config.rl.reward.credit, config.rl.reward.dense_coef_fail) == ("sum", 1.0)
  assert base.rl.seed == -1 and base.rl.reward.credit == "first_error"  # base unchanged
  progress = ablation.setting_config(base, "oracle_progress", 1, "/tmp/p")
  assert (progress.rl.dense_source, progress.rl.reward.shaping) == ("oracle", "progress")
  min_credit = ablation.setting_config(base, "min_credit", 3, "/tmp/z")
  assert min_credit.rl.reward.credit == "min" and min_credit.rl.value_init == "prm"
  assert min_credit.rl.reward.shaping == "none"
  none = ablation.setting_config(base, "none", 0, "/tmp/y")
  assert (none.rl.dense_reward, none.rl.value_init) == (False, "policy")


def _run(pass_at_1):
  return {"report": {"after": {"summary": {"all": {"pass@1": pass_at_1}}, "greedy_pass@1": 0.5},
                     "before": {"summary": {"all": {"pass@1": 0.1}}, "greedy_pass@1": 0.2}}}


def test_comparison_uses_welch_standard_error_and_two_sigma_verdicts():
  table = ablation_stats.setting_table({"a": [_run(0.5), _run(0.6), _run(0.7)],
                                  "b": [_run(0.1), _run(0.2), _run(0.3)]})
  assert table["a"]["after.pass@1"] == pytest.approx((0.6, 0.1))
  c = ablation_stats.compare(table, "a", "b")
  assert c["diff"] == pytest.approx(0.4)
  assert c["se"] == pytest.approx((0.01 / 3 + 0.01 / 3) ** 0.5)
  assert ablation_stats.verdict(c["diff"], c["se"]) == "held"
  assert ablation_stats.verdict(-c["diff"], c["se"]) == "reversed"
  assert ablation_stats.verdict(0.01, 0.1) == "not shown (within noise)"


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
  table = ablation_stats.setting_table({"a": a, "b": b})
  assert table["a"]["per_seed"]["curve.pass@1"] == pytest.approx([0.6, 0.4])
  assert table["b"]["curve.pass@1"][0] == pytest.approx(0.25)
  c = ablation_stats.compare(table, "a", "b", "curve.pass@1")
  assert c["diff"] == pytest.approx(0.25)
  assert ablation_stats.curve_over_seeds(a)[10] == pytest.approx((0.4, 0.1))
  # A run without evaluations during RL has no curve: the metric is left out, not faked.
  assert "curve.pass@1" not in ablation_stats.setting_table({"c": [_run(0.5)]})["c"]["per_seed"]


def test_horizon_slope_is_least_squares_with_the_seed_variance_of_each_gain():
  # Gains 0.0 / 0.1 / 0.2 at horizons 2 / 3 / 4; seed spreads differ per horizon.
  a = [_curve_run({1: 0.0}, [(2, 0.50, 0.1), (3, 0.60, 0.1), (4, 0.75, 0.1)]),
       _curve_run({1: 0.0}, [(2, 0.50, 0.1), (3, 0.80, 0.1), (4, 0.65, 0.1)])]
  b = [_curve_run({1: 0.0}, [(2, 0.50, 0.1), (3, 0.60, 0.1), (4, 0.50, 0.1)]),
       _curve_run({1: 0.0}, [(2, 0.50, 0.1), (3, 0.60, 0.1), (4, 0.50, 0.1)])]
  gains, slope, se = ablation_stats.horizon_gain_slope({"a": a, "b": b}, "a", "b")
  assert gains == pytest.approx({2: 0.0, 3: 0.1, 4: 0.2})
  assert slope == pytest.approx(np.polyfit([2, 3, 4], [0.0, 0.1, 0.2], 1)[0])
  # Weights (-1/2, 0, 1/2); var(g_4) = var of the mean of (0.75, 0.65) = 0.005 / 2, var(g_2) = 0.
  assert se == pytest.approx(np.sqrt(0.25 * 0.0025))
  assert ablation_stats.verdict(slope, se) == "held"


def test_steps_to_threshold_counts_updates_and_bounds_seeds_that_never_reach_it():
  fast = _curve_run({0: 0.2, 10: 0.6, 20: 0.8, 30: 0.8})
  slow = _curve_run({0: 0.2, 10: 0.3, 20: 0.5, 30: 0.7})
  never = _curve_run({0: 0.2, 10: 0.3, 20: 0.4, 30: 0.5})
  assert ablation_stats.first_reaching({0: 0.9, 10: 0.5, 20: 0.7}, 0.7) == 20  # 0 updates skipped
  assert ablation_stats.first_reaching({0: 0.2, 10: 0.5}, 0.7) is None
  mean, se, reached = ablation_stats.steps_to_threshold([fast, slow, never], 0.7)
  assert (mean, reached) == (pytest.approx((20 + 30 + 30) / 3), 2)
  assert se == pytest.approx(np.std([20, 30, 30], ddof=1) / np.sqrt(3))
  # SFT 0.2 (every run's curve at 0), reference's last point 0.8 / 0.7: 0.2 + 0.5 * 0.55.
  runs = {"none": [fast, slow], "other": [never]}
  assert ablation_stats.curve_threshold(runs, "none", 0.5) == pytest.approx(0.2 + 0.5 * 0.55)


def test_plateau_gain_is_the_last_third_minus_the_middle_third_over_seeds():
  rising = _curve_run({0: 0.0, 10: 0.1, 20: 0.2, 30: 0.3, 40: 0.4, 50: 0.5, 60: 0.6})
  flat = _curve_run({0: 0.0, 10: 0.5, 20: 0.6, 30: 0.7, 40: 0.7, 50: 0.7, 60: 0.7})
  gain, se = ablation_stats.plateau_gain([rising, rising])
  assert (gain, se) == (pytest.approx(0.2), pytest.approx(0.0))
  gain, se = ablation_stats.plateau_gain([flat, rising])
  assert gain == pytest.approx(0.1) and se == pytest.approx(0.1)


def test_problems_are_classed_by_the_sft_pass_count_and_scored_per_class():
  rows = ([{"task_id": "a", "passed": False, "horizon": 9}] * 16
          + [{"task_id": "b", "passed": i < 2, "horizon": 7} for i in range(16)]
          + [{"task_id": "c", "passed": i < 3, "horizon": 5} for i in range(16)]
          + [{"task_id": "d", "passed": True, "horizon": 2}] * 16)
  sft = ablation_stats.problem_pass_counts(rows)
  assert sft["b"] == {"passed": 2, "samples": 16, "horizon": 7}
  assert [ablation_stats.difficulty(sft[t]["passed"], 16) for t in "abcd"] == [
      "never", "rare", "some", "always"]
  assert ablation_stats.difficulty(9, 16) == "most" and ablation_stats.difficulty(8, 16) == "some"
  after = {t: {"passed": p, "samples": 16, "horizon": 0}
           for t, p in {"a": 4, "b": 8, "c": 16, "d": 16}.items()}
  classes = ablation_stats.pass_by_difficulty(sft, [after, sft])
  assert set(classes) == {"never", "rare", "some", "always"}             # no "most" problem
  assert classes["rare"]["problems"] == 1 and classes["rare"]["share"] == 0.25
  assert classes["rare"]["sft"] == pytest.approx(2 / 16)
  assert classes["never"]["per_seed"] == pytest.approx([4 / 16, 0.0])
  assert classes["never"]["horizon"] == 9.0


def _shared(auroc, seconds):
  return {"config": {"seed": 0}, "agreement_by_k": [],
          "results": {"sft": {"eval_greedy_pass@1": 0.424, "seconds": seconds},
                      "collect": {"responses": 768, "search_seconds": seconds,
                                  "seconds_per_response": seconds / 768,
                                  "labels_dir": "/somewhere/else/collect"},
                      "prm": {"auroc": auroc, "seconds": seconds}}}


def test_shared_record_is_written_once_and_later_stages_must_match_it(tmp_path):
  from experiments import ablation_records as records
  records.check_shared(str(tmp_path), _shared(0.875, 100.0))
  assert (tmp_path / "shared.json").exists()
  # Another machine's wall clock and paths are not the outcome: accepted.
  records.check_shared(str(tmp_path), _shared(0.875 * (1 + 1e-9), 250.0))
  # Another PRM is: refused, naming the field and what to do.
  with pytest.raises(ValueError, match=r"prm.auroc: 0.875 recorded vs 0.8 now.*--record_dir"):
    records.check_shared(str(tmp_path), _shared(0.8, 100.0))
  assert records.fingerprint(_shared(0.875, 1.0)) == {
      "sft": {"eval_greedy_pass@1": 0.424}, "collect": {"responses": 768},
      "prm": {"auroc": 0.875}}


def _finished_shared_dir(root):
  """A shared dir as the stages leave it: checkpoints and label shards beside what the
  runs read."""
  files = {"config.json": json.dumps({"workdir": str(root), "seed": 0}),
           "tokenizer/tokenizer.json": "{}",
           "sft/policy/model.safetensors": "sft weights", "sft/result.json": "{}",
           "sft/checkpoints/1000/state": "optimizer", "collect/result.json": "{}",
           "collect/agreement_by_k.json": "[]", "collect/labels_00000.jsonl": "labels",
           "prm/model/model.safetensors": "prm weights", "prm/result.json": "{}"}
  for name, text in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text)
  return root


def _tree(root):
  return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*"))
          if p.is_file()}


def test_shared_outputs_are_recorded_once_and_restored_where_the_stages_did_not_run(tmp_path):
  from experiments import ablation_records as records
  shared = _finished_shared_dir(tmp_path / "shared")
  record_dir = tmp_path / "records"
  assert records.save_shared(str(shared), str(record_dir))
  saved = _tree(record_dir / "shared")
  # What the runs and the report read, not the checkpoints or the label shards.
  assert sorted(saved) == ["collect/agreement_by_k.json", "collect/result.json",
                           "config.json", "prm/model/model.safetensors", "prm/result.json",
                           "sft/policy/model.safetensors", "sft/result.json",
                           "tokenizer/tokenizer.json"]
  # Committed: the machine's paths are written relative to the shared dir.
  assert json.loads(saved["config.json"]) == {"workdir": ".", "seed": 0}
  (shared / "prm/model/model.safetensors").write_text("retrained elsewhere")
  assert not records.save_shared(str(shared), str(record_dir))     # recorded once
  assert _tree(record_dir / "shared") == saved
  # A new checkout: the recorded outputs come back, exactly.
  fresh = tmp_path / "fresh"
  assert records.restore_shared(str(record_dir), str(fresh))
  assert _tree(fresh) == saved
  # Finished stages are left alone, and a record cut short (no PRM result) restores nothing.
  assert not records.restore_shared(str(record_dir), str(shared))
  assert (shared / "prm/model/model.safetensors").read_text() == "retrained elsewhere"
  (record_dir / "shared/prm/result.json").unlink()
  assert not records.restore_shared(str(record_dir), str(tmp_path / "other"))
  assert not (tmp_path / "other").exists()


def test_report_gives_the_prms_pick_within_a_prompt_beside_its_baselines():
  from experiments import ablation_report
  prm = {"responses/pick_prompts": 34, "responses/pick_passing": 0.588,
         "responses_position/pick_passing": 0.390, "responses/pick_random": 0.382}
  (line,) = ablation_report._pick_lines(prm)  # pylint: disable=protected-access
  assert "34 held-out prompts" in line
  assert "passes in 0.588" in line and "alone 0.390" in line and "random pick 0.382" in line
  # A PRM stage without mixed prompts (or from before the metric) has no such line.
  assert ablation_report._pick_lines({"responses/pick_prompts": 0}) == []  # pylint: disable=protected-access
  assert ablation_report._pick_lines({}) == []  # pylint: disable=protected-access


def test_claims_table_compares_the_largest_pass_at_k_too():
  """A sharper policy can win pass@1 and lose pass@16: the claims table says both."""
  def run(pass1, pass16):
    r = _run(pass1)
    r["report"]["after"]["summary"]["all"]["pass@16"] = pass16
    r["report"]["before"]["summary"]["all"]["pass@16"] = 0.6
    return r
  runs = {"none": [run(0.40, 0.80), run(0.42, 0.82), run(0.41, 0.81)],
          "value": [run(0.48, 0.70), run(0.50, 0.72), run(0.49, 0.71)]}
  lines = ablation_report._claim_lines(ablation_stats.setting_table(runs), runs)
  assert "final pass@16: difference ± se" in lines[1]
  row = next(line for line in lines if line.startswith("| PRM value initialisation helps"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[1].startswith("+0.080") and cells[2] == "held"
  assert cells[5].startswith("-0.100") and cells[6] == "reversed"
  assert len(cells) == 7 and lines[2].count("---") == 7
