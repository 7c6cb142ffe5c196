"""Generalised advantage estimation over padded token sequences (`jax.lax.scan`).

Alignment (the one convention of `psgpo_jax.rl`): arrays are `[B, T]` over the whole
padded sequence (prompt + response) and position `t` holds the *action* that emits
`tokens[:, t]`:

  * `logprobs[:, t] = log pi(tokens[t] | tokens[:t])` (position 0 unused),
  * `values[:, t]   = V(tokens[:t])`, the value of the state *before* token `t`
    (the value model's output at position `t - 1`, see `rl.ppo.value_predictions`),
  * `rewards[:, t]` is the reward for emitting token `t`,
  * `advantages[:, t]`, `returns[:, t]` belong to that same action.

`mask` marks the positions that are actions (the response tokens). Only they take part;
the recursion skips masked positions (holes in the middle, left or right padding), so the
successor of a valid step is the next *valid* step, and the step after the last valid
one is terminal (value 0).
"""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

Array = jax.Array


def gae(rewards: Array, values: Array, mask: Array, gamma: float = 1.0,
        lam: float = 0.95) -> Tuple[Array, Array]:
  """Generalised advantage estimation (Schulman et al. 2016), masked.

  With the valid positions of a row written t_1 < t_2 < ... < t_n and t_{n+1} terminal
  (V = 0):

    delta_k = r_{t_k} + gamma * V_{t_{k+1}} - V_{t_k}
    A_{t_k} = delta_k + gamma * lam * A_{t_{k+1}}            (A_{t_{n+1}} = 0)
    R_{t_k} = A_{t_k} + V_{t_k}

  Computed by a reverse `lax.scan` over time carrying `(A_next, V_next)`; a masked step
  passes the carry through unchanged and writes exact zeros. `lam = 1` gives Monte-Carlo
  returns minus values; `lam = 0` gives one-step TD errors.

  Args:
    rewards: [B, T] float, per-action rewards (zero where `mask` is 0 or not).
    values: [B, T] float, V(state before action t).
    mask: [B, T] bool/int, 1 on action (response) positions.
    gamma: discount factor.
    lam: GAE lambda.
  Returns:
    (advantages [B, T] float32, returns [B, T] float32), both exactly 0 where `mask` is 0.
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  values = jnp.asarray(values, jnp.float32)
  mask = jnp.asarray(mask).astype(bool)
  if not rewards.shape == values.shape == mask.shape or rewards.ndim != 2:
    raise ValueError(f"gae: rewards {rewards.shape}, values {values.shape} and mask "
                     f"{mask.shape} must all be [B, T].")

  def step(carry, xs):
    next_adv, next_value = carry
    r, v, m = xs
    delta = r + gamma * next_value - v
    adv = delta + gamma * lam * next_adv
    carry = (jnp.where(m, adv, next_adv), jnp.where(m, v, next_value))
    return carry, jnp.where(m, adv, 0.0)

  batch = rewards.shape[0]
  init = (jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.float32))
  _, adv = jax.lax.scan(step, init, (rewards.T, values.T, mask.T), reverse=True)
  advantages = adv.T
  returns = jnp.where(mask, advantages + values, 0.0)
  return advantages, returns
