"""The paper's four settings on the quickstart's synthetic suite, from the same SFT policy
and the same PRM: `--config configs/ablation.py:<arm>` with arm one of

  none   PPO from unit-test rewards only (value model from the policy's backbone)
  dense  + PRM line scores as dense rewards
  value  + value model initialised from the PRM (no dense rewards)
  both   + both (PSGPO)

Run the shared stages once (`--config.stages=sft,collect,prm`), then each arm's `rl,eval`
in its own workdir pointing at the same SFT policy and PRM, e.g. by copying `sft/` and
`prm/` into each arm's workdir, or run everything per arm and compare `summary.json`s.
"""
from configs import quickstart

ARMS = {"none": (False, "policy"), "dense": (True, "policy"), "value": (False, "prm"),
        "both": (True, "prm")}


def get_config(arm: str = "both"):
  if arm not in ARMS:
    raise ValueError(f"Unknown ablation arm {arm!r}; choose one of {sorted(ARMS)}.")
  c = quickstart.get_config()
  c.workdir = f"runs/ablation_{arm}"
  c.rl.dense_reward, c.rl.value_init = ARMS[arm]
  return c
