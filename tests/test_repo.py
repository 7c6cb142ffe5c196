"""The repository itself: every script answers --help, and no file names a machine."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["benchmarks/bench_ragged.py", "benchmarks/bench_rl_step.py",
           "benchmarks/bench_sampler.py",
           "benchmarks/bench_sandbox.py", "benchmarks/bench_train_step.py",
           "scripts/make_parity_fixtures.py"]
# Home and work directories of a machine: a path under one of them only exists there.
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(home|Users|root|work)/")


def _tracked_files():
  out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
  return [p for p in out.stdout.decode().split("\0") if p]


def test_scripts_are_all_listed_here():
  listed = {p for p in _tracked_files()
            if re.fullmatch(r"(benchmarks/bench_\w+|scripts/\w+)\.py", p)}
  assert listed == set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_prints_its_usage_and_exits_0(script):
  out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "usage:" in out.stdout


def test_no_tracked_file_names_a_path_of_a_machine():
  if not os.path.isdir(os.path.join(ROOT, ".git")):
    pytest.skip("not a git checkout")
  hits = []
  for path in _tracked_files():
    if path == "tests/test_repo.py" or path.endswith((".png", ".npz", ".safetensors")):
      continue
    try:
      text = open(os.path.join(ROOT, path), encoding="utf-8").read()
    except (UnicodeDecodeError, FileNotFoundError):
      continue
    hits += [f"{path}:{text.count(chr(10), 0, m.start()) + 1}"
             for m in MACHINE_PATH.finditer(text)]
  assert not hits, f"machine-specific paths (use a relative path or a variable): {hits}"
