"""Token rewards on hand-built batches: exact values for every switch."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psgpo_jax.rl import kl as K
from psgpo_jax.rl import rewards as R

T = 10


def hand_batch():
  """Row 0 fails: prompt 0-2, response 3-8, pad 9; lines end at 4, 6 (comment), 8.

  Row 1 passes: prompt 0-1, response 2-9; lines end at 3, 5, 7, 9.
  A line end inside row 0's prompt (1) must be ignored. PRM scores elsewhere are junk.
  """
  response = np.zeros((2, T), np.int32)
  response[0, 3:9] = 1
  response[1, 2:10] = 1
  line_end = np.zeros((2, T), np.int32)
  line_end[0, [1, 4, 6, 8]] = 1
  line_end[1, [3, 5, 7, 9]] = 1
  trivial = np.zeros((2, T), np.int32)
  trivial[0, 6] = 1
  prm = np.full((2, T), 7.0, np.float32)
  prm[0, [4, 6, 8]] = [0.5, 0.9, -0.6]
  prm[1, [3, 5, 7, 9]] = [0.8, 0.2, 0.4, 1.0]
  passed = np.array([False, True])
  return dict(passed=passed, response_mask=response, line_end_mask=line_end,
              trivial_line_mask=trivial, prm_scores=prm)


def dense(cfg, batch=None):
  b = batch or hand_batch()
  return np.asarray(R.dense_rewards(b["prm_scores"], b["passed"], b["line_end_mask"],
                                    b["response_mask"], cfg, b["trivial_line_mask"]))


def expected(row0: dict, row1: dict) -> np.ndarray:
  out = np.zeros((2, T), np.float32)
  for t, v in row0.items():
    out[0, t] = v
  for t, v in row1.items():
    out[1, t] = v
  return out


CFG = R.RewardConfig()      # paper defaults: lambda 0.25 / 0.025, normalise, skip trivial


# ----------------------------------------------------------------------------- outcome


def test_outcome_binary_at_last_response_token():
  b = hand_batch()
  out = np.asarray(R.outcome_rewards(b["passed"], b["response_mask"], CFG))
  np.testing.assert_array_equal(out, expected({8: 0.0}, {9: 1.0}))
  cfg = dataclasses.replace(CFG, fail_reward=-1.0, pass_reward=2.0)
  out = np.asarray(R.outcome_rewards(b["passed"], b["response_mask"], cfg))
  np.testing.assert_array_equal(out, expected({8: -1.0}, {9: 2.0}))


def test_outcome_fraction():
  b = hand_batch()
  frac = np.array([0.25, 1.0], np.float32)
  cfg = dataclasses.replace(CFG, outcome="fraction")
  out = np.asarray(R.outcome_rewards(b["passed"], b["response_mask"], cfg, frac))
  np.testing.assert_allclose(out, expected({8: 0.25}, {9: 1.0}))
  cfg = dataclasses.replace(cfg, fail_reward=-1.0)           # interpolate in [-1, 1]
  out = np.asarray(R.outcome_rewards(b["passed"], b["response_mask"], cfg, frac))
  np.testing.assert_allclose(out, expected({8: -0.5}, {9: 1.0}))
  with pytest.raises(ValueError, match="pass_fraction"):
    R.outcome_rewards(b["passed"], b["response_mask"], cfg)


def test_last_token_mask_with_holes_and_empty_rows():
  mask = np.array([[0, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
  out = np.asarray(R.last_token_mask(mask))
  np.testing.assert_array_equal(out, [[0, 0, 0, 0, 1, 0], [0] * 6, [0, 0, 0, 0, 0, 1]])


# ----------------------------------------------------------------------------- dense


def test_dense_paper_default():
  # Row 0 (fail): counted lines 4 and 8 (6 is a comment line), N=2, lambda=0.25.
  # Row 1 (pass): N=4, lambda=0.025.
  c1 = 0.025 / 4
  want = expected({4: 0.25 * 0.5 / 2, 8: 0.25 * -0.6 / 2},
                  {3: c1 * 0.8, 5: c1 * 0.2, 7: c1 * 0.4, 9: c1 * 1.0})
  np.testing.assert_allclose(dense(CFG), want, rtol=1e-6)


def test_dense_trivial_lines_counted_when_not_skipped():
  cfg = dataclasses.replace(CFG, skip_trivial_lines=False)
  out = dense(cfg)
  np.testing.assert_allclose(out[0], expected({4: 0.25 * 0.5 / 3, 6: 0.25 * 0.9 / 3,
                                               8: 0.25 * -0.6 / 3}, {})[0], rtol=1e-6)


def test_dense_without_normalisation():
  cfg = dataclasses.replace(CFG, normalize_by_lines=False)
  out = dense(cfg)
  np.testing.assert_allclose(out, expected({4: 0.125, 8: -0.15},
                                           {3: 0.02, 5: 0.005, 7: 0.01, 9: 0.025}), rtol=1e-6)


def test_dense_penalty_only():
  cfg = dataclasses.replace(CFG, penalty_only=True)
  out = dense(cfg)
  np.testing.assert_allclose(out, expected({8: 0.25 * -0.6 / 2}, {}), rtol=1e-6)
  assert np.all(out <= 0)


def test_dense_min_form_hand_example():
  cfg = dataclasses.replace(CFG, credit="min", normalize_by_lines=False, dense_coef_fail=1.0,
                            dense_coef_pass=1.0)
  out = dense(cfg)
  # Row 0: d = [0.5, -0.6] -> q = [-0.6, -0.6] -> d' = [0, -0.6].
  # Row 1: d = [0.8, 0.2, 0.4, 1.0] -> q = [0.2, 0.2, 0.4, 1.0] -> d' = [0, -0.2, -0.6, 1.0].
  want = expected({4: 0.0, 8: -0.6}, {3: 0.0, 5: -0.2, 7: -0.6, 9: 1.0})
  np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-7)
  # Return-to-go from each counted line is the min of the remaining line scores.
  to_go = np.cumsum(out[:, ::-1], axis=1)[:, ::-1]
  np.testing.assert_allclose(to_go[1, [3, 5, 7, 9]], [0.2, 0.2, 0.4, 1.0], rtol=1e-6)
  np.testing.assert_allclose(to_go[0, [4, 8]], [-0.6, -0.6], rtol=1e-6)


def test_dense_min_form_matches_numpy_on_random_rows():
  rng = np.random.default_rng(0)
  batch, length = 5, 24
  response = np.zeros((batch, length), np.int32)
  line_end = (rng.random((batch, length)) < 0.3).astype(np.int32)
  for b in range(batch):
    response[b, rng.integers(0, 6):] = 1
  trivial = line_end * (rng.random((batch, length)) < 0.3)
  prm = rng.normal(size=(batch, length)).astype(np.float32)
  passed = rng.random(batch) < 0.5
  cfg = dataclasses.replace(CFG, credit="min")
  out = np.asarray(R.dense_rewards(prm, passed, line_end, response, cfg, trivial))
  for b in range(batch):
    lines = np.nonzero(line_end[b] & response[b] & ~trivial[b].astype(bool))[0]
    lam = cfg.dense_coef_pass if passed[b] else cfg.dense_coef_fail
    d = lam * prm[b, lines] / max(len(lines), 1)
    for k, t in enumerate(lines):
      np.testing.assert_allclose(out[b, t:].sum(), d[k:].min(), rtol=1e-5, atol=1e-7)
    others = np.setdiff1d(np.arange(length), lines)
    assert np.all(out[b, others] == 0)


def test_dense_potential_shaping_hand_example():
  cfg = dataclasses.replace(CFG, shaping="potential", shaping_baseline=0.1)
  out = dense(cfg)
  c0, c1 = 0.25 / 2, 0.025 / 4
  # The last counted line ends the episode: its potential is 0, not its PRM score.
  want = expected({4: c0 * (0.5 - 0.1), 8: c0 * (0.0 - 0.5)},
                  {3: c1 * (0.8 - 0.1), 5: c1 * (0.2 - 0.8), 7: c1 * (0.4 - 0.2),
                   9: c1 * (0.0 - 0.4)})
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("num_lines", [1, 2, 5, 11])
def test_potential_shaping_telescopes(num_lines):
  """Sum of shaped rewards = 0 - baseline (Ng et al.: terminal potential 0), whatever the
  number of lines and the PRM's scores: no response can farm them."""
  rng = np.random.default_rng(num_lines)
  length = 32
  response = np.zeros((1, length), np.int32)
  response[0, 4:4 + 2 * num_lines + 1] = 1
  line_end = np.zeros((1, length), np.int32)
  ends = 4 + 2 * np.arange(num_lines) + 1
  line_end[0, ends] = 1
  trivial = np.zeros_like(line_end)
  if num_lines > 2:
    trivial[0, ends[1]] = 1           # a comment line in the middle is skipped
  prm = rng.normal(size=(1, length)).astype(np.float32)
  cfg = R.RewardConfig(shaping="potential", shaping_baseline=-0.3, normalize_by_lines=False,
                       dense_coef_fail=1.0, dense_coef_pass=1.0)
  out = np.asarray(R.dense_rewards(prm, np.array([False]), line_end, response, cfg, trivial))
  np.testing.assert_allclose(out.sum(), 0.3, rtol=1e-5, atol=1e-6)
  assert np.count_nonzero(out) == (num_lines - (1 if num_lines > 2 else 0))
  # With normalisation the total is lambda / N times that: bounded, cannot be farmed.
  cfg = dataclasses.replace(cfg, normalize_by_lines=True, dense_coef_fail=0.25)
  out = np.asarray(R.dense_rewards(prm, np.array([False]), line_end, response, cfg, trivial))
  n = num_lines - (1 if num_lines > 2 else 0)
  np.testing.assert_allclose(out.sum(), 0.25 / n * 0.3, rtol=1e-5, atol=1e-6)



