"""GAE against a plain NumPy loop on ragged, padded batches."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from psgpo_jax.rl.gae import gae


def numpy_gae(rewards, values, mask, gamma, lam):
  """Reference: per row, walk the valid positions backwards; terminal value 0."""
  adv = np.zeros_like(rewards, dtype=np.float64)
  ret = np.zeros_like(rewards, dtype=np.float64)
  for b in range(rewards.shape[0]):
    idx = np.nonzero(mask[b])[0]
    running = 0.0
    for k in range(len(idx) - 1, -1, -1):
      t = idx[k]
      next_value = values[b, idx[k + 1]] if k + 1 < len(idx) else 0.0
      delta = rewards[b, t] + gamma * next_value - values[b, t]
      running = delta + gamma * lam * running
      adv[b, t] = running
      ret[b, t] = running + values[b, t]
  return adv, ret


def ragged_batch(seed, batch=6, length=17):
  """Random rewards/values with left padding, right padding and holes in the mask."""
  rng = np.random.default_rng(seed)
  rewards = rng.normal(size=(batch, length)).astype(np.float32)
  values = rng.normal(size=(batch, length)).astype(np.float32)
  mask = np.zeros((batch, length), bool)
  for b in range(batch):
    start = rng.integers(0, length // 2)          # left padding / prompt
    stop = rng.integers(start + 1, length + 1)     # right padding
    mask[b, start:stop] = True
    holes = rng.random(length) < 0.2               # holes in the middle
    mask[b] &= ~holes
  mask[0] = False                                  # a row with no valid step at all
  mask[1] = True                                   # a full row
  # Garbage at masked positions must not leak into anything.
  rewards[~mask] = 1e3
  values[~mask] = -1e3
  return rewards, values, mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (0.9, 1.0), (1.0, 1.0),
                                       (0.97, 0.0), (0.5, 0.7)])
@pytest.mark.parametrize("seed", [0, 1])
def test_gae_matches_numpy(gamma, lam, seed):
  rewards, values, mask = ragged_batch(seed)
  adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
  ref_adv, ref_ret = numpy_gae(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(np.asarray(adv), ref_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ret), ref_ret, rtol=1e-5, atol=1e-5)
  assert adv.dtype == np.float32 and ret.dtype == np.float32
  assert np.all(np.asarray(adv)[~mask] == 0.0) and np.all(np.asarray(ret)[~mask] == 0.0)


def test_defaults_and_monte_carlo():
  rewards, values, mask = ragged_batch(3)
  adv, ret = gae(rewards, values, mask)                # gamma=1, lam=0.95
  ref_adv, _ = numpy_gae(rewards, values, mask, 1.0, 0.95)
  np.testing.assert_allclose(np.asarray(adv), ref_adv, rtol=1e-5, atol=1e-5)
  # lam = gamma = 1: returns are the undiscounted reward-to-go over valid steps.
  _, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
  masked = np.where(mask, rewards, 0.0)
  to_go = np.cumsum(masked[:, ::-1], axis=1)[:, ::-1]
  np.testing.assert_allclose(np.asarray(ret), np.where(mask, to_go, 0.0), rtol=1e-5, atol=1e-4)


def test_padding_invariance():
  """Moving a response within the row (left vs right padding) changes nothing."""
  rng = np.random.default_rng(7)
  r, v = rng.normal(size=(2, 5)).astype(np.float32)
  rewards = np.zeros((2, 9), np.float32)
  values = np.zeros((2, 9), np.float32)
  mask = np.zeros((2, 9), bool)
  rewards[0, :5], values[0, :5], mask[0, :5] = r, v, True
  rewards[1, 4:], values[1, 4:], mask[1, 4:] = r, v, True
  adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.8)
  np.testing.assert_allclose(np.asarray(adv)[0, :5], np.asarray(adv)[1, 4:], rtol=1e-6)


def test_jit_compatible():
  rewards, values, mask = ragged_batch(4)
  fn = jax.jit(gae, static_argnames=("gamma", "lam"))
  adv, ret = fn(rewards, values, mask, gamma=0.99, lam=0.9)
  ref_adv, ref_ret = numpy_gae(rewards, values, mask, 0.99, 0.9)
  np.testing.assert_allclose(np.asarray(adv), ref_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ret), ref_ret, rtol=1e-5, atol=1e-5)
  # gamma and lam may also be traced.
  adv2, _ = jax.jit(gae)(rewards, values, mask, 0.99, 0.9)
  np.testing.assert_allclose(np.asarray(adv2), ref_adv, rtol=1e-5, atol=1e-5)


def test_shape_mismatch_raises():
  with pytest.raises(ValueError, match=r"\[B, T\]"):
    gae(np.zeros((2, 3)), np.zeros((2, 4)), np.ones((2, 3)))
