"""The value model's initial params: the PRM's on the return scale, the policy's, or random."""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from psgpo_jax.models import ModelConfig, ScalarModel, init_params, scalar_params_from_causal
from psgpo_jax.rl import rewards

Array = jax.Array


def prm_as_value_params(prm_params: Any, pass_reward: float, fail_reward: float,
                        prm_loss: str = "mse") -> Any:
  """The PRM's params with its head mapped from the label scale onto the return scale.

  The PRM (MSE) regresses line labels in [-1, 1] (+1: the prefix can still pass), while
  returns are on the outcome scale [fail_reward, pass_reward]. The value model is the
  same ScalarModel, so the affine map v = fail + (pass - fail) * (s + 1) / 2 is folded
  into the head: kernel * (pass - fail) / 2, bias * (pass - fail) / 2 + (pass + fail) / 2.

  Inside a line (between line ends) the PRM was never trained; the value there is the
  PRM head read at a mid-line token, mapped the same way (its quality there is measured
  by the `reward/explained_variance_line_end` and `_in_line` monitors of
  `value_fit_by_position`, not assumed).

  Raises:
    ValueError: a BCE PRM, whose label-scale score 2 * sigmoid(z) - 1 no linear head
      reproduces.
  """
  if prm_loss != "mse":
    raise ValueError(f"rl.value_init='prm' maps an MSE PRM's [-1, 1] scores onto returns; a "
                     f"prm.loss={prm_loss!r} PRM outputs logits whose sigmoid no linear value "
                     f"head can reproduce. Train the PRM with prm.loss=mse (the paper's), or "
                     f"set rl.value_init=policy.")
  half = (float(pass_reward) - float(fail_reward)) / 2.0
  mid = (float(pass_reward) + float(fail_reward)) / 2.0
  head = prm_params["score"]
  mapped = {"kernel": jnp.asarray(head["kernel"]) * half,
            "bias": jnp.asarray(head["bias"]) * half + mid}
  params = jax.tree_util.tree_map(jnp.array, dict(prm_params))
  params["score"] = mapped
  return params


def init_value_params(value_init: str, model_cfg: ModelConfig, policy_params: Any,
                      prm_params: Optional[Any], rng: Array,
                      reward_cfg: Optional[rewards.RewardConfig] = None,
                      prm_loss: str = "mse") -> Any:
  """Value model params: the PRM's on the return scale (`prm_as_value_params`, rewards
  from `reward_cfg`, default 1 / 0), the policy's backbone + fresh head, or random."""
  if value_init == "prm":
    if prm_params is None:
      raise ValueError("rl.value_init='prm' needs a trained PRM: run the 'prm' stage first, "
                       "or set rl.value_init='policy'.")
    reward_cfg = reward_cfg or rewards.RewardConfig()
    return prm_as_value_params(prm_params, reward_cfg.pass_reward, reward_cfg.fail_reward,
                               prm_loss)
  if value_init == "policy":
    return jax.tree_util.tree_map(jnp.array, scalar_params_from_causal(policy_params, model_cfg,
                                                                       rng))
  if value_init == "random":
    return init_params(ScalarModel(model_cfg), rng)
  raise ValueError(f"rl.value_init={value_init!r}; choose prm, policy or random.")