def test_dense_progress_shaping_hand_example():
  """"progress": as "potential", but the potential after the last line is the verified
  outcome (+1 passed, -1 failed) on the PRM's label scale."""
  cfg = dataclasses.replace(CFG, shaping="progress", shaping_baseline=0.1)
  out = dense(cfg)
  c0, c1 = 0.25 / 2, 0.025 / 4
  want = expected({4: c0 * (0.5 - 0.1), 8: c0 * (-1.0 - 0.5)},
                  {3: c1 * (0.8 - 0.1), 5: c1 * (0.2 - 0.8), 7: c1 * (0.4 - 0.2),
                   9: c1 * (1.0 - 0.4)})
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("passed", [False, True])
def test_progress_shaping_pays_the_same_for_stopping_early(passed):
  """The farm the sum form allows: a failing response that stops after a few lines the PRM
  rates highly earns more dense reward than a long one. Under "progress" every response
  with the same outcome earns the same total, lambda * (+-1 - baseline), however many lines
  it wrote and however the PRM rated them."""
  length = 40
  def row(num_lines, score):
    response = np.zeros((1, length), np.int32)
    response[0, 2:2 + 2 * num_lines] = 1
    line_end = np.zeros((1, length), np.int32)
    line_end[0, 2 + 2 * np.arange(num_lines) + 1] = 1
    return np.full((1, length), score, np.float32), line_end, response
  cfg = R.RewardConfig(normalize_by_lines=False, dense_coef_fail=1.0, dense_coef_pass=1.0)
  totals = {}
  for shaping in ("none", "progress"):
    for name, (num_lines, score) in {"short": (2, 0.8), "long": (12, -0.3)}.items():
      prm, line_end, response = row(num_lines, score)
      out = R.dense_rewards(prm, np.array([passed]), line_end, response,
                            dataclasses.replace(cfg, shaping=shaping, shaping_baseline=-0.5))
      totals[shaping, name] = float(np.sum(out))
  assert totals["none", "short"] > totals["none", "long"] + 1.0
  want = (1.0 if passed else -1.0) + 0.5
  np.testing.assert_allclose([totals["progress", "short"], totals["progress", "long"]],
                             [want, want], rtol=1e-5)



