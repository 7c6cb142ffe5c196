"""The value model initialised from the PRM is on the return scale, not the label scale."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psgpo_jax.models import ModelConfig, ScalarModel, init_params
from psgpo_jax.rl import ppo
from psgpo_jax.rl.gae import gae
from psgpo_jax.rl.value_init import init_value_params, prm_as_value_params
from psgpo_jax.rl.rewards import RewardConfig

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("pass_reward,fail_reward", [(1.0, 0.0), (1.0, -1.0), (2.0, 0.5)])
def test_value_head_is_the_prm_mapped_onto_the_outcome_scale(pass_reward, fail_reward):
  prm = init_params(ScalarModel(CFG), jax.random.PRNGKey(0))
  prm["score"]["bias"] = jnp.asarray([0.3])
  tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 9), 0, 64)
  scores = ScalarModel(CFG).apply({"params": prm}, tokens)
  value = prm_as_value_params(prm, pass_reward, fail_reward)
  values = ScalarModel(CFG).apply({"params": value}, tokens)
  want = fail_reward + (pass_reward - fail_reward) * (scores + 1) / 2
  # The same fp32 dot product with a scaled head: rounding of O(1) values.
  np.testing.assert_allclose(values, want, rtol=1e-5, atol=1e-6)
  # Label +1 (recoverable) -> pass_reward, -1 -> fail_reward.
  edge = {"kernel": jnp.zeros_like(prm["score"]["kernel"]), "bias": jnp.asarray([1.0])}
  for label, reward in ((1.0, pass_reward), (-1.0, fail_reward)):
    edge["bias"] = jnp.asarray([label])
    mapped = prm_as_value_params({**prm, "score": edge}, pass_reward, fail_reward)
    np.testing.assert_allclose(ScalarModel(CFG).apply({"params": mapped}, tokens), reward,
                               rtol=1e-6)
  assert prm["score"]["bias"][0] == pytest.approx(0.3)          # the PRM is not modified


def test_step_zero_advantages_favour_passing_responses():
  """A PRM that knows which responses pass (+0.9 / -0.9 on the label scale) initialises a
  value that gives passing responses the larger advantages, and explains the returns at
  least as well as a fresh head; copied raw (the old behaviour) it inverts the sign."""
  reward_cfg = RewardConfig(pass_reward=1.0, fail_reward=0.0)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (8, 12), 1, 64)
  mask = np.zeros((8, 12), np.int32)
  mask[:, 4:] = 1
  passed = np.array([1, 0, 0, 1, 0, 0, 0, 1], bool)
  rewards = np.zeros((8, 12), np.float32)
  rewards[:, -1] = passed.astype(np.float32)
  prm = init_params(ScalarModel(CFG), jax.random.PRNGKey(3))

  def values_of(params_for_row):
    rows = [ppo.value_predictions(ScalarModel(CFG), params_for_row(r), tokens[r:r + 1],
                                  jnp.ones((1, 12), jnp.int32))[0] for r in range(8)]
    return jnp.stack(rows) * mask

  def knowing_prm(r):      # kernel 0: the PRM's output is its bias, +0.9 or -0.9
    bias = 0.9 if passed[r] else -0.9
    return {**prm, "score": {"kernel": jnp.zeros_like(prm["score"]["kernel"]),
                             "bias": jnp.asarray([bias])}}

  mapped = values_of(lambda r: init_value_params("prm", CFG, None, knowing_prm(r), None,
                                                 reward_cfg))
  raw = values_of(knowing_prm)
  fresh = values_of(lambda r: init_params(ScalarModel(CFG), jax.random.PRNGKey(4)))
  results = {}
  for name, values in (("mapped", mapped), ("raw", raw), ("fresh", fresh)):
    adv, ret = gae(rewards, values, mask, 1.0, 0.95)
    adv = np.asarray(adv)
    per_row = adv.sum(1) / mask.sum(1)
    results[name] = (per_row[passed].mean(), per_row[~passed].mean(),
                     float(ppo.explained_variance(values, ret, mask)))
  assert results["mapped"][0] > results["mapped"][1]
  assert results["raw"][0] < results["raw"][1]           # the bug this guards against
  assert results["mapped"][2] >= results["fresh"][2]
  assert results["mapped"][2] > 0.9


def test_a_bce_prm_cannot_initialise_the_value_and_says_what_to_do():
  prm = init_params(ScalarModel(CFG), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="prm.loss=mse"):
    prm_as_value_params(prm, 1.0, 0.0, prm_loss="bce")
