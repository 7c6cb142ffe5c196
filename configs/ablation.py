"""The paper's four settings on the quickstart's synthetic suite, from the same SFT policy
and the same PRM: `--config configs/ablation.py:<arm>` with arm one of

  none   PPO from unit-test rewards only (value model from the policy's backbone)
  dense  + PRM line scores as dense rewards
  value  + value model initialised from the PRM (no dense rewards)
  both   + both (PSGPO)
  oracle dense rewards from the synthetic suite's exact first-error oracle instead of the
         PRM (value from the policy): the upper bound of what line rewards can add

`python -m experiments.ablation --config configs/ablation.py` runs them all (several
seeds, the safeguard variants) from one shared SFT policy and PRM, and writes
docs/results.md. `configs/ablation.py:tiny` is the quickstart's tiny variant (tests).
"""
from configs import quickstart

# (rl.dense_reward, rl.value_init, rl.dense_source) of each arm.
ARMS = {"none": (False, "policy", "prm"), "dense": (True, "policy", "prm"),
        "value": (False, "prm", "prm"), "both": (True, "prm", "prm"),
        "oracle": (True, "policy", "oracle")}


def apply_arm(config, arm: str):
  """Sets the arm's switches in `config` (in place) and returns it."""
  config.rl.dense_reward, config.rl.value_init, config.rl.dense_source = ARMS[arm]
  return config


def get_config(arm: str = "both"):
  """`arm` is one of ARMS, optionally with ',tiny' (the quickstart's tiny sizes, for tests)."""
  arm, _, size = arm.partition(",")
  arm = arm or "both"
  if arm == "tiny":
    arm, size = "both", "tiny"
  if arm not in ARMS:
    raise ValueError(f"Unknown ablation arm {arm!r}; choose one of {sorted(ARMS)}.")
  c = quickstart.get_config(size)
  c.workdir = f"runs/ablation_{arm}"
  # Dense line rewards as large as the outcome's spread: at the paper's 0.25 (with the
  # rewards normalised by the number of lines) even the oracle's exact line credit moved
  # held-out pass@1 only on the learning curve (docs/ablation_lambda0.25/results.md).
  c.rl.reward.dense_coef_fail = 1.0
  # ... given as progress, not summed: a line earns PRM(after) - PRM(before), the verified
  # outcome (+-1) is the potential after the last line and -1 the one before the first, so
  # a failing response's dense rewards sum to 0 and a passing one's to 2 * dense_coef_pass:
  # they move credit between lines without changing the outcome's scale, and no response
  # can farm them. Summed scores at lambda 1 were farmed within 100 steps: policies learned
  # to stop after two or three lines the PRM rated highly (docs/rl_tuning.md, round 7; the
  # `dense_sum` variant of experiments/ablation.py).
  c.rl.reward.shaping = "progress"
  c.rl.reward.shaping_baseline = -1.0
  c.rl.reward.normalize_by_lines = False
  if size != "tiny":
    # A task mix with long responses, where the SFT policy rarely but not never solves
    # many problems (the paper's gains are for long responses): horizons 2-12 instead of
    # the quickstart's 2-8, six held-out problems per horizon. At 2-8, only 8% of the
    # held-out problems had an SFT pass rate of at most 1/8 (ablation v4).
    c.data.max_horizon = 12
    c.data.num_eval = 66
    c.collect.num_prompts = 768      # ~3000 labeled responses: the PRM beats line position
    # Long enough for the no-PRM setting to plateau on this harder mix (its held-out
    # pass@1 rose only 0.235 -> 0.27 in the first 60 steps); the learning curve every 20.
    c.rl.steps = 200
    c.rl.eval_every = 20
  return apply_arm(c, arm)
