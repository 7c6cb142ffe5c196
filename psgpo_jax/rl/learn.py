"""ONE jitted learner step: score -> token rewards -> advantages -> PPO update -> KL coefficient.

An RL step is `sample -> sandbox -> learner.step(state, batch, key)`: everything after the
sandbox runs as a single traced, sharded device call (PureJaxRL's `_update_step` shape),

  1. `score`: the reference's log-probs, the value model's values and the PRM's line-end
     scores (and the policy's log-probs, unless the sampler's are reused:
     `LearnerConfig.old_logprobs = "sampler"`);
  2. `add_advantages`: outcome + dense + KL token rewards (`rl.rewards`), then GAE or a
     critic-free estimator (`rl.advantages`), with the KL coefficient of the state's
     controller;
  3. the PPO update (`rl.ppo`: all epochs x minibatches, policy and value);
  4. the KL controller's update (`kl.AdaptiveKLController`; fixed: unchanged).

The learner state is a pytree `{'ppo': {'policy', ['value']} TrainStates, 'ref': params,
['prm': params,] 'kl': KL controller, 'rng': key}` (the rng is the trainer's, passed
through). `make_learner` closes over a `LearnerConfig` (the typed record of the `rl`
section) and returns the jitted step with its optimizers and state shardings.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from psgpo_jax import sharding, train_step
from psgpo_jax.models import CausalLM, ModelConfig, ScalarModel
from psgpo_jax.models.heads import GROUP_ROW_KEYS, row_inputs
from psgpo_jax.prm import scoring as prm_scoring
from psgpo_jax.rl import advantages as advantages_lib
from psgpo_jax.rl import kl, ppo, rewards

Array = jax.Array
OLD_LOGPROBS = ("recompute", "sampler")

# Fields of rows that hold a prompt group (`batching.pack_prompt_groups`), stored beside the
# [N, T] rows in one batch under these names with a `group_` prefix.
GROUP_FIELDS = ("tokens", "positions", "segment", "branch", "parents", "to_packed",
                "to_rows")


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
  """What the learner step computes (the `rl` section as a typed record).

  Attributes:
    model: the policy's (= value's = PRM's) ModelConfig.
    ppo: PPO hyper-parameters (its `temperature` is the sampling temperature).
    reward: token-reward settings (outcome, dense, KL).
    estimator: `rl.advantage`, one of `advantages.ESTIMATORS` (GAE trains a value model).
    group_size: samples per prompt (rows of one prompt are consecutive).
    gamma, lam: discount and GAE lambda.
    policy_lr, value_lr, grad_clip, adam_eps: the optimizers'.
    warmup_updates: optimizer steps of linear learning-rate warm-up.
    prm_dense: dense rewards from the PRM (the state then holds `prm`).
    prm_loss: the PRM's loss (`mse` scores on the label scale; `bce` logits).
    old_logprobs: `recompute` (a policy forward over the rollout rows) or `sampler` (the
      sampler's log-probs of the sampled tokens, the batch's `sampler_logprobs`: the same
      distribution, `log_softmax(logits / temperature)`, computed token by token from the
      KV cache; equal up to float rounding, one forward fewer).
  """
  model: ModelConfig
  ppo: ppo.PPOConfig = ppo.PPOConfig()
  reward: rewards.RewardConfig = rewards.RewardConfig()
  estimator: str = "gae"
  group_size: int = 1
  gamma: float = 1.0
  lam: float = 0.95
  policy_lr: float = 2e-5
  value_lr: float = 1e-4
  grad_clip: float = 1.0
  adam_eps: float = 1e-8
  warmup_updates: int = 0
  prm_dense: bool = False
  prm_loss: str = "mse"
  old_logprobs: str = "recompute"

  def __post_init__(self):
    if self.estimator not in advantages_lib.ESTIMATORS:
      raise ValueError(f"rl.advantage={self.estimator!r}; choose one of "
                       f"{advantages_lib.ESTIMATORS}.")
    if self.old_logprobs not in OLD_LOGPROBS:
      raise ValueError(f"rl.old_logprobs={self.old_logprobs!r}; choose one of {OLD_LOGPROBS}.")

  @property
  def critic(self) -> bool:
    """GAE trains a value model; RLOO / GRPO / REINFORCE have none."""
    return self.estimator == "gae"

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, model: ModelConfig,
                  prm_dense: bool) -> "LearnerConfig":
    """The record of a pipeline config's `rl` (and `sampling.temperature`, `prm.loss`)."""
    rl = config.rl
    ppo_cfg = ppo.PPOConfig.from_config(rl, temperature=config.sampling.temperature)
    return cls(model=model, ppo=ppo_cfg, reward=rewards.RewardConfig.from_config(rl.reward),
               estimator=str(rl.advantage), group_size=int(rl.samples_per_prompt),
               gamma=float(rl.gamma), lam=float(rl.lam), policy_lr=float(rl.policy_lr),
               value_lr=float(rl.value_lr), grad_clip=float(rl.grad_clip),
               adam_eps=float(rl.adam_eps),
               warmup_updates=(int(rl.warmup_steps) * ppo_cfg.ppo_epochs
                               * ppo_cfg.num_minibatches),
               prm_dense=prm_dense, prm_loss=str(config.prm.loss),
               old_logprobs=resolve_old_logprobs(str(rl.old_logprobs), model))


