"""PPO losses and the update: all epochs x minibatches in one pure, jittable function.

Alignment (as in `psgpo_jax.rl.gae`): per-token arrays are `[B, T]` over the padded
sequence and position `t` is the action that emits `tokens[:, t]`:

  * `token_logprobs(logits, tokens)[:, t] = log pi(tokens[t] | tokens[:t])`, read from
    the model's logits at position `t - 1`; position 0 is 0 (no action);
  * `value_predictions(...)[:, t] = V(tokens[:t])`, the scalar model's output at `t - 1`
    (the state *before* action t); position 0 is 0;
  * `response_mask[:, t] = 1` where token t is a trained response token.

Losses are token-level means over the masked positions of a minibatch.

The update (`make_ppo_update`) whitens the advantages once over the whole batch, then for
each epoch permutes the rows, reshapes them into `[num_minibatches, minibatch, ...]` and
`lax.scan`s one joint gradient step per minibatch on

    loss = policy_loss - ent_coef * entropy + vf_coef * value_loss

over `{'policy': params, 'value': params}` (accumulated over `micro_batches` parts of the
minibatch, weighted by response tokens), each model updated by its own optimizer
(`train_step.multi_gradient_update`: the policy's gradient moves only the policy, the
value's only the value model; a non-finite step is skipped).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from psgpo_jax.models.heads import (GROUP_ROW_KEYS, row_inputs, shift_right, token_entropy,
                                    token_logprobs)
from psgpo_jax.train_step import TrainState, multi_gradient_update

Array = jax.Array
Metrics = Dict[str, Array]
PPOState = Dict[str, TrainState]          # {'policy': TrainState, 'value': TrainState}

# Batch fields the update reads; any other field of the batch is ignored. Without a
# value model (critic-free advantages) `values` and `returns` are not read.
UPDATE_KEYS = ("tokens", "attention_mask", "response_mask", "old_logprobs", "values",
               "advantages", "returns")
CRITIC_KEYS = ("values", "returns")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """PPO hyper-parameters (names as in the `rl` config section).

  Attributes:
    ppo_epochs: passes over the rollout batch per update.
    num_minibatches: gradient steps per epoch; the batch rows must divide evenly.
    micro_batches: each minibatch's gradient is accumulated over this many sequential
      parts (same update, up to float rounding; less activation memory, and on CPU
      faster, as smaller parts stay in cache).
    clip_eps: policy ratio clipping epsilon.
    value_clip_eps: value clipping epsilon (around the rollout values).
    vf_coef: weight of the value loss in the joint loss.
    ent_coef: weight of the entropy bonus.
    whiten_advantages: normalise advantages over the batch's response tokens.
    temperature: sampling temperature the rollout logprobs were computed at.
  """
  ppo_epochs: int = 2
  num_minibatches: int = 4
  micro_batches: int = 1
  clip_eps: float = 0.2
  value_clip_eps: float = 0.2
  vf_coef: float = 0.5
  ent_coef: float = 0.0
  whiten_advantages: bool = True
  temperature: float = 1.0

  def __post_init__(self):
    if self.ppo_epochs < 1 or self.num_minibatches < 1 or self.micro_batches < 1:
      raise ValueError(f"rl.ppo_epochs={self.ppo_epochs}, rl.num_minibatches="
                       f"{self.num_minibatches} and rl.micro_batches={self.micro_batches} "
                       f"must be >= 1.")
    if self.clip_eps <= 0 or self.value_clip_eps <= 0:
      raise ValueError(f"rl.clip_eps={self.clip_eps} and rl.value_clip_eps="
                       f"{self.value_clip_eps} must be > 0.")
    if self.temperature <= 0:
      raise ValueError(f"temperature={self.temperature} must be > 0.")

  def minibatch_size(self, batch_size: int) -> int:
    """Rows per minibatch = batch_size / num_minibatches, validated (with micro-batches)."""
    parts = self.num_minibatches * self.micro_batches
    if batch_size % parts:
      what = f"rl.num_minibatches={self.num_minibatches}"
      if self.micro_batches > 1:
        what += f" x rl.micro_batches={self.micro_batches}"
      raise ValueError(
          f"The PPO batch has {batch_size} rows, which is not divisible by {what}; rows = "
          f"rl.prompts_per_step * rl.samples_per_prompt must be a multiple of {parts}.")
    return batch_size // self.num_minibatches

  @classmethod
  def from_config(cls, rl: Mapping[str, Any], temperature: float = 1.0) -> "PPOConfig":
    """Picks this config's fields from the `rl` ConfigDict section (others are ignored)."""
    names = [f.name for f in dataclasses.fields(cls) if f.name != "temperature"]
    return cls(temperature=temperature, **{n: rl[n] for n in names if n in rl})


