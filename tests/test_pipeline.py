"""End to end: `python -m experiments.train` runs every stage, leaves logs, checkpoints
and plots, and a re-run continues instead of starting over."""
import filecmp
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["sft", "baseline", "collect", "prm", "rl", "eval"]


_ENV = {}       # the session's `subprocess_env`, set by `tiny_run` (every test here uses it)


def _env():
  return dict(_ENV) or {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def _run(module, *args, timeout=1500):
  out = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, subprocess_env):
  _ENV.update(subprocess_env)
  workdir = str(tmp_path_factory.mktemp("quickstart_tiny"))
  stdout = _run("experiments.train", "--config", "configs/quickstart.py:tiny",
                f"--config.workdir={workdir}")
  return workdir, stdout


def test_every_stage_runs_and_reports(tiny_run):
  workdir, stdout = tiny_run
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert list(summary) == STAGES
  for label in ("before", "after"):
    assert 0.0 <= summary["eval"][f"{label}.pass@1"] <= 1.0
    # Best-of-2 by the PRM's pick: at most the oracle's pick (pass@2).
    assert 0.0 <= summary["eval"][f"{label}.prm_best_of_2"] <= summary["eval"][f"{label}.pass@2"]
  assert summary["collect"]["responses"] == 16            # 8 prompts x 2 responses
  assert summary["prm"]["steps"] == 5
  # Also measured on every response of the held-out prompts, selected or not.
  assert summary["prm"]["responses/rows"] >= summary["prm"]["eval_rows"]
  assert {"responses/auroc", "responses_position/auroc"} <= set(summary["prm"])
  assert "after.pass@1" in stdout                         # the printed summary table


def _strict(name):
  raise ValueError(f"{name} is not strict JSON")


def test_every_json_file_a_run_writes_is_strict_json(tiny_run):
  """summary, results, stats, reports, configs, label shards, eval samples and metric rows:
  no NaN or Infinity words, which strict JSON readers reject (checkpoint internals and
  the tokenizer's files are not the run's own)."""
  workdir, _ = tiny_run
  paths = [p for p in glob.glob(os.path.join(workdir, "**", "*.json*"), recursive=True)
           if p.endswith((".json", ".jsonl")) and "checkpoints" not in p
           and "tokenizer" not in p and "policy" not in p and "model" not in p]
  assert {os.path.basename(p) for p in paths} >= {"summary.json", "result.json",
                                                  "metrics.jsonl", "samples_after.jsonl"}
  assert any(os.path.basename(p).startswith("labels-") for p in paths)
  for path in paths:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    for part in (text.splitlines() if path.endswith(".jsonl") else [text]):
      json.loads(part, parse_constant=_strict)


def test_eval_figures_are_those_of_its_samples_rescored_independently(tiny_run):
  """Every eval sample, run again in a fresh sandbox against its problem's tests, gets
  the verdict the run recorded, and pass@1 / pass@2 follow from those verdicts by the
  unbiased estimator written out here (not the library's)."""
  from math import comb  # pylint: disable=import-outside-toplevel
  from experiments.common import load_config  # pylint: disable=import-outside-toplevel
  from psgpo_jax import run_setup  # pylint: disable=import-outside-toplevel
  from psgpo_jax.sandbox import run_many  # pylint: disable=import-outside-toplevel
  workdir, _ = tiny_run
  config = load_config(os.path.join(ROOT, "configs", "quickstart.py:tiny"))
  problems = {p.id: p for p in run_setup.load_run_problems(config)["eval"]}
  summary = json.load(open(os.path.join(workdir, "summary.json")))["eval"]
  for label in ("before", "after"):
    samples = [json.loads(l) for l in open(os.path.join(workdir, "eval",
                                                        f"samples_{label}.jsonl"))]
    assert len(samples) == 8 * 2 and {s["task_id"] for s in samples} == set(problems)
    results = run_many([(problems[s["task_id"]].program(s["completion"]),
                         problems[s["task_id"]].tests) for s in samples])
    assert [r.passed for r in results] == [s["passed"] for s in samples]
    correct = {}
    for s in samples:
      correct.setdefault(s["task_id"], []).append(s["passed"])
    for k in (1, 2):
      want = np.mean([1 - comb(len(c) - sum(c), k) / comb(len(c), k) for c in correct.values()])
      assert summary[f"{label}.pass@{k}"] == pytest.approx(want), (label, k)