def _first_error_reference(scores, lines, passed):
  """NumPy loop: keep line scores up to the first negative one; a failing row with none
  has its last line scored -1."""
  out = np.zeros_like(scores)
  for b in range(scores.shape[0]):
    idx = np.nonzero(lines[b])[0]
    vals = scores[b, idx].copy()
    if not passed[b] and len(idx) and not (vals < 0).any():
      vals[-1] = -1.0
    for t, v in zip(idx, vals):
      out[b, t] = v
      if v < 0:
        break
  return out


def test_first_error_credit_matches_numpy_on_random_rows():
  rng = np.random.default_rng(3)
  batch, length = 7, 30
  response = np.zeros((batch, length), np.int32)
  for b in range(batch):
    response[b, rng.integers(0, 6):rng.integers(20, 31)] = 1
  line_end = (rng.random((batch, length)) < 0.35).astype(np.int32)
  trivial = line_end * (rng.random((batch, length)) < 0.2)
  prm = rng.uniform(-0.4, 1.0, size=(batch, length)).astype(np.float32)
  passed = np.array([False, True, False, False, True, False, False])
  cfg = dataclasses.replace(CFG, credit="first_error", normalize_by_lines=False,
                            dense_coef_fail=0.5, dense_coef_pass=0.1)
  out = np.asarray(R.dense_rewards(prm, passed, line_end, response, cfg, trivial))
  lines = line_end.astype(bool) & response.astype(bool) & ~trivial.astype(bool)
  lam = np.where(passed, 0.1, 0.5)[:, None]
  np.testing.assert_allclose(out, lam * _first_error_reference(prm, lines, passed),
                             rtol=1e-6, atol=1e-7)
  assert (out < 0).any(axis=1)[~passed].all()    # every failing row pays somewhere
  with pytest.raises(ValueError, match="first_error"):
    R.RewardConfig(credit="first_error", shaping="progress")