def resolve_old_logprobs(setting: str, model: ModelConfig) -> str:
  """`rl.old_logprobs`, with `auto` resolved: `sampler` where the model computes in
  float32 (the sampler's log-probs then equal a fresh forward's to ~1e-6), `recompute`
  in lower precision (bf16 decode and full-sequence forwards round differently, and the
  PPO ratio should start at exactly 1)."""
  if setting != "auto":
    return setting
  return "sampler" if jnp.dtype(model.compute_dtype) == jnp.float32 else "recompute"


# ---------------------------------------------------------------------------------------
# Rows of prompt groups.


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


# ---------------------------------------------------------------------------------------
# The pieces (pure functions of params and batch).


def make_score(model_cfg: ModelConfig, temperature: float, with_prm: bool,
               prm_loss: str = "mse", with_value: bool = True,
               with_policy: bool = True) -> Callable:
  """Pure `score(params, batch) -> dict` of rollout quantities, all [B, T] float32.

  `params` is {'ref'[, 'policy'][, 'value'][, 'prm']}; outputs `ref_logprobs`,
  `old_logprobs` (when `with_policy`), `values` (aligned as in `rl.ppo`; zeros without a
  value model) and `prm_scores` (`prm.scoring.line_end_scores`: the PRM's output at each
  line-end token on the [-1, 1] label scale, 0 elsewhere) when `with_prm`. When the batch
  also holds its rows as prompt groups (`group_*` fields, `GROUP_FIELDS`), the forwards
  run on those (each prompt computed once) and the outputs are gathered back to the
  [B, T] rows.
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
    out = {"ref_logprobs": logprobs(params["ref"])}
    if with_policy:
      out["old_logprobs"] = logprobs(params["policy"])
    out["values"] = (back(ppo.value_predictions(scalar, params["value"], tokens, attention,
                                                positions, parents)) if with_value
                     else jnp.zeros(mask.shape, jnp.float32))
    if with_prm:
      outputs = scalar.apply({"params": params["prm"]}, tokens, attention_mask=attention,
                             positions=positions)
      out["prm_scores"] = prm_scoring.line_end_scores(back(outputs), batch["line_end_mask"],
                                                    prm_loss)
    return out

  return score


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


def add_advantages(cfg: LearnerConfig, batch: Mapping[str, Array], kl_coef: Array):
  """(batch with [B, T] `rewards`, `advantages`, `returns`, reward stats) of a scored batch.

  The critic-free estimators group the rows by prompt, `cfg.group_size` consecutive rows
  each. With GAE the stats also give the rollout values' fit by position type
  (`value_fit_by_position`).
  """
  token_rewards, stats = rewards.token_rewards(
      cfg.reward, passed=batch["passed"] > 0, response_mask=batch["response_mask"],
      line_end_mask=batch["line_end_mask"], trivial_line_mask=batch["trivial_line_mask"],
      prm_scores=batch.get("prm_scores"), logprobs=batch["old_logprobs"],
      ref_logprobs=batch["ref_logprobs"], pass_fraction=batch["pass_fraction"],
      kl_coef=kl_coef, hacked=batch.get("hacked"))
  adv, ret = advantages_lib.estimate_advantages(
      cfg.estimator, token_rewards, batch["values"], batch["response_mask"], cfg.group_size,
      cfg.gamma, cfg.lam)
  if cfg.critic:
    stats = {**stats, **value_fit_by_position(batch["values"], ret, batch["response_mask"],
                                              batch["line_end_mask"])}
  return {**batch, "rewards": token_rewards, "advantages": adv, "returns": ret}, stats


# ---------------------------------------------------------------------------------------
# The one step.


def trained_modules(cfg: LearnerConfig) -> dict:
  """The models the update trains: {'policy': CausalLM[, 'value': ScalarModel]}."""
  modules = {"policy": CausalLM(cfg.model)}
  if cfg.critic:
    modules["value"] = ScalarModel(cfg.model)
  return modules


class Learner(NamedTuple):
  """`step(state, batch, key) -> (state, metrics)`, jitted (state donated), with the
  optimizers that built it and the state's shardings (None without a mesh)."""
  step: Callable
  optimizers: Mapping[str, Any]
  state_shardings: Optional[Any]


