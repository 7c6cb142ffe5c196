"""Multi-process training and label collection for real: CPU processes as hosts.

`tests/multihost_job.py` runs PPO updates, a PRM step and an orbax save/restore on the
global (2, 2, 1) mesh, each process holding only its own rows of the batch. The result
must equal one process with the same 4 devices. `tests/multihost_collect_job.py` runs the
label collection on two processes of one device each, each labeling its share of the
batches: the labels must be those of one process with 2 devices.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from multihost_job import LR, UPDATES
from tolerances import adam_param_atol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(out: str, devices: int, processes: int = 1, process_id: int = 0, port: int = 0,
           job: str = "tests.multihost_job"):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", job, "--out", out,
         "--num_processes", str(processes), "--process_id", str(process_id), "--port", str(port)]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout: float = 300) -> str:
  try:
    output, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    output, _ = proc.communicate()
  assert proc.returncode == 0, output[-4000:]
  return output


def test_two_processes_train_and_checkpoint_like_one(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  os.makedirs(one)
  os.makedirs(two)
  port = _free_port()
  hosts = [_start(two, devices=2, processes=2, process_id=i, port=port) for i in range(2)]
  outputs = [_finish(p) for p in hosts]
  assert "process 0 of 2: ok" in outputs[0] and "process 1 of 2: ok" in outputs[1]
  _finish(_start(one, devices=4))

  single, multi = np.load(os.path.join(one, "result.npz")), np.load(os.path.join(two, "result.npz"))
  assert set(single.files) == set(multi.files)
  assert any("policy" in k for k in single.files) and any("prm/loss" in k for k in single.files)
  # Params after at most UPDATES Adam steps at LR: the Adam bound of tests/tolerances.py;
  # metrics are means over the same terms in another reduction order (rtol 1e-5).
  for name in single.files:
    np.testing.assert_allclose(multi[name], single[name], rtol=1e-5,
                               atol=adam_param_atol(LR, UPDATES), err_msg=name)
  # Only process 0 wrote the result; the checkpoint is one directory written by both.
  assert sorted(os.listdir(two)) == ["checkpoints", "result.npz"]


def _labels(out: str):
  """The labeled rows, without their wall-clock fields."""
  from psgpo_jax.prm import shards
  return [{k: v for k, v in row.items() if not k.endswith("_seconds")}
          for row in shards.load_labels(out, selected_only=False)]


def test_two_processes_collect_and_evaluate_like_one(tmp_path):
  import json
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  port = _free_port()
  hosts = [_start(two, devices=1, processes=2, process_id=i, port=port,
                  job="tests.multihost_collect_job") for i in range(2)]
  outputs = [_finish(p) for p in hosts]
  # Each process labeled its share: batches 0, 2 and 1, 3 of the 4.
  assert "process 0 of 2: ok, 2 batches" in outputs[0], outputs[0][-2000:]
  assert "process 1 of 2: ok, 2 batches" in outputs[1], outputs[1][-2000:]
  assert "ok, 4 batches" in _finish(_start(one, devices=2, job="tests.multihost_collect_job"))
  single, multi = _labels(one), _labels(two)
  assert [r["batch"] for r in single] == [b for b in range(4) for _ in range(4)]
  assert multi == single
  stats = [json.load(open(os.path.join(d, "collect_stats.json"))) for d in (one, two)]
  for key in ("responses", "searched", "selected", "completions", "agreement_by_k",
              "selected_positive_lines", "selected_negative_lines"):
    assert stats[1][key] == stats[0][key], key
  # Evaluation: each process sampled and tested its share; the gathered samples and the
  # figures are one process's (written by process 0 only).
  single, multi = [json.load(open(os.path.join(d, "eval.json"))) for d in (one, two)]
  assert len(single["samples"]) == 12 and multi == single


def _pipeline(workdir: str, devices: int, env: dict, processes: int = 1, process_id: int = 0,
              port: int = 0):
  """`experiments.train` of the tiny config, with a baseline of 2 PPO steps whose 2
  snapshots label the responses, on `processes` processes of `devices` devices each."""
  cmd = [sys.executable, "-m", "experiments.train", "--config", "configs/quickstart.py:tiny",
         f"--config.workdir={workdir}", "--config.logging.progress=False",
         "--config.baseline.steps=2", "--config.baseline.num_checkpoints=2"]
  if processes > 1:
    cmd += ["--config.mesh.distributed=True",
            f"--config.mesh.coordinator_address=localhost:{port}",
            f"--config.mesh.num_processes={processes}", f"--config.mesh.process_id={process_id}"]
  env = dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_processes_run_the_whole_tiny_pipeline_like_one(tmp_path, subprocess_env):
  """Every stage (sft, baseline with snapshots, collect from them, prm, rl, eval) on two
  processes of one device each gives one process's figures on the same two devices."""
  import json
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  port = _free_port()
  hosts = [_pipeline(two, 1, subprocess_env, 2, i, port) for i in range(2)]
  for proc in hosts:
    _finish(proc, timeout=900)
  _finish(_pipeline(one, 2, subprocess_env), timeout=900)
  summaries = [json.load(open(os.path.join(d, "summary.json"))) for d in (one, two)]
  assert list(summaries[0]) == ["sft", "baseline", "collect", "prm", "rl", "eval"]
  timing = ("seconds", "wall_seconds", "seconds_per_response", "batches_run_now")
  for stage, single in summaries[0].items():
    multi = summaries[1][stage]
    for key, value in single.items():
      if key in timing or not isinstance(value, (int, float)):
        continue
      assert multi[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (stage, key)
  # The baseline's 2 snapshots each labeled half of the prompts, with the same labels.
  for d in (one, two):
    assert sorted(os.listdir(os.path.join(d, "baseline", "snapshots"))) == [
        "step_000001", "step_000002"]
  for part in ("policy_0", "policy_1"):
    single, multi = (_labels(os.path.join(d, "collect", part)) for d in (one, two))
    assert single and multi == single, part