def test_first_error_credit_pays_for_how_far_a_failure_got_right_and_nothing_else():
  """Oracle-style labels (+1 right, -1 from the first wrong line on) of failing
  responses: the dense return is (right lines) - 1 whether the response stopped early or
  went on writing wrong lines, so it grows with the progress and cannot be farmed by
  stopping or by writing on."""
  length = 40
  def total(labels):
    n = len(labels)
    response = np.zeros((1, length), np.int32)
    response[0, :2 * n] = 1
    line_end = np.zeros((1, length), np.int32)
    line_end[0, 2 * np.arange(n) + 1] = 1
    prm = np.zeros((1, length), np.float32)
    prm[0, 2 * np.arange(n) + 1] = labels
    cfg = R.RewardConfig(credit="first_error", normalize_by_lines=False,
                         dense_coef_fail=1.0)
    return float(np.sum(R.dense_rewards(prm, np.array([False]), line_end, response, cfg)))
  # Stopping after two right lines is an error at the second line.
  assert total([1, 1]) == total([1, -1]) == total([1, -1, -1, -1, -1]) == 0.0
  assert total([1, 1, -1]) == total([1, 1, -1, -1, -1, -1]) == 1.0
  assert total([1, 1, 1, 1, 1, -1, -1]) == 4.0


# ----------------------------------------------------------------------------- KL