def init_state(cfg: LearnerConfig, optimizers: Mapping[str, Any], policy_params: Any,
               value_params: Optional[Any], prm_params: Optional[Any], rng: Array) -> dict:
  """The learner state of fresh optimizers (layout in the module docstring); the params
  are copied, since the step donates its state."""
  ppo_state = {"policy": train_step.TrainState.create(
      jax.tree_util.tree_map(jnp.array, policy_params), optimizers["policy"])}
  if cfg.critic:
    ppo_state["value"] = train_step.TrainState.create(value_params, optimizers["value"])
  copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)     # noqa: E731  (donated)
  state = {"ppo": ppo_state, "ref": copy(policy_params),
           "kl": kl.make_kl_controller(cfg.reward), "rng": rng}
  if cfg.prm_dense:
    state["prm"] = copy(prm_params)
  return state


def make_learner_fn(cfg: LearnerConfig, optimizers: Mapping[str, Any]) -> Callable:
  """The pure learner step `(state, batch, key) -> (state, metrics)` (see module docs).

  `batch` holds the rollout rows of `rl.batch.rollout_batch` (and the `group_*` fields of
  `prompt_group_rows` when scored and updated on rows of prompt groups); metrics are
  scalars, `reward/*` (token-reward monitors, `reward/kl_coef` the coefficient used) and
  `ppo/*` (the update's).
  """
  reuse = cfg.old_logprobs == "sampler"
  score = make_score(cfg.model, cfg.ppo.temperature, cfg.prm_dense, cfg.prm_loss, cfg.critic,
                     with_policy=not reuse)
  modules = trained_modules(cfg)
  update = ppo.make_ppo_update(modules["policy"], modules.get("value"), optimizers, cfg.ppo)

  def learn(state, batch, key):
    params = {"ref": state["ref"], "policy": state["ppo"]["policy"].params}
    if cfg.critic:
      params["value"] = state["ppo"]["value"].params
    if cfg.prm_dense:
      params["prm"] = state["prm"]
    batch = {**batch, **score(params, batch)}
    if reuse:
      batch["old_logprobs"] = batch["sampler_logprobs"]
    batch, reward_stats = add_advantages(cfg, batch, state["kl"].value)
    rows = batch["tokens"].shape[0]
    if "group_tokens" in batch:
      batch = to_group_rows(batch, ppo.UPDATE_KEYS)
    ppo_state, update_metrics = update(state["ppo"], batch, key)
    kl_controller = state["kl"].update(reward_stats["kl"], rows)
    metrics = {**{f"reward/{k}": v for k, v in reward_stats.items()},
               **{f"ppo/{k}": v for k, v in update_metrics.items()}}
    return {**state, "ppo": ppo_state, "kl": kl_controller}, metrics

  return learn


def make_learner(cfg: LearnerConfig, mesh: Optional[Mesh] = None,
                 rules: Optional[Mapping[str, Any]] = None) -> Learner:
  """The jitted learner step of `cfg`, with its optimizers and state shardings.

  Learning rates are constant, as in the paper's PPO, after an optional linear warm-up
  over `cfg.warmup_updates` optimizer steps (a fresh Adam's first steps are sign steps of
  size lr for every parameter, whatever the gradient). Without a mesh the step is a plain
  jit; with one, every model and optimizer state is sharded as `rules` say
  (`train_step.state_shardings`, `sharding.param_shardings`), batch rows are split over
  the `batch` mesh axes, the forwards and the update run under the activation-sharding
  rules, and the state is donated.
  """
  modules = trained_modules(cfg)
  lrs = {"policy": cfg.policy_lr, "value": cfg.value_lr}
  optimizers = {name: train_step.make_optimizer(lrs[name], grad_clip=cfg.grad_clip,
                                                eps=cfg.adam_eps,
                                                warmup_steps=cfg.warmup_updates)
                for name in modules}
  learn = make_learner_fn(cfg, optimizers)
  if mesh is None:
    return Learner(train_step.make_train_step(learn), optimizers, None)
  full_rules = sharding.make_rules(rules)
  rep = sharding.replicated(mesh)
  shardings = {"ppo": train_step.state_shardings(modules, optimizers, mesh, full_rules),
               "ref": sharding.param_shardings(CausalLM(cfg.model), mesh, full_rules),
               "kl": jax.tree.map(lambda _: rep, kl.make_kl_controller(cfg.reward)),
               "rng": rep}
  if cfg.prm_dense:
    shardings["prm"] = sharding.param_shardings(ScalarModel(cfg.model), mesh, full_rules)
  step = train_step.make_train_step(learn, mesh, shardings,
                                    sharding.batch_sharding(mesh, full_rules), donate=True,
                                    rules=full_rules)
  return Learner(step, optimizers, shardings)
