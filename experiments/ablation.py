"""The paper's ablation on the synthetic suite, and a report that says whether it held.

Trains the settings (no PRM / dense reward only / value init only / both / oracle dense
reward) for each seed from ONE SFT policy and ONE PRM, plus the reward-form variants (the
paper's summed PRM scores, the oracle as progress, PURE's min-form credit) for the first
seed or `--variant_seeds`, then writes `<report_dir>/results.md` and PNGs next to it
(experiments/ablation_report.py):

  python -m experiments.ablation --config configs/ablation.py --workdir runs/ablation \
      --seeds 0,1,2 --report_dir docs

Everything is resumable: the shared stages run once in `<workdir>/shared`, each RL run
lives in `<workdir>/<setting>/seed<k>` (linked to the shared SFT policy, labels and PRM)
and resumes where it stopped. A finished run leaves a record of a few kilobytes in
`--record_dir` (default `<report_dir>/ablation_runs`; experiments/ablation_records.py),
committed with the report: a planned run with a record is never trained again, on this
machine or another, so re-running the command only trains what is missing and rewrites
the report, and `--report_only` writes the report from the records alone. Recorded runs
and new ones must share the SFT policy and PRM: the shared stages' outputs the runs read
are recorded too (`<record_dir>/shared/`, the tokenizer and two small checkpoints) and
restored where the workdir is gone, since training them on another platform would not
reproduce them; shared stages trained anew are checked against the record. `--config.*`
overrides apply to every run (e.g. `--config.rl.steps=30`).
Seeds vary the RL stage only (`rl.seed`: rollouts, problem order, value head); the SFT
policy, the PRM and the held-out problems are the same for every run.
"""
from __future__ import annotations

import os
import shlex
import sys
from typing import List, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

from configs.ablation import ARMS, apply_arm  # pylint: disable=g-import-not-at-top
from experiments import ablation_records as records  # pylint: disable=g-import-not-at-top
from experiments import common  # pylint: disable=g-import-not-at-top
from experiments.ablation_report import LABELS, write_report  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          "Base config of every run (configs/ablation.py).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", "runs/ablation", "Root of the shared and per-run dirs.")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "RL seeds of each of the four settings.")
_ARMS = flags.DEFINE_string("arms", "none,dense,value,both", "Settings to train (configs/ablation.py).")
_VARIANTS = flags.DEFINE_string("variants", "dense_sum,oracle_progress",
                                "Reward-form variants ('' = none).")
_VARIANT_SEEDS = flags.DEFINE_string("variant_seeds", "",
                                     "Seeds of the variants ('' = the first of --seeds).")
_REPORT_DIR = flags.DEFINE_string("report_dir", "docs", "Where results.md and the PNGs go.")
_RECORD_DIR = flags.DEFINE_string("record_dir", "",
                                  "Where finished runs' records go ('' = "
                                  "<report_dir>/ablation_runs); commit them with the report.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False,
                                 "Train nothing: write the report from the planned runs that "
                                 "have records (the report so far of an ablation in parts).")

SHARED_STAGES = records.SHARED_STAGES
# The other dense reward forms (configs/ablation.py gives first-error credit), with the
# weights they ran at: the paper's (line scores summed, normalised by the number of lines)
# and progress (PRM(after) - PRM(before), the outcome +-1 after the last line, -1 before
# the first).
SUMMED_SCORES = {"credit": "sum", "shaping": "none", "shaping_baseline": 0.0,
                 "normalize_by_lines": True, "dense_coef_fail": 1.0, "dense_coef_pass": 0.025}
PROGRESS = {"credit": "sum", "shaping": "progress", "shaping_baseline": -1.0,
            "normalize_by_lines": False, "dense_coef_fail": 1.0, "dense_coef_pass": 0.025}
# Each variant: the arm it changes and its rl.reward fields.
VARIANTS = {"dense_sum": ("dense", SUMMED_SCORES),
            "oracle_progress": ("oracle", PROGRESS),
            "min_credit": ("both", {**SUMMED_SCORES, "credit": "min"})}


# ------------------------------------------------------------------------- running


def run_plan(arms: Sequence[str], seeds: Sequence[int], variants: Sequence[str],
             variant_seeds: Sequence[int] = ()) -> List[Tuple[str, int]]:
  """(setting, seed) pairs: every arm x seed, then each variant x variant seed (by
  default the first seed only)."""
  for name in arms:
    if name not in ARMS:
      raise ValueError(f"Unknown arm {name!r}; choose from {sorted(ARMS)}.")
  for name in variants:
    if name not in VARIANTS:
      raise ValueError(f"Unknown variant {name!r}; choose from {sorted(VARIANTS)}.")
  if not seeds:
    raise ValueError("--seeds is empty; give at least one seed, e.g. --seeds 0,1,2.")
  return ([(a, s) for a in arms for s in seeds]
          + [(v, s) for v in variants for s in (variant_seeds or seeds[:1])])