def test_kl_estimators_match_formulas():
  rng = np.random.default_rng(1)
  logp = -rng.random((3, 7)).astype(np.float32) * 3
  ref = -rng.random((3, 7)).astype(np.float32) * 3
  np.testing.assert_allclose(np.asarray(K.kl_estimate(logp, ref, "k1")), logp - ref, rtol=1e-6)
  k3 = np.exp(ref - logp) - (ref - logp) - 1
  out = np.asarray(K.kl_estimate(logp, ref, "k3"))
  np.testing.assert_allclose(out, k3, rtol=1e-5, atol=1e-7)
  assert np.all(out >= 0)
  with pytest.raises(ValueError, match="kl_estimator"):
    K.kl_estimate(logp, ref, "k9")


def test_adaptive_kl_controller():
  # Formula, both clipping directions, and the pytree controller.
  np.testing.assert_allclose(K.update_kl_coef(0.1, 0.06, 64, 0.05, 1000),
                             0.1 * (1 + 0.2 * 64 / 1000), rtol=1e-6)
  np.testing.assert_allclose(K.update_kl_coef(0.1, 0.052, 64, 0.05, 1000),
                             0.1 * (1 + 0.04 * 64 / 1000), rtol=1e-5)
  np.testing.assert_allclose(K.update_kl_coef(0.1, 0.0, 64, 0.05, 1000),
                             0.1 * (1 - 0.2 * 64 / 1000), rtol=1e-6)
  ctrl = K.make_kl_controller(R.RewardConfig(kl_coef=0.1, adaptive_kl=True, kl_target=0.05,
                                             kl_horizon=1000))
  assert isinstance(ctrl, K.AdaptiveKLController)
  new = jax.jit(lambda c, kl: c.update(kl, 64))(ctrl, jnp.float32(0.06))
  np.testing.assert_allclose(new.value, 0.1 * (1 + 0.2 * 64 / 1000), rtol=1e-6)
  assert new.target == 0.05 and new.horizon == 1000.0
  fixed = K.make_kl_controller(R.RewardConfig(kl_coef=0.1))
  assert isinstance(fixed, K.FixedKLController)
  np.testing.assert_allclose(fixed.update(1.0, 64).value, 0.1)


# ----------------------------------------------------------------------------- composition


def test_token_rewards_composition_and_monitors():
  b = hand_batch()
  rng = np.random.default_rng(2)
  logp = -rng.random((2, T)).astype(np.float32)
  ref = -rng.random((2, T)).astype(np.float32)
  cfg = dataclasses.replace(CFG, kl_coef=0.1, kl_estimator="k3")
  fn = jax.jit(functools.partial(R.token_rewards, cfg))
  rewards, stats = fn(logprobs=logp, ref_logprobs=ref, **b)
  rewards = np.asarray(rewards)
  kl = np.exp(ref - logp) - (ref - logp) - 1
  want = (np.asarray(R.outcome_rewards(b["passed"], b["response_mask"], cfg)) + dense(cfg)
          - 0.1 * kl * b["response_mask"])
  np.testing.assert_allclose(rewards, want, rtol=1e-5, atol=1e-6)
  assert np.all(rewards[b["response_mask"] == 0] == 0)
  assert stats["pass_rate"] == 0.5
  np.testing.assert_allclose(stats["lines_per_response"], 3.5)           # (3 + 4) / 2
  np.testing.assert_allclose(stats["counted_lines_per_response"], 3.0)   # (2 + 4) / 2
  np.testing.assert_allclose(stats["trivial_line_share"], 1 / 7, rtol=1e-6)
  np.testing.assert_allclose(stats["prm_score_mean"], (0.5 - 0.6 + 0.8 + 0.2 + 0.4 + 1) / 6,
                             rtol=1e-6)
  np.testing.assert_allclose(stats["prm_score_mean_passed"], 2.4 / 4, rtol=1e-6)
  np.testing.assert_allclose(stats["prm_score_mean_failed"], -0.1 / 2, rtol=1e-5)
  np.testing.assert_allclose(stats["dense_reward_mean"], dense(cfg).sum() / 2, rtol=1e-6)
  np.testing.assert_allclose(stats["kl"], (kl * b["response_mask"]).sum() / 14, rtol=1e-5)
  np.testing.assert_allclose(stats["kl_per_response"], (kl * b["response_mask"]).sum() / 2,
                             rtol=1e-5)
  np.testing.assert_allclose(stats["reward_mean"], want.sum() / 2, rtol=1e-5)
  np.testing.assert_allclose(stats["kl_coef"], 0.1, rtol=1e-6)
  # A traced coefficient (adaptive controller) overrides the config's.
  rewards2, _ = fn(logprobs=logp, ref_logprobs=ref, kl_coef=jnp.float32(0.0), **b)
  np.testing.assert_allclose(np.asarray(rewards2), want + 0.1 * kl * b["response_mask"],
                             rtol=1e-5, atol=1e-6)


