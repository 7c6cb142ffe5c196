"""Reinforcement learning math: token rewards, GAE, PPO losses and the PPO update.

  rewards.py   outcome + dense PRM line rewards (with safeguards) - KL, and monitors
  gae.py       generalised advantage estimation (`gae`), a masked reverse `lax.scan`
  advantages.py  GAE and the critic-free estimators (RLOO, GRPO, REINFORCE)
  ppo.py       clipped policy/value losses, entropy, whitening, `make_ppo_update`
  learn.py     THE jitted learner step: score -> rewards -> advantages -> PPO -> KL coef
  value_init.py  the value model's initial params (the PRM's on the return scale, ...)
  batch.py     rollouts as the host arrays the learner reads
  trainer.py   the host loop: rollout -> sandbox -> learner step -> log / checkpoint

One alignment everywhere: per-token arrays are [B, T] and position t is the action that
emits token t (logprob of token t given tokens < t, value of the state before token t,
reward and advantage of that token). See `psgpo_jax.rl.gae` for the details.
"""
