"""The device side of one RL step: scorer, token rewards + advantages, the PPO update.

Each builder closes over its static settings and returns a jitted function; trainers with
the same setting (a resumed run, the ablation's arms) share the compiled function through
the caches. Also the value model's initialisation (from the PRM, on the return scale).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from psgpo_jax import sharding, train_step
from psgpo_jax.models import CausalLM, ModelConfig, ScalarModel, init_params
from psgpo_jax.models import scalar_params_from_causal
from psgpo_jax.models.heads import GROUP_ROW_KEYS, row_inputs
from psgpo_jax.prm import scoring as prm_scoring
from psgpo_jax.rl import advantages as advantages_lib
from psgpo_jax.rl import ppo, rewards

Array = jax.Array
RulesKey = Optional[Tuple[Tuple[str, Any], ...]]     # hashable rules: sorted (name, axes)


def rules_key(rules: Optional[Mapping[str, Any]]) -> RulesKey:
  """Sharding rules as a hashable key for the cached builders (None stays None)."""
  if rules is None:
    return None
  return tuple(sorted((str(k), sharding.make_rules({k: v})[k]) for k, v in rules.items()))


def _rules(key: RulesKey) -> Optional[dict]:
  return None if key is None else sharding.make_rules(dict(key))


# Fields of rows that hold a prompt group (`batching.pack_prompt_groups`), stored beside the
# [N, T] rows in one batch under these names with a `group_` prefix.
GROUP_FIELDS = ("tokens", "positions", "segment", "branch", "parents", "to_packed",
                "to_rows")


def from_group_rows(x: Array, to_rows: Array, attention_mask: Array) -> Array:
  """A per-token output of the group rows [G, Tp] -> the [N, T] rows (0 on padding)."""
  return jnp.where(attention_mask > 0, x.reshape(-1)[to_rows], 0).astype(x.dtype)


def to_group_rows(batch: Mapping[str, Array], keys) -> dict:
  """The PPO batch in the group-row layout: `keys`' per-token [N, T] fields gathered into
  [G, Tp] (0 off the responses), with the group rows' tokens, positions, branch, parents.
  """
  to_packed, branch = batch["group_to_packed"], batch["group_branch"]
  out = {k: batch[f"group_{k}"] for k in GROUP_ROW_KEYS + ("tokens",)}
  for k in keys:
    if k not in out and k != "attention_mask":
      x = batch[k].reshape(-1)[to_packed]
      out[k] = jnp.where(branch > 0, x, 0).astype(x.dtype)
  return out


@functools.lru_cache(maxsize=16)
def make_scorer(model_cfg: ModelConfig, temperature: float, with_prm: bool,
                prm_loss: str = "mse", mesh: Optional[Mesh] = None,
                rules: RulesKey = None, with_value: bool = True) -> Callable:
  """Jitted `score(params, batch) -> dict` of rollout quantities, all [B, T] float32.

  `params` is {'policy', 'ref'[, 'value'][, 'prm']}; outputs `old_logprobs`,
  `ref_logprobs`, `values` (aligned as in `rl.ppo`; zeros without a value model) and
  `prm_scores` (`prm.scoring.score`: the PRM's output at each line-end token on the
  [-1, 1] label scale, 0 elsewhere) when `with_prm`. When the batch also holds its rows
  as prompt groups (`group_*` fields, `GROUP_FIELDS`), the forwards run on those (each
  prompt computed once) and the outputs are gathered back to the [B, T] rows. With a
  mesh, the forward passes run under the activation-sharding rules (`rules`: a
  `rules_key`) and the outputs are split by rows like the batch.
  """
  policy, scalar = CausalLM(model_cfg), ScalarModel(model_cfg)

  def score(params, batch):
    tokens, mask = batch["tokens"], batch["attention_mask"]
    attention, positions, parents, back = mask, None, None, lambda x: x
    if "group_tokens" in batch:
      tokens = batch["group_tokens"]
      attention, positions, parents = row_inputs(
          {k: batch[f"group_{k}"] for k in GROUP_ROW_KEYS})
      back = lambda x: from_group_rows(x, batch["group_to_rows"], mask)   # noqa: E731
    logprobs = lambda p: back(ppo.policy_logprobs(policy, p, tokens, attention,  # noqa: E731
                                                  temperature, positions, parents))
    out = {"old_logprobs": logprobs(params["policy"]), "ref_logprobs": logprobs(params["ref"])}
    out["values"] = (back(ppo.value_predictions(scalar, params["value"], tokens, attention,
                                                positions, parents)) if with_value
                     else jnp.zeros(mask.shape, jnp.float32))
    if with_prm:
      outputs = scalar.apply({"params": params["prm"]}, tokens, attention_mask=attention,
                             positions=positions)
      out["prm_scores"] = prm_scoring.line_end_scores(back(outputs), batch["line_end_mask"],
                                                    prm_loss)
    return out

  if mesh is None:
    return jax.jit(score)
  return jax.jit(sharding.with_activation_sharding(score, mesh, _rules(rules)),
                 out_shardings=sharding.batch_sharding(mesh, _rules(rules)))


def value_fit_by_position(values: Array, returns: Array, response_mask: Array,
                          line_end_mask: Array) -> dict:
  """The rollout values' explained variance of the returns, by position type: at line-end
  tokens (where a PRM-initialised value was trained) and inside lines (where it never
  was). All inputs [B, T]; scalars `explained_variance_line_end` / `_in_line`."""
  response = response_mask > 0
  line_end = response & (line_end_mask > 0)
  return {"explained_variance_line_end": ppo.explained_variance(values, returns, line_end),
          "explained_variance_in_line": ppo.explained_variance(values, returns,
                                                               response & ~line_end)}


@functools.lru_cache(maxsize=16)
def make_advantage_fn(reward_cfg: rewards.RewardConfig, gamma: float, lam: float,
                      estimator: str = "gae", group_size: int = 1) -> Callable:
  """Jitted `(batch, kl_coef) -> (batch with rewards/advantages/returns, reward stats)`.

  `estimator` is `rl.advantage` (`advantages.ESTIMATORS`); the critic-free ones group
  the batch's rows by prompt, `group_size` (= rl.samples_per_prompt) consecutive rows each.
  With GAE the stats also give the rollout values' fit by position type
  (`value_fit_by_position`).
  """

  def advantages(batch, kl_coef):
    token_rewards, stats = rewards.token_rewards(
        reward_cfg, passed=batch["passed"] > 0, response_mask=batch["response_mask"],
        line_end_mask=batch["line_end_mask"], trivial_line_mask=batch["trivial_line_mask"],
        prm_scores=batch.get("prm_scores"), logprobs=batch["old_logprobs"],
        ref_logprobs=batch["ref_logprobs"], pass_fraction=batch["pass_fraction"],
        kl_coef=kl_coef, hacked=batch.get("hacked"))
    adv, ret = advantages_lib.estimate_advantages(
        estimator, token_rewards, batch["values"], batch["response_mask"], group_size, gamma,
        lam)
    if estimator == "gae":
      stats = {**stats, **value_fit_by_position(batch["values"], ret, batch["response_mask"],
                                                batch["line_end_mask"])}
    return {**batch, "rewards": token_rewards, "advantages": adv, "returns": ret}, stats

  return jax.jit(advantages)


@functools.lru_cache(maxsize=16)
def make_update(model_cfg: ModelConfig, ppo_cfg: ppo.PPOConfig, policy_lr: float,
                value_lr: float, grad_clip: float, mesh: Optional[Mesh] = None,
                rules: RulesKey = None, adam_eps: float = 1e-8, critic: bool = True,
                warmup_updates: int = 0):
  """(optimizers, the jitted PPO update, its state shardings), built once per setting.

  Trainers with the same setting (a resumed run, the ablation's arms) share the compiled
  function. Learning rates are constant, as in the paper's PPO, after an optional linear
  warm-up over `warmup_updates` optimizer steps (a fresh Adam's first steps are sign
  steps of size lr for every parameter, whatever the gradient). Without a mesh the
  shardings are None and the update is a plain jit; with one, the PPO state
  ({'policy', 'value'} TrainStates; {'policy'} without a `critic`) is sharded as
  `train_step.state_shardings` says, batch rows are split over the `batch` mesh axes,
  and the state is donated. `rules` is a `rules_key` (hashable).
  """
  optimizers = {
      name: train_step.make_optimizer(lr, grad_clip=grad_clip, eps=adam_eps,
                                      warmup_steps=warmup_updates)
      for name, lr in (("policy", policy_lr), ("value", value_lr))}
  modules = {"policy": CausalLM(model_cfg), "value": ScalarModel(model_cfg)}
  if not critic:
    optimizers.pop("value")
    modules.pop("value")
  update = ppo.make_ppo_update(modules["policy"], modules.get("value"), optimizers, ppo_cfg)
  if mesh is None:
    return optimizers, train_step.make_train_step(update), None
  full_rules = _rules(rules)
  shardings = train_step.state_shardings(modules, optimizers, mesh, full_rules)
  step = train_step.make_train_step(update, mesh, shardings,
                                    sharding.batch_sharding(mesh, full_rules), donate=True,
                                    rules=full_rules)
  return optimizers, step, shardings


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
