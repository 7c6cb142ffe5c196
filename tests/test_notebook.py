"""The Colab notebook's code cells run on CPU with the tiny quickstart.

The cells are read from the .ipynb JSON and executed in order in one namespace, in a
subprocess (one CPU device, `PSGPO_NOTEBOOK_TINY=1`, a temporary working directory), as
a kernel would run them; no Jupyter kernel is needed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "colab_tpu_demo.ipynb")

RUNNER = """
import json, sys
cells = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for i, source in enumerate(cells):
  print(f"--- cell {i}", flush=True)
  exec(compile(source, f"<notebook cell {i}>", "exec"), namespace)
"""


def code_cells(path: str = NOTEBOOK):
  with open(path, encoding="utf-8") as f:
    notebook = json.load(f)
  return ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]


def test_notebook_is_valid_and_its_cells_are_plain_python():
  with open(NOTEBOOK, encoding="utf-8") as f:
    notebook = json.load(f)
  assert notebook["nbformat"] == 4 and notebook["metadata"]["accelerator"] == "TPU"
  cells = code_cells()
  assert len(cells) == 4                       # install, devices, run, plots
  for i, source in enumerate(cells):
    compile(source, f"<cell {i}>", "exec")     # no shell or IPython magics
  assert "PSGPO_NOTEBOOK_TINY" in cells[0] and "TINY" in cells[0]
  assert "pipeline.run(config)" in cells[2]
  assert all(not any(cell.get("outputs")) for cell in notebook["cells"]
             if cell["cell_type"] == "code")   # committed without outputs


def test_notebook_runs_the_tiny_pipeline_and_plots(tmp_path, subprocess_env):
  cells_file = tmp_path / "cells.json"
  cells_file.write_text(json.dumps(code_cells()))
  env = dict(subprocess_env)                                           # one CPU device
  env.update(PSGPO_NOTEBOOK_TINY="1", MPLBACKEND="Agg", HF_HUB_OFFLINE="1",
             PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
  out = subprocess.run([sys.executable, "-c", RUNNER, str(cells_file)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "skipping the install" in out.stdout and "No TPU found: running on CPU" in out.stdout
  assert "memory per device" in out.stdout and "held-out metric" in out.stdout
  run_dir = tmp_path / "runs" / "notebook_tiny"
  summary = json.loads((run_dir / "summary.json").read_text())
  assert "eval" in summary
  for label in ("before", "after"):
    assert 0.0 <= summary["eval"][f"{label}.pass@1"] <= 1.0
  assert (run_dir / "rl_curves.png").stat().st_size > 1000


def test_the_install_cell_installs_from_a_git_url_where_psgpo_jax_is_missing(tmp_path):
  """Cell 0 in a fresh virtualenv (no psgpo_jax): pip installs the repository from the git
  URL in PSGPO_REPO_URL (here a file:// URL of a clone), and psgpo_jax, configs and
  experiments then import from the installed copy."""
  clone = tmp_path / "repo"
  subprocess.run(["git", "clone", "-q", ROOT, str(clone)], check=True)
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  cells_file = tmp_path / "cells.json"
  cells_file.write_text(json.dumps(code_cells()[:1]))
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env.update(PSGPO_REPO_URL=f"file://{clone}", PSGPO_PIP_ARGS="--no-deps")  # deps: not here
  out = subprocess.run([python, "-c", RUNNER, str(cells_file)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert f"installed psgpo_jax from file://{clone}" in out.stdout
  where = subprocess.run([python, "-c", "import configs, experiments, psgpo_jax; "
                          "print(psgpo_jax.__file__)"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True).stdout
  assert where.startswith(str(venv)), where
