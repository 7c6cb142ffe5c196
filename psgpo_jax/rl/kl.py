"""The KL penalty: per-token estimators of KL(pi || pi_ref) and the coefficient's
controllers (fixed, or Ziegler et al.'s adaptive one), as checkpointable pytrees that the
learner step carries in its state (`state["kl"]`)."""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array
KL_ESTIMATORS = ("k1", "k3")


def kl_estimate(logprobs: Array, ref_logprobs: Array, estimator: str = "k1") -> Array:
  """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, 2020).

    k1 = logp - ref_logp                                   (unbiased, can be negative)
    k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1      (unbiased, >= 0)

  Args:
    logprobs: [B, T] float, log pi of the sampled tokens.
    ref_logprobs: [B, T] float, log pi_ref of the same tokens.
    estimator: "k1" or "k3".
  Returns:
    [B, T] float32 (unmasked).
  """
  logprobs = jnp.asarray(logprobs, jnp.float32)
  ref_logprobs = jnp.asarray(ref_logprobs, jnp.float32)
  if estimator == "k1":
    return logprobs - ref_logprobs
  if estimator == "k3":
    log_ratio = ref_logprobs - logprobs
    return jnp.expm1(log_ratio) - log_ratio
  raise ValueError(f"kl_estimator={estimator!r}; choose one of {KL_ESTIMATORS}.")


def update_kl_coef(coef: Array, observed_kl: Array, n_steps: int, target: float,
                   horizon: float) -> Array:
  """Adaptive KL coefficient (Ziegler et al. 2019, proportional controller).

    e = clip(observed_kl / target - 1, -0.2, 0.2)
    coef <- coef * (1 + e * n_steps / horizon)

  Args:
    coef: scalar, current coefficient.
    observed_kl: scalar, KL measured on the latest batch.
    n_steps: samples seen since the last update (e.g. the batch size).
    target: KL target.
    horizon: controller horizon (in samples).
  Returns:
    scalar float32, the new coefficient.
  """
  error = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
  return jnp.asarray(coef, jnp.float32) * (1.0 + error * n_steps / horizon)


@flax.struct.dataclass
class FixedKLController:
  """A constant KL coefficient; `update` returns the controller unchanged."""
  value: Array

  def update(self, observed_kl: Array, n_steps: int) -> "FixedKLController":
    del observed_kl, n_steps
    return self


@flax.struct.dataclass
class AdaptiveKLController:
  """Ziegler et al.'s adaptive KL coefficient as an immutable pytree (checkpointable).

  `AdaptiveKLController(init, target, horizon)`; `update` returns a new controller.
  """
  value: Array
  target: float = flax.struct.field(pytree_node=False)
  horizon: float = flax.struct.field(pytree_node=False)

  def update(self, observed_kl: Array, n_steps: int) -> "AdaptiveKLController":
    return self.replace(value=update_kl_coef(self.value, observed_kl, n_steps, self.target,
                                             self.horizon))


def make_kl_controller(config):
  """The controller a `rewards.RewardConfig` asks for, starting at its `kl_coef`."""
  init = jnp.float32(config.kl_coef)
  if config.adaptive_kl:
    return AdaptiveKLController(init, float(config.kl_target), float(config.kl_horizon))
  return FixedKLController(init)
