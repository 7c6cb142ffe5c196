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
  # Dense line rewards with partial credit that cannot be farmed (docs/rl_tuning.md,
  # rounds 7-8; the variants of experiments/ablation.py keep the other forms):
  # - summed PRM scores normalised by the number of lines (the paper's form; v4 at
  #   lambda 1: the oracle's partial credit helped) were farmed in v5 within 100 steps:
  #   policies learned to stop after two or three lines the PRM rated highly (dense_sum);
  # - as progress (PRM(after) - PRM(before), the outcome after the last line) nothing can
  #   be farmed, but a failing response's rewards sum to 0: no partial credit, and the
  #   oracle's exact line credit then added about nothing to what the critic learns
  #   (oracle_progress);
  # - first_error: a failure earns for each line right before its first wrong one (the
  #   PRM's first score below 0; stopping short counts as an error at the last line) and
  #   nothing after it. Unnormalised, so lambda_fail = 0.1: ten right lines earn about
  #   as much as a pass, which still earns more.
  c.rl.reward.credit = "first_error"
  c.rl.reward.normalize_by_lines = False
  c.rl.reward.dense_coef_fail = 0.1
  c.rl.reward.dense_coef_pass = 0.01
  if size != "tiny":
    # A task mix with long responses, where the SFT policy rarely but not never solves
    # many problems (the paper's gains are for long responses): horizons 2-12 instead of
    # the quickstart's 2-8, six held-out problems per horizon. At 2-8, only 8% of the
    # held-out problems had an SFT pass rate of at most 1/8 (ablation v4).
    c.data.max_horizon = 12
    c.data.num_eval = 66
    c.collect.num_prompts = 768      # ~3000 labeled responses: the PRM beats line position
    # The PRM learns from every labeled response, not only the failed ones with a
    # recoverable prefix (`revised`): trained on those, it scored every response's last
    # line about -1 and ranked all held-out responses below line position alone (AUROC
    # 0.687 vs 0.766; trained on all: 0.867; docs/rl_tuning.md, round 10).
    c.collect.selection = "all"
    # 300 steps left the PRM short of ranking a prompt's responses (its top-scored one
    # passed in 0.24 of the mixed held-out prompts, a random one in 0.38); 1200 steps on
    # the same labels: 0.59, first-error accuracy 0.63 against 0.55 (round 11).
    c.prm.steps = 1200
    # Long enough for the no-PRM setting to plateau on this harder mix (its held-out
    # pass@1 rose only 0.235 -> 0.27 in the first 60 steps); the learning curve every 20.
    c.rl.steps = 200
    c.rl.eval_every = 20
  return apply_arm(c, arm)