def test_run_directory_holds_logs_checkpoints_models_and_plots(tiny_run):
  workdir, _ = tiny_run
  assert glob.glob(os.path.join(workdir, "rl", "events.out.tfevents.*"))
  rows = [json.loads(l) for l in open(os.path.join(workdir, "rl", "metrics.jsonl"))]
  # Step -1: the learning curve's first point (the initial policy), then one row per step.
  assert [r["step"] for r in rows] == [-1, 0, 1]
  for key in ("reward/pass_rate", "reward/lines_per_response", "reward/trivial_line_share",
              "reward/prm_score_mean", "ppo/policy_loss", "rollout/hack_flags",
              "time/learn_s"):
    assert key in rows[-1], key
  assert "reward/pass_rate" not in rows[0]
  # Held-out evaluation every rl.eval_every (= 1) updates, placed by the number of updates.
  assert [r["eval/updates"] for r in rows] == [0, 1, 2]
  assert all("eval/greedy_pass@1" in r for r in rows)
  assert sorted(os.listdir(os.path.join(workdir, "rl", "checkpoints"))) == ["1", "2"]
  for model in ("sft/policy", "prm/model", "rl/policy", "rl/value"):
    assert os.path.exists(os.path.join(workdir, model, "config.json")), model
  for png in ("eval/best_of_k.png", "eval/pass_by_horizon.png", "rl/training.png",
              "prm/calibration.png"):
    assert os.path.getsize(os.path.join(workdir, png)) > 1000, png
  assert glob.glob(os.path.join(workdir, "collect", "labels-*.jsonl"))


def test_rerun_skips_finished_stages_and_evaluate_cli_writes_report(tiny_run):
  workdir, _ = tiny_run
  stdout = _run("experiments.train", "--config", "configs/quickstart.py:tiny",
                f"--config.workdir={workdir}")
  assert stdout.count("skipped") == len(STAGES)
  out_dir = os.path.join(workdir, "evaluate_cli")
  _run("experiments.evaluate", "--config", "configs/quickstart.py:tiny",
       f"--config.workdir={workdir}", f"--config.eval.output_dir={out_dir}")
  report = json.load(open(os.path.join(out_dir, "report.json")))
  assert report["checkpoint"].endswith(os.path.join("rl", "policy"))
  samples = [json.loads(l) for l in open(os.path.join(out_dir, "samples.jsonl"))]
  assert len(samples) == 8 * 2 and {"task_id", "completion", "passed"} <= set(samples[0])


