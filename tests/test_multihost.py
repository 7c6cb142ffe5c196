"""Multi-process training for real: two CPU processes of 2 devices each, as two hosts.

`tests/multihost_job.py` runs PPO updates, a PRM step and an orbax save/restore on the
global (2, 2, 1) mesh, each process holding only its own rows of the batch. The result
must equal one process with the same 4 devices.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np

from multihost_job import LR, UPDATES
from tolerances import adam_param_atol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(out: str, devices: int, processes: int = 1, process_id: int = 0, port: int = 0):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "tests.multihost_job", "--out", out,
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
