"""Critic-free estimators (RLOO, GRPO) against a plain NumPy loop, on ragged batches."""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from psgpo_jax.rl import advantages as A


def ragged_batch(groups=3, k=4, length=12, seed=0):
  """Rows with holes, left and right padding, and one empty row; dense rewards inside."""
  rng = np.random.default_rng(seed)
  rows = groups * k
  mask = np.zeros((rows, length), np.int32)
  for r in range(rows):
    start = rng.integers(0, 4)
    end = rng.integers(start + 1, length + 1)
    mask[r, start:end] = 1
    if end - start > 3:
      mask[r, start + 1] = 0                       # a hole in the middle
  mask[rows - 1] = 0                               # an empty row (a filler)
  rewards = np.where(mask > 0, rng.normal(size=(rows, length)), 0.0).astype(np.float32)
  return rewards, mask


def reference(rewards, mask, k, estimator, gamma):
  """The estimator written as loops: returns-to-go per row, then the group baseline."""
  rows, length = rewards.shape
  to_go = np.zeros_like(rewards, dtype=np.float64)
  totals = np.zeros(rows)
  for r in range(rows):
    running = 0.0
    for t in reversed(range(length)):
      if mask[r, t]:
        running = rewards[r, t] + gamma * running
        to_go[r, t] = running
    valid = np.flatnonzero(mask[r])
    totals[r] = to_go[r, valid[0]] if len(valid) else 0.0
  adv = np.zeros_like(to_go)
  for r in range(rows):
    group = totals[(r // k) * k:(r // k + 1) * k]
    if estimator == "rloo":
      baseline, scale = (group.sum() - totals[r]) / (k - 1), 1.0
    else:
      baseline, scale = group.mean(), max(group.std(), A.GRPO_MIN_STD)
    for t in range(length):
      if mask[r, t]:
        adv[r, t] = (to_go[r, t] - baseline) / scale
  return adv, to_go


@pytest.mark.parametrize("estimator", ["rloo", "grpo"])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_group_estimators_match_a_numpy_loop(estimator, gamma):
  rewards, mask = ragged_batch()
  adv, ret = A.estimate_advantages(estimator, rewards, jnp.zeros_like(rewards), mask,
                                   group_size=4, gamma=gamma, lam=0.95)
  want_adv, want_ret = reference(rewards, mask, 4, estimator, gamma)
  # float32 sums of <= 12 terms of size ~1 against float64: rounding ~1e-6.
  np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(adv)[mask == 0] == 0.0)


def test_outcome_only_rewards_give_the_sequence_level_estimators():
  """One reward at each row's last token: every token of a row gets R_i - baseline."""
  mask = np.ones((4, 5), np.int32)
  rewards = np.zeros((4, 5), np.float32)
  rewards[:, -1] = [1.0, 0.0, 0.0, 1.0]
  rloo, _ = A.group_advantages(rewards, mask, 4, "rloo")
  np.testing.assert_allclose(np.asarray(rloo), np.repeat(
      np.array([[2 / 3], [-2 / 3], [-2 / 3], [2 / 3]], np.float32), 5, axis=1), rtol=1e-6)
  grpo, _ = A.group_advantages(rewards, mask, 4, "grpo")
  np.testing.assert_allclose(np.asarray(grpo)[:, 0], [1, -1, -1, 1], rtol=1e-5)
  # A group where every sample failed carries no signal (all advantages 0) ...
  same, _ = A.group_advantages(np.zeros((4, 5), np.float32), mask, 4, "grpo")
  assert np.all(np.asarray(same) == 0.0)
  # ... and KL-sized differences between its samples stay KL-sized (the std floor).
  kl_only = np.zeros((4, 5), np.float32)
  kl_only[:, 2] = [-0.001, -0.003, 0.0, -0.002]
  small, _ = A.group_advantages(kl_only, mask, 4, "grpo")
  assert np.max(np.abs(np.asarray(small))) <= 0.0015 / A.GRPO_MIN_STD + 1e-6


def test_dense_rewards_give_per_line_credit_within_a_response():
  """With a penalty at line 2 of row 0, its tokens after the penalty carry less blame."""
  mask = np.ones((2, 6), np.int32)
  rewards = np.zeros((2, 6), np.float32)
  rewards[0, 2] = -0.5                              # a dense penalty at a line end
  adv, _ = A.group_advantages(rewards, mask, 2, "rloo")
  adv = np.asarray(adv)
  assert np.all(adv[0, :3] == adv[0, 0]) and np.all(adv[0, 3:] == adv[0, 3])
  assert adv[0, 0] < adv[0, 3]                      # the penalised line's actions are blamed


def test_bad_groups_say_what_to_change():
  rewards, mask = ragged_batch(groups=2, k=3)
  with pytest.raises(ValueError, match="do not form groups of 4"):
    A.group_advantages(rewards, mask, 4, "grpo")
  with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
    A.group_advantages(rewards[:1], mask[:1], 1, "rloo")
  with pytest.raises(ValueError, match="choose one of"):
    A.estimate_advantages("ppo", rewards, rewards, mask, 3, 1.0, 0.95)


def test_reinforce_is_the_return_to_go_without_a_baseline():
  rewards, mask = ragged_batch()
  adv, ret = A.estimate_advantages("reinforce", rewards, jnp.zeros_like(rewards), mask,
                                   group_size=4, gamma=1.0, lam=0.95)
  _, want = reference(rewards, mask, 4, "rloo", 1.0)          # its returns-to-go
  np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(adv), np.asarray(ret))


@pytest.mark.parametrize("advantage,dense_reward,dense_source,value_init,expected", [
    ("gae", True, "prm", "prm", ("policy", "value", "reference", "prm")),
    ("gae", False, "prm", "policy", ("policy", "value", "reference")),
    ("gae", True, "oracle", "prm", ("policy", "value", "reference", "prm")),
    ("gae", True, "oracle", "policy", ("policy", "value", "reference")),
    ("rloo", True, "prm", "prm", ("policy", "reference", "prm")),
    ("grpo", False, "prm", "prm", ("policy", "reference")),      # no critic to initialise
    ("rloo", True, "oracle", "prm", ("policy", "reference")),
])
def test_rl_models_say_when_a_trained_prm_is_needed(advantage, dense_reward, dense_source,
                                                    value_init, expected):
  rl = ml_collections.ConfigDict({"advantage": advantage, "dense_reward": dense_reward,
                                  "dense_source": dense_source, "value_init": value_init})
  assert A.rl_models(rl) == expected