def test_rl_resumed_after_a_crash_logs_each_step_once(tiny_run, tmp_path):
  """A crash after step 2's metrics were written but before its checkpoint: the re-run
  resumes from checkpoint 1, redoes step 1 and logs it once (the torn line is dropped)."""
  import shutil  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / "run")
  shutil.copytree(tiny_run[0], workdir, symlinks=True)
  rl_dir = os.path.join(workdir, "rl")
  shutil.rmtree(os.path.join(rl_dir, "checkpoints", "2"))
  os.remove(os.path.join(rl_dir, "result.json"))
  with open(os.path.join(rl_dir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 2, "reward/pa')
  stdout = _run("experiments.train", "--config", "configs/quickstart.py:tiny",
                f"--config.workdir={workdir}", "--config.stages=rl")
  assert "resumed from the checkpoint of step 1" in stdout
  rows = [json.loads(l) for l in open(os.path.join(rl_dir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [-1, 0, 1]
  assert [r["eval/updates"] for r in rows] == [0, 1, 2]


def _sft_policy(workdir):
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  (path,) = glob.glob(os.path.join(workdir, "sft", "policy", "*.safetensors"))
  return load_file(path)


def _without_clock(row):
  """A metrics or label row minus what depends on the wall clock or on how the work was
  split between launches (`batches_run_now`: the label batches this launch ran)."""
  return {k: v for k, v in row.items()
          if not any(w in k for w in ("time", "seconds", "per_s", "tok_s", "run_now"))}


def _jsonl_rows(pattern):
  rows = []
  for path in sorted(glob.glob(pattern)):
    rows += [_without_clock(json.loads(l)) for l in open(path)]
  return rows


# (crash point, the stage it interrupts, what a later launch must say): mid-SFT after
# the checkpoint of step 10, between the two label shards (after the first one's file,
# before its metrics row), mid-PRM after the checkpoint of step 2, and while RL's
# checkpoint of step 1 is being written (the resume starts from it or, if the write did
# not finish, from the start: either way step 2 is redone).
KILLS = (("sft:15", "sft", r"\[sft\] resumed from the checkpoint of step 10"),
         ("collect:0", "collect", r"\[collect\] running"),
         ("prm:3", "prm", r"\[prm\] resumed from the checkpoint of step 2"),
         ("save:rl:1", "rl", r"\[rl\] (resumed from the checkpoint of step 1|running)"))


def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_result(tiny_run, tmp_path):
  """SIGKILL mid-SFT, mid-collect, mid-PRM and while an RL checkpoint is being written
  (each launch is killed at one of `KILLS`); the last launch finishes, and every stage's
  output equals the uninterrupted tiny run's: SFT policy, label shards, PRM metrics,
  every stage's metrics.jsonl with each step logged once and the same values, the eval
  report."""
  from psgpo_jax import faults  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / "killed")
  command = [sys.executable, "-m", "experiments.train", "--config",
             "configs/quickstart.py:tiny", f"--config.workdir={workdir}"]
  env = _env()
  said = ""
  for point, stage, _ in KILLS:
    out = subprocess.run(command, cwd=ROOT, env={**env, faults.KILL_AT_ENV: point},
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == -signal.SIGKILL, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"killing the process at {point}" in out.stderr
    assert not os.path.exists(os.path.join(workdir, stage, "result.json"))
    said += out.stdout
  out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  said += out.stdout
  for point, _, message in KILLS:
    assert re.search(message, said), (point, message)

  whole = tiny_run[0]
  ref, resumed = _sft_policy(whole), _sft_policy(workdir)
  assert ref.keys() == resumed.keys()
  for name, value in ref.items():
    np.testing.assert_allclose(resumed[name], value, rtol=0, atol=1e-6, err_msg=name)
  shards = os.path.join("collect", "labels-*.jsonl")
  assert _jsonl_rows(os.path.join(workdir, shards)) == _jsonl_rows(os.path.join(whole, shards))
  assert len(glob.glob(os.path.join(workdir, shards))) == 2
  for stage in ("prm", "eval"):
    assert (_without_clock(json.load(open(os.path.join(workdir, stage, "result.json"))))
            == pytest.approx(_without_clock(json.load(open(os.path.join(whole, stage,
                                                                          "result.json"))))))
  for stage in ("sft", "collect", "prm", "rl"):
    rows = _jsonl_rows(os.path.join(workdir, stage, "metrics.jsonl"))
    ref_rows = _jsonl_rows(os.path.join(whole, stage, "metrics.jsonl"))
    assert [sorted(r) for r in rows] == [sorted(r) for r in ref_rows], stage   # once each
    for row, ref in zip(rows, ref_rows):
      where = f"{stage} step {ref['step']}"
      numbers = {k for k, v in ref.items() if isinstance(v, (int, float))}
      assert {k: row[k] for k in numbers} == pytest.approx(
          {k: ref[k] for k in numbers}, rel=1e-5, abs=1e-6), where
      assert {k: row[k] for k in ref if k not in numbers} == {
          k: ref[k] for k in ref if k not in numbers}, where       # e.g. "nan" as text


@pytest.mark.slow
def test_quickstart_improves_held_out_pass_rate(tmp_path):
  """The full quickstart (minutes on 2 cores): RL raises held-out pass@1 over SFT."""
  _run("experiments.train", "--config", "configs/quickstart.py",
       f"--config.workdir={tmp_path}", timeout=3600)
  summary = json.load(open(os.path.join(tmp_path, "summary.json")))
  assert summary["prm"]["auroc"] > 0.6
  assert summary["eval"]["after.pass@1"] > summary["eval"]["before.pass@1"]


def test_ablation_script_trains_each_setting_and_writes_the_report(tiny_run, tmp_path):
  """experiments.ablation on the tiny pipeline's SFT policy and PRM (linked as 'shared')."""
  workdir, _ = tiny_run
  root, docs = tmp_path / "ablation", tmp_path / "docs"
  root.mkdir()
  os.symlink(workdir, root / "shared")
  stdout = _run("experiments.ablation", "--config", "configs/ablation.py:tiny",
                f"--workdir={root}", "--seeds=3", "--arms=none,both", "--variants=",
                f"--report_dir={docs}")
  assert "[sft] running" not in stdout and "[prm] running" not in stdout   # shared reused
  report = (docs / "results.md").read_text()
  for row in ("| no PRM | 1 |", "| both (PSGPO) | 1 |"):
    assert row in report, row
  assert "Both together beat no PRM" in report
  assert "| SFT passes (of " in report          # pass@1 by the SFT policy's difficulty
  assert "A report so far" not in report         # every planned run is in it
  for png in ("learning_curves.png", "best_of_k.png", "pass_by_horizon.png",
              "training_monitors.png"):
    assert (docs / png).stat().st_size > 1000, png
  # Each run trained its own setting with the RL seed, from the same SFT policy and PRM
  # (a variant's switches: tests/test_ablation.py).
  config = json.load(open(root / "both" / "seed3" / "config.json"))
  assert config["rl"]["seed"] == 3
  assert config["rl"]["dense_reward"] and config["rl"]["value_init"] == "prm"
  none = json.load(open(root / "none" / "seed3" / "config.json"))
  assert not none["rl"]["dense_reward"] and none["rl"]["value_init"] == "policy"
  assert os.path.realpath(root / "none" / "seed3" / "sft") == os.path.realpath(
      os.path.join(workdir, "sft"))
  # Each finished run left a small record beside the report (committed with it).
  records = docs / "ablation_runs"
  assert (records / "shared.json").exists()
  for setting in ("none", "both"):
    assert 1000 < (records / setting / "seed3.json").stat().st_size < 200_000, setting
    text = (records / setting / "seed3.json").read_text()
    assert str(root) not in text and str(tmp_path) not in text   # no machine paths
  shared_text = (records / "shared.json").read_text()
  assert str(root) not in shared_text and workdir not in shared_text
  # The report so far of an ablation in parts, from the records alone (the run dirs are
  # gone, as on another machine): unrecorded runs are named and left out, nothing trains.
  (docs / "results.md").unlink()
  shutil.rmtree(root)
  stdout = _run("experiments.ablation", "--config", "configs/ablation.py:tiny",
                f"--workdir={root}", "--seeds=3", "--arms=none,dense", "--variants=",
                f"--report_dir={docs}", "--report_only")
  assert "not recorded, left out: dense/seed3" in stdout and "[rl] running" not in stdout
  assert not root.exists()
  report = (docs / "results.md").read_text()
  assert "| no PRM | 1 |" in report and "| dense reward only |" not in report
  assert "**A report so far**: 1 planned run(s) have no record yet (dense/seed3)" in report
  # Resuming trains only what has no record: here nothing, so not even the shared stages.
  stdout = _run("experiments.ablation", "--config", "configs/ablation.py:tiny",
                f"--workdir={root}", "--seeds=3", "--arms=none,both", "--variants=",
                f"--report_dir={docs}")
  assert "2 planned run(s) recorded" in stdout and "running" not in stdout
  assert not root.exists()
  # A new run on another machine (no workdir): the recorded SFT policy and PRM are
  # restored, not trained again (another platform's training would not reproduce them).
  stdout = _run("experiments.ablation", "--config", "configs/ablation.py:tiny",
                f"--workdir={root}", "--seeds=3", "--arms=none,dense", "--variants=",
                f"--report_dir={docs}")
  assert "restored from" in stdout and "1 planned run(s) recorded" in stdout
  assert "[sft] running" not in stdout and "[prm] running" not in stdout
  assert (records / "dense" / "seed3.json").exists()
  for model in ("sft/policy", "prm/model"):
    for name in os.listdir(os.path.join(workdir, model)):
      assert filecmp.cmp(os.path.join(workdir, model, name), root / "shared" / model / name,
                         shallow=False), (model, name)