def setting_config(base, setting: str, seed: int, workdir: str):
  """The pipeline config of one RL run: `base` with the setting's switches and seed."""
  config = base.copy_and_resolve_references()
  arm, reward_fields = VARIANTS.get(setting, (setting, {}))
  apply_arm(config, arm)
  for field, value in reward_fields.items():
    setattr(config.rl.reward, field, value)
  config.rl.seed = seed
  config.workdir = workdir
  config.stages = "rl,eval"
  return config


def link_shared(shared_dir: str, run_dir: str) -> None:
  """Points a run dir's tokenizer and shared stage outputs at the shared run's."""
  os.makedirs(run_dir, exist_ok=True)
  for name in ("tokenizer",) + SHARED_STAGES:
    target, link = os.path.join(shared_dir, name), os.path.join(run_dir, name)
    if not os.path.exists(target):
      raise FileNotFoundError(f"{target} is missing: the shared stages did not finish; "
                              "re-run this command to continue them.")
    if not os.path.lexists(link):
      os.symlink(target, link)


def run_all(base, root: str, plan: Sequence[Tuple[str, int]], record_dir: str) -> None:
  """Runs the shared stages, then every planned RL run that has no record, recording each
  as it finishes."""
  from psgpo_jax import pipeline  # pylint: disable=import-outside-toplevel
  done = records.recorded(record_dir, plan)
  if done:
    print(f"{len(done)} planned run(s) recorded in {record_dir}: not trained again")
  todo = [p for p in plan if p not in done]
  if not todo:
    return
  shared = base.copy_and_resolve_references()
  shared.workdir = os.path.join(root, "shared")
  shared.stages = ",".join(SHARED_STAGES)
  # The recorded shared stages (the runs recorded so far started from them) are restored
  # rather than trained again; finished ones (e.g. a linked quickstart run) are reused as
  # they are: their config and summary are left alone.
  if records.restore_shared(record_dir, shared.workdir):
    print(f"shared stages {', '.join(SHARED_STAGES)} restored from "
          f"{records.shared_files_dir(record_dir)} into {shared.workdir}")
  if pipeline.stages_done(shared.workdir, SHARED_STAGES):
    print(f"shared stages {', '.join(SHARED_STAGES)} done in {shared.workdir}: reused")
  else:
    pipeline.run(shared)
  records.check_shared(record_dir, records.shared_record(shared.workdir))
  records.save_shared(shared.workdir, record_dir)
  for i, (setting, seed) in enumerate(todo):
    run_dir = os.path.join(root, setting, f"seed{seed}")
    print(f"=== [{i + 1}/{len(todo)}] {LABELS[setting]}, seed {seed}: {run_dir}", flush=True)
    link_shared(shared.workdir, run_dir)
    pipeline.run(setting_config(base, setting, seed, run_dir))
    records.write_run_record(record_dir, setting, seed, run_dir)


def main(argv) -> None:
  del argv
  if not any(a.startswith(("--verbosity", "-v=")) for a in sys.argv):
    logging.set_verbosity(logging.WARNING)
  root = os.path.abspath(_WORKDIR.value)
  report_dir = os.path.abspath(_REPORT_DIR.value)
  record_dir = os.path.abspath(_RECORD_DIR.value or os.path.join(report_dir, "ablation_runs"))
  seeds = [int(s) for s in _SEEDS.value.split(",") if s.strip()]
  arms = [a for a in _ARMS.value.split(",") if a.strip()]
  variants = [v for v in _VARIANTS.value.split(",") if v.strip()]
  variant_seeds = [int(s) for s in _VARIANT_SEEDS.value.split(",") if s.strip()]
  plan = run_plan(arms, seeds, variants, variant_seeds)
  if not _REPORT_ONLY.value:
    run_all(_CONFIG.value, root, plan, record_dir)
  done = records.recorded(record_dir, plan)
  if not done:
    sys.exit(f"report: no planned run has a record in {record_dir}; run without "
             "--report_only to train them.")
  missing = [f"{s}/seed{k}" for s, k in plan if (s, k) not in done]
  if missing:
    print(f"report: {len(missing)} planned run(s) not recorded, left out: "
          + ", ".join(missing))
  command = "python -m experiments.ablation " + shlex.join(sys.argv[1:])
  path = write_report(*records.read_records(record_dir, plan), report_dir, command, missing)
  print(f"report: {path}")


if __name__ == "__main__":
  common.check_config_flags(sys.argv, __doc__)
  app.run(main)