# ----------------------------------------------------------------------------- helpers


def masked_mean(x: Array, mask: Array) -> Array:
  """sum(x * mask) / max(sum(mask), 1): a scalar float32 (0 for an empty mask)."""
  mask = jnp.asarray(mask, jnp.float32)
  return jnp.sum(jnp.asarray(x, jnp.float32) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def whiten(x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
  """Masked normalisation: (x - mean) / sqrt(var + eps) over the positions where mask is 1.

  mean and var (population variance) are over masked positions only. With
  `shift_mean=False` the mean is added back (only the scale changes).

  Args:
    x: [B, T] float.
    mask: [B, T] bool/int.
  Returns:
    [B, T] float32, exactly 0 where mask is 0.
  """
  x = jnp.asarray(x, jnp.float32)
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(x - mean), mask)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(jnp.asarray(mask).astype(bool), out, 0.0)


def entropy_from_logits(logits: Array, mask: Array, temperature: float = 1.0,
                        parents: Optional[Array] = None) -> Array:
  """Mean policy entropy over the masked action positions.

  Args:
    logits: [B, T, V] the model's logits.
    mask: [B, T] action mask (e.g. response_mask), aligned as `token_logprobs`.
    parents: as in `token_logprobs`.
  Returns:
    scalar float32.
  """
  return masked_mean(token_entropy(logits, temperature, parents), mask)


def align_values(scalar_outputs: Array, parents: Optional[Array] = None) -> Array:
  """Scalar-model outputs [B, T] -> values [B, T] with values[:, t] = output[:, t-1]
  (output[:, parents[:, t]] with `parents`, as in `token_logprobs`)."""
  outputs = jnp.asarray(scalar_outputs, jnp.float32)
  if parents is not None:
    values = jnp.take_along_axis(outputs, jnp.maximum(parents, 0), axis=1)
    return jnp.where(parents >= 0, values, 0.0)
  return shift_right(outputs[:, :-1])


def policy_logprobs(policy_module: nn.Module, params: Any, tokens: Array,
                    attention_mask: Array, temperature: float = 1.0,
                    positions: Optional[Array] = None, parents: Optional[Array] = None
                    ) -> Array:
  """log pi(tokens[t] | tokens[:t]) for a whole batch: [B, T] float32 (rollouts, reference).
  `positions` and `parents` as `heads.row_inputs` gives them (None: rows of one sequence)."""
  logits = policy_module.apply({"params": params}, tokens, attention_mask=attention_mask,
                               positions=positions)
  return token_logprobs(logits, tokens, temperature, parents)


def value_predictions(value_module: nn.Module, params: Any, tokens: Array,
                      attention_mask: Array, positions: Optional[Array] = None,
                      parents: Optional[Array] = None) -> Array:
  """V(tokens[:t]) at every position t: [B, T] float32 (position 0 is 0)."""
  out = value_module.apply({"params": params}, tokens, attention_mask=attention_mask,
                           positions=positions)
  return align_values(out, parents)


# ----------------------------------------------------------------------------- losses


def policy_loss(logprobs: Array, old_logprobs: Array, advantages: Array, mask: Array,
                clip_eps: float) -> Tuple[Array, Metrics]:
  """PPO clipped surrogate (Schulman et al. 2017), token-level masked mean.

    ratio = exp(logp - old_logp)
    loss  = mean( max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) )

  Args:
    logprobs: [B, T] log pi_theta of the taken tokens.
    old_logprobs: [B, T] log pi_old (rollout).
    advantages: [B, T].
    mask: [B, T] action mask.
    clip_eps: epsilon.
  Returns:
    (scalar loss, metrics): clip_frac = share of tokens where the clipped term is the
    active one; approx_kl = mean((ratio - 1) - log ratio) (k3 estimate of
    KL(pi_old || pi_theta)); ratio_mean.
  """
  log_ratio = jnp.asarray(logprobs, jnp.float32) - jnp.asarray(old_logprobs, jnp.float32)
  ratio = jnp.exp(log_ratio)
  advantages = jnp.asarray(advantages, jnp.float32)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
  metrics = {
      "clip_frac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
      "approx_kl": masked_mean(jax.lax.stop_gradient(jnp.expm1(log_ratio) - log_ratio), mask),
      "ratio_mean": masked_mean(jax.lax.stop_gradient(ratio), mask),
  }
  return loss, metrics


def value_loss(values: Array, old_values: Array, returns: Array, mask: Array,
               clip_eps_value: float) -> Tuple[Array, Metrics]:
  """Clipped value loss, token-level masked mean.

    v_clip = old_v + clip(v - old_v, -eps, eps)
    loss   = 0.5 * mean( max((v - R)^2, (v_clip - R)^2) )

  Args:
    values: [B, T] current predictions V(tokens[:t]).
    old_values: [B, T] rollout predictions.
    returns: [B, T] GAE returns.
    mask: [B, T] action mask.
    clip_eps_value: epsilon.
  Returns:
    (scalar loss, metrics): value_clip_frac (share of tokens where the clipped error is
    the larger), value_mean.
  """
  values = jnp.asarray(values, jnp.float32)
  old_values = jnp.asarray(old_values, jnp.float32)
  returns = jnp.asarray(returns, jnp.float32)
  clipped_values = old_values + jnp.clip(values - old_values, -clip_eps_value, clip_eps_value)
  sq = jnp.square(values - returns)
  sq_clipped = jnp.square(clipped_values - returns)
  loss = 0.5 * masked_mean(jnp.maximum(sq, sq_clipped), mask)
  metrics = {
      "value_clip_frac": masked_mean((sq_clipped > sq).astype(jnp.float32), mask),
      "value_mean": masked_mean(jax.lax.stop_gradient(values), mask),
  }
  return loss, metrics


def explained_variance(values: Array, returns: Array, mask: Array) -> Array:
  """1 - Var[R - V] / Var[R] over masked positions (0 when Var[R] = 0)."""
  def var(x):
    mean = masked_mean(x, mask)
    return masked_mean(jnp.square(x - mean), mask)
  var_r = var(returns)
  return jnp.where(var_r > 0, 1.0 - var(returns - values) / jnp.maximum(var_r, 1e-12), 0.0)


# ----------------------------------------------------------------------------- update


def make_ppo_loss(policy_module: nn.Module, value_module: Optional[nn.Module],
                  config: PPOConfig
                  ) -> Callable[[Mapping[str, Any], Mapping[str, Array], Array],
                                Tuple[Array, Metrics]]:
  """`loss_fn(params, minibatch, rng) -> (loss, metrics)` with params {'policy', 'value'}.

    loss = policy_loss - ent_coef * entropy + vf_coef * value_loss

  With `value_module=None` (critic-free advantages) params are {'policy'} and the value
  term is absent.
  """
  def loss_fn(params, mb, rng):
    del rng
    mask = mb["response_mask"]
    attention, positions, parents = row_inputs(mb)
    logits = policy_module.apply({"params": params["policy"]}, mb["tokens"],
                                 attention_mask=attention, positions=positions)
    logprobs = token_logprobs(logits, mb["tokens"], config.temperature, parents)
    pg_loss, pg_metrics = policy_loss(logprobs, mb["old_logprobs"], mb["advantages"], mask,
                                      config.clip_eps)
    entropy = entropy_from_logits(logits, mask, config.temperature, parents)
    if not config.ent_coef:
      entropy = jax.lax.stop_gradient(entropy)
    loss = pg_loss - config.ent_coef * entropy
    metrics = {"policy_loss": pg_loss, "entropy": entropy, **pg_metrics}
    if value_module is not None:
      values = value_predictions(value_module, params["value"], mb["tokens"], attention,
                                 positions, parents)
      v_loss, v_metrics = value_loss(values, mb["values"], mb["returns"], mask,
                                     config.value_clip_eps)
      loss = loss + config.vf_coef * v_loss
      metrics.update(value_loss=v_loss, **v_metrics)
    return loss, metrics

  return loss_fn


def make_ppo_update(policy_module: nn.Module, value_module: Optional[nn.Module],
                    optimizers: Mapping[str, optax.GradientTransformation],
                    config: PPOConfig
                    ) -> Callable[[PPOState, Mapping[str, Array], Array],
                                  Tuple[PPOState, Metrics]]:
  """Builds `update(state, batch, rng) -> (state, metrics)`: one whole PPO update.

  Args:
    policy_module: a CausalLM (tokens -> logits [B, T, V]).
    value_module: a ScalarModel (tokens -> [B, T]), or None for critic-free advantages
      (RLOO / GRPO: no value model, state and optimizers {'policy'} only).
    optimizers: {'policy': optimizer, 'value': optimizer}, each with its own learning
      rate and gradient clipping (e.g. `train_step.make_optimizer`).
    config: PPOConfig.
  Returns:
    A pure function (wrap it with `train_step.make_train_step`):
      state: {'policy': TrainState, 'value': TrainState}.
      batch: dict of [B, T] arrays with at least `UPDATE_KEYS` (rollout `old_logprobs`
        and `values`, GAE `advantages` and `returns`), aligned as in the module docstring;
        or rows holding prompt groups (`heads.GROUP_ROW_KEYS` instead of `attention_mask`,
        every per-token field in that layout), which minibatches then keep whole.
      rng: PRNG key for the per-epoch row permutations.
    Metrics are scalars averaged over all epochs x minibatches (`nonfinite` is then the
    share of skipped steps), plus batch statistics taken before the update
    (advantages_mean/std, returns_mean, explained_variance).
  """
  models = {"policy", "value"} if value_module is not None else {"policy"}
  if set(optimizers) != models:
    raise ValueError(f"make_ppo_update needs optimizers for {sorted(models)}, got "
                     f"{sorted(optimizers)}.")
  step = multi_gradient_update(make_ppo_loss(policy_module, value_module, config), optimizers,
                               config.micro_batches, weight_key="response_mask")
  critic_keys = tuple(k for k in UPDATE_KEYS if value_module is not None or k not in CRITIC_KEYS)

  def update(state: PPOState, batch: Mapping[str, Array], rng: Array
             ) -> Tuple[PPOState, Metrics]:
    keys = critic_keys
    if "branch" in batch:        # rows holding a prompt group: their layout, not the mask
      keys = tuple(k for k in keys if k != "attention_mask") + GROUP_ROW_KEYS
    missing = [k for k in keys if k not in batch]
    if missing:
      raise ValueError(f"The PPO batch lacks field(s) {missing}; it needs {keys}.")
    data = {k: jnp.asarray(batch[k]) for k in keys}
    rows = data["tokens"].shape[0]
    mb_size = config.minibatch_size(rows)
    num_mb = config.num_minibatches
    mask = data["response_mask"]
    data["advantages"] = jnp.where(mask.astype(bool), data["advantages"], 0.0)
    batch_metrics = {
        "advantages_mean": masked_mean(data["advantages"], mask),
        "advantages_std": jnp.sqrt(masked_mean(
            jnp.square(data["advantages"] - masked_mean(data["advantages"], mask)), mask)),
    }
    if value_module is not None:
      batch_metrics.update(
          returns_mean=masked_mean(data["returns"], mask),
          explained_variance=explained_variance(data["values"], data["returns"], mask))
    if config.whiten_advantages:
      data["advantages"] = whiten(data["advantages"], mask)

    def minibatch_step(carry, xs):
      mb, key = xs
      return step(carry, mb, key)

    def epoch(carry, key):
      perm_key, step_key = jax.random.split(key)
      perm = jax.random.permutation(perm_key, rows)
      shuffled = jax.tree.map(lambda x: x[perm].reshape((num_mb, mb_size) + x.shape[1:]), data)
      keys = jax.random.split(step_key, num_mb)
      return jax.lax.scan(minibatch_step, carry, (shuffled, keys))

    state, metrics = jax.lax.scan(epoch, dict(state), jax.random.split(rng, config.ppo_epochs))
    metrics = {k: jnp.mean(v) for k, v in metrics.items()}
    metrics.update(batch_metrics)
    return state, metrics

  return update
