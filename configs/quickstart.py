"""The embedded default: a tiny model on the synthetic long-horizon suite.

Runs every stage on 2 CPU cores in minutes: `python -m experiments.train
--config configs/quickstart.py`. Differences from base, and why:
- labels are collected with the SFT policy (`baseline.steps = 0`) to fit the time budget;
- K = 8 completions per probed prefix instead of the paper's 20, for the same reason.
"""
from configs import base


def get_config():
  c = base.get_config()
  c.workdir = "runs/quickstart"
  c.sft.steps = 400
  c.sft.noise = 0.15          # a weak-but-nonzero starting policy
  c.baseline.steps = 0
  c.collect.completions = 8
  c.collect.num_prompts = 64
  c.rl.steps = 30
  return c
