"""Seconds per RL step of the quickstart, by phase, against the previous quickstart step.

Runs real RL steps (sample, sandbox, pack, and the one jitted learner step: score, rewards,
advantages, PPO update, KL coefficient) from a finished
run's SFT policy and PRM (`--run_dir`, e.g. runs/quickstart after
`python -m experiments.train --config configs/quickstart.py`), twice in the same process:

  * ours:     the quickstart's RL step as configured (configs/quickstart.py: PPO with GAE,
    the value model initialised from the PRM, PRM dense rewards, scored and updated on
    rows of two prompt groups, `rl.prompts_per_row=2`, the sampler's log-probs reused as
    the old policy's, `rl.old_logprobs=auto` in float32); `--ours` overrides fields;
  * baseline: the same step on one `prompt + response` row per sample, every prompt
    computed once per sample, and the old log-probs recomputed by a policy forward
    (`--baseline`, default `rl.prompts_per_row=0,rl.old_logprobs=recompute`: the step
    before rows of prompt groups and log-prob reuse). The two differ only in layout (and
    so in which samples share a minibatch) and in float rounding of the old log-probs;
    tests/test_group_rows.py and tests/test_trainer.py check they compute the same.

Each setting runs `--warmup` steps (compilation) and then `--steps` timed steps from the
same initial policy; the table gives each phase's median seconds (a step whose rows
need a new padded length compiles again: the mean step, with those, is printed beside;
`compilation_cache` makes them rare after a first run). Response lengths follow
the policies, so the two settings' steps do comparable but not identical work; both
print their tokens per step.

Usage: python benchmarks/bench_rl_step.py --run_dir runs/quickstart [--steps 8] [--warmup 2]
       [--ours rl.advantage=rloo] [--baseline rl.prompts_per_row=0]
The last line printed is one JSON object (ratio = ours / baseline seconds per step).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np                                           # noqa: E402

from experiments.common import load_config                   # noqa: E402

PHASES = ("sample", "sandbox", "pack", "learn")


def with_overrides(config, overrides):
  """A copy of `config` with dotted-path fields replaced (string values are parsed as
  the field's type)."""
  config = config.copy_and_resolve_references()
  for path, value in overrides.items():
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
      node = node[p]
    old = node[leaf]
    if isinstance(value, str) and not isinstance(old, str):
      value = (value.lower() in ("1", "true")) if isinstance(old, bool) else type(old)(value)
    node[leaf] = value
  return config


def time_setting(config, run_dir: str, steps: int, warmup: int):
  """Per-phase mean seconds and response tokens per step of `steps` timed RL steps."""
  from psgpo_jax import pipeline, stages  # pylint: disable=import-outside-toplevel
  from psgpo_jax.rl.advantages import rl_models  # pylint: disable=import-outside-toplevel
  from psgpo_jax.rl.trainer import RLTrainer  # pylint: disable=import-outside-toplevel
  from psgpo_jax.rl.trainer_config import TrainerConfig  # pylint: disable=import-outside-toplevel
  config.workdir = run_dir
  ctx = pipeline.RunContext(config)
  try:
    rl = config.rl
    prm = stages.load_prm(ctx) if "prm" in rl_models(rl) else None
    with tempfile.TemporaryDirectory() as tmp:
      trainer_cfg = TrainerConfig.from_config(config, ctx.model_cfg, ctx.tokenizer,
                                              steps=warmup + steps,
                                              dense_reward=rl.dense_reward,
                                              value_init=rl.value_init)
      trainer = RLTrainer(trainer_cfg, stages._rl_setup(ctx, evaluate=False), tmp,   # pylint: disable=protected-access
                          stages.sft_policy(ctx), prm)
      rows = [trainer.iteration(s) for s in range(warmup + steps)][warmup:]
      trainer.close()
  finally:
    ctx.close()
  out = {p: float(np.median([r[f"time/{p}_s"] for r in rows])) for p in PHASES}
  out["step"] = float(np.median([r["time/step_s"] for r in rows]))
  out["step_mean"] = float(np.mean([r["time/step_s"] for r in rows]))
  out["host"] = max(0.0, out["step"] - sum(out[p] for p in PHASES))
  out["tokens"] = float(np.mean([r["reward/response_length"] for r in rows]))
  out["rollouts"] = int(rl.prompts_per_step * rl.samples_per_prompt)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--run_dir", default="runs/quickstart")
  parser.add_argument("--config", default="configs/quickstart.py")
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--ours", default="",
                      help="comma-separated field=value overrides of the config for 'ours'")
  parser.add_argument("--baseline", default="rl.prompts_per_row=0,rl.old_logprobs=recompute",
                      help="comma-separated field=value overrides for the baseline")
  args = parser.parse_args()
  overrides = lambda text: dict(kv.split("=", 1) for kv in text.split(",") if kv)  # noqa: E731
  run_dir = os.path.abspath(args.run_dir)
  for part in ("sft/policy", "prm/model", "tokenizer"):
    if not os.path.isdir(os.path.join(run_dir, part)):
      sys.exit(f"{run_dir}/{part} is missing: run `python -m experiments.train --config "
               f"{args.config} --config.workdir={args.run_dir}` first (stages sft, collect, "
               f"prm at least).")
  base = load_config(args.config)
  base.logging.progress = False
  results = {name: time_setting(with_overrides(base, overrides(text)), run_dir, args.steps,
                                args.warmup)
             for name, text in (("ours", args.ours), ("baseline", args.baseline))}
  columns = PHASES + ("host", "step", "step_mean")
  print(f"{'setting':<10}" + "".join(f"{p:>12}" for p in columns)
        + f"{'rollouts':>10}{'tokens/resp':>12}")
  for name, r in results.items():
    print(f"{name:<10}" + "".join(f"{r[p]:>12.3f}" for p in columns)
          + f"{r['rollouts']:>10}{r['tokens']:>12.1f}")
  ours, baseline = results["ours"]["step"], results["baseline"]["step"]
  print(json.dumps({"benchmark": "rl_step", "metric": "median seconds per RL step (quickstart)",
                    "ours": round(ours, 3), "baseline": round(baseline, 3),
                    "ratio": round(ours / baseline, 3),
                    "phases": {k: {p: round(v[p], 3) for p in PHASES + ("host", "step_mean")}
                               for k, v in results.items()},
                    "steps": args.steps}))


if __name__ == "__main__":
  main()