def test_token_rewards_without_prm_or_kl():
  b = hand_batch()
  del b["prm_scores"]
  rewards, stats = R.token_rewards(CFG, **b)
  np.testing.assert_array_equal(np.asarray(rewards), expected({8: 0.0}, {9: 1.0}))
  assert stats["dense_reward_mean"] == 0 and stats["kl"] == 0
  with pytest.raises(ValueError, match="both"):
    R.token_rewards(CFG, logprobs=np.zeros((2, T)), **b)


def test_reward_config_from_config_section():
  ml_collections = pytest.importorskip("ml_collections")
  section = ml_collections.ConfigDict(dict(outcome="fraction", fail_reward=-1.0, credit="min",
                                           kl_estimator="k3", kl_horizon=500))
  cfg = R.RewardConfig.from_config(section)
  assert cfg.outcome == "fraction" and cfg.credit == "min" and cfg.kl_horizon == 500
  with pytest.raises(ValueError, match="Unknown rl.reward field"):
    R.RewardConfig.from_config({"kl_coeff": 0.1})
  with pytest.raises(ValueError, match="rl.reward.credit"):
    R.RewardConfig(credit="max")


def test_configs_build_from_the_base_config():
  """The pipeline's `rl.reward` / `rl` sections map onto RewardConfig / PPOConfig."""
  base = pytest.importorskip("configs.base")
  from psgpo_jax.rl.ppo import PPOConfig
  config = base.get_config()
  reward = R.RewardConfig.from_config(config.rl.reward)
  assert (reward.dense_coef_fail, reward.dense_coef_pass) == (0.25, 0.025)
  ppo_config = PPOConfig.from_config(config.rl, temperature=config.sampling.temperature)
  assert ppo_config.ppo_epochs == config.rl.ppo_epochs
  assert ppo_config.value_clip_eps == config.rl.value_clip_eps


def test_hack_penalty_comes_off_the_outcome_of_flagged_responses():
  mask = np.zeros((3, 6), np.int32)
  mask[:, 2:5] = 1
  passed = np.array([True, True, False])
  hacked = np.array([True, False, True])
  cfg = R.RewardConfig(hack_penalty=0.5, kl_coef=0.0)
  out, _ = R.token_rewards(cfg, passed=passed, response_mask=mask, hacked=hacked)
  out = np.asarray(out)
  np.testing.assert_allclose(out[:, 4], [0.5, 1.0, -0.5])   # at each row's last token
  assert np.all(out[:, :4] == 0) and np.all(out[:, 5] == 0)
  unpenalised, _ = R.token_rewards(R.RewardConfig(kl_coef=0.0), passed=passed,
                                   response_mask=mask, hacked=hacked)
  np.testing.assert_allclose(np.asarray(unpenalised)[:, 4], [1.0, 1.0, 0.0])
