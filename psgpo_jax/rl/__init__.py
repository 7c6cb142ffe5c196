"""Reinforcement learning math: token rewards, GAE, PPO losses and the PPO update.

  rewards.py   outcome + dense PRM line rewards (with safeguards) - KL, and monitors
  gae.py       generalised advantage estimation (`gae`), a masked reverse `lax.scan`
  ppo.py       clipped policy/value losses, entropy, whitening, `make_ppo_update`

One alignment everywhere: per-token arrays are [B, T] and position t is the action that
emits token t (logprob of token t given tokens < t, value of the state before token t,
reward and advantage of that token). See `psgpo_jax.rl.gae` for the details.
"""
