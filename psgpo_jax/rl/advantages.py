"""Advantage estimators over token rewards: GAE (with a critic) and critic-free RLOO / GRPO.

All arrays are `[B, T]` over the padded sequence, aligned as in `psgpo_jax.rl.gae`
(position t is the action that emits `tokens[:, t]`; `mask` marks response tokens). The
critic-free estimators read the same token rewards as GAE (outcome at the last token,
dense PRM rewards at line ends, minus the KL penalty), so dense rewards still assign
credit per line: an action's advantage is its own return-to-go minus a baseline shared
by the responses to the same prompt.

Rows are grouped by prompt, prompt-major: rows [g * k, (g + 1) * k) are the k samples of
prompt g (the order `rollout.sample_and_test` returns, also on several processes, whose
shares are whole prompts). With G_t the discounted return-to-go of row i at t and
R_i = G at its first response token (the whole response's return):

  rloo:  A_t = G_t - mean_{j != i} R_j                      (leave-one-out, Kool et al. 2019)
  grpo:  A_t = (G_t - mean_j R_j) / max(std_j R_j, GRPO_MIN_STD)   (group-normalised,
                                                             Shao et al. 2024)

GRPO's floor on the group's std: where a prompt's samples all pass or all fail, their
returns differ only by the KL penalty and dense rewards (hundredths), and dividing by that
std would turn those differences into advantages as large as a real success's. With the
floor they stay that small. (Without KL and dense rewards such a group has A = 0.)

  reinforce:  A_t = G_t                                    (no baseline, Williams 1992)

With an outcome reward only (G_t = R_i for every t) these are the usual sequence-level
estimators. Returns (what a value model would regress on) are G_t. With pass = 1 and
fail = 0, `reinforce` learns from passing responses only (and, with dense rewards, from
the lines the dense rewards credit): no failing response's tokens are pushed down.
"""
from __future__ import annotations

from typing import Any, Mapping, Tuple

import jax
import jax.numpy as jnp

from psgpo_jax.rl.gae import gae

Array = jax.Array
ESTIMATORS = ("gae", "rloo", "grpo", "reinforce")
GRPO_MIN_STD = 0.05     # in units of the outcome reward (pass - fail = 1 by default)


def rl_models(rl: Mapping[str, Any]) -> Tuple[str, ...]:
  """The models an RL run of config section `rl` holds, in this order: the policy, the
  value model (GAE only: the critic-free estimators have none), the frozen reference,
  and the PRM (for PRM dense rewards, or to initialise GAE's value model).

  The one home of the rule "this run needs a trained PRM" (`"prm" in rl_models(rl)`):
  the RL stage, the memory planner and the RL-step benchmark read it here.
  """
  critic = rl.get("advantage", "gae") == "gae"
  models = ["policy", "value", "reference"] if critic else ["policy", "reference"]
  prm_dense = rl.dense_reward and rl.get("dense_source", "prm") == "prm"
  if prm_dense or (critic and rl.value_init == "prm"):
    models.append("prm")
  return tuple(models)


def returns_to_go(rewards: Array, mask: Array, gamma: float = 1.0) -> Array:
  """G_t = sum_{k >= 0} gamma^k r_{t_k} over the valid positions from t on.

  GAE with zero values and lambda = 1 is exactly this recursion (masked positions are
  skipped and hold 0).

  Args:
    rewards: [B, T] float.
    mask: [B, T] bool/int, 1 on action positions.
    gamma: discount factor.
  Returns:
    [B, T] float32, 0 where mask is 0.
  """
  zeros = jnp.zeros(jnp.shape(rewards), jnp.float32)
  to_go, _ = gae(rewards, zeros, mask, gamma, 1.0)
  return to_go


def first_token_value(x: Array, mask: Array) -> Array:
  """x at each row's first position where mask is 1 (0 for an empty row): [B] float32."""
  mask = jnp.asarray(mask).astype(bool)
  first = jnp.argmax(mask, axis=1)
  value = jnp.take_along_axis(jnp.asarray(x, jnp.float32), first[:, None], axis=1)[:, 0]
  return jnp.where(jnp.any(mask, axis=1), value, 0.0)


def group_baselines(totals: Array, group_size: int, estimator: str) -> Tuple[Array, Array]:
  """Per-row baseline and scale from the returns of the rows' prompt groups.

  Args:
    totals: [B] float, each response's return R_i (B a multiple of group_size).
    group_size: k, samples per prompt (consecutive rows).
    estimator: "rloo" (baseline = mean of the others, scale 1) or "grpo" (baseline =
      group mean, scale = max(group std, GRPO_MIN_STD)).
  Returns:
    (baseline [B], scale [B]) float32.
  """
  rows = totals.shape[0]
  if group_size < 1 or rows % group_size:
    raise ValueError(f"{rows} rows do not form groups of {group_size} samples per prompt "
                     f"(rl.samples_per_prompt).")
  if estimator == "rloo" and group_size < 2:
    raise ValueError("rl.advantage='rloo' needs rl.samples_per_prompt >= 2 (a leave-one-out "
                     "baseline needs another sample of the same prompt).")
  groups = jnp.asarray(totals, jnp.float32).reshape(rows // group_size, group_size)
  mean = jnp.mean(groups, axis=1, keepdims=True)
  if estimator == "rloo":
    baseline = (jnp.sum(groups, axis=1, keepdims=True) - groups) / (group_size - 1)
    scale = jnp.ones_like(groups)
  elif estimator == "grpo":
    baseline = jnp.broadcast_to(mean, groups.shape)
    std = jnp.maximum(jnp.std(groups, axis=1, keepdims=True), GRPO_MIN_STD)
    scale = jnp.broadcast_to(std, groups.shape)
  else:
    raise ValueError(f"estimator={estimator!r}; the group estimators are 'rloo' and 'grpo'.")
  return baseline.reshape(rows), scale.reshape(rows)


def group_advantages(rewards: Array, mask: Array, group_size: int, estimator: str,
                     gamma: float = 1.0) -> Tuple[Array, Array]:
  """Critic-free advantages (module docstring): return-to-go minus the group baseline.

  Args:
    rewards: [B, T] token rewards.
    mask: [B, T] action mask.
    group_size: samples per prompt (consecutive rows).
    estimator: "rloo" | "grpo".
    gamma: discount factor.
  Returns:
    (advantages [B, T], returns-to-go [B, T]) float32, 0 where mask is 0.
  """
  to_go = returns_to_go(rewards, mask, gamma)
  baseline, scale = group_baselines(first_token_value(to_go, mask), group_size, estimator)
  adv = (to_go - baseline[:, None]) / scale[:, None]
  return jnp.where(jnp.asarray(mask).astype(bool), adv, 0.0), to_go


def estimate_advantages(estimator: str, rewards: Array, values: Array, mask: Array,
                        group_size: int, gamma: float, lam: float) -> Tuple[Array, Array]:
  """(advantages, returns) [B, T] by `estimator` ("gae" reads `values`; the others don't)."""
  if estimator == "gae":
    return gae(rewards, values, mask, gamma, lam)
  if estimator == "reinforce":
    to_go = returns_to_go(rewards, mask, gamma)
    return to_go, to_go
  if estimator in ESTIMATORS:
    return group_advantages(rewards, mask, group_size, estimator, gamma)
  raise ValueError(f"rl.advantage={estimator!r}; choose one of {ESTIMATORS}.")
