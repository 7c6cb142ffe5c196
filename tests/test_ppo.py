"""PPO losses against NumPy, and the whole update on a tiny policy + value model."""
from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psgpo_jax.models import CausalLM, ModelConfig, ScalarModel, init_params
from psgpo_jax.rl import ppo
from psgpo_jax.rl.gae import gae
from psgpo_jax.train_step import (TrainState, make_optimizer, make_train_step,
                                  micro_value_and_grad, split_micro_batches)
from tolerances import ADAM_EPS, adam_param_atol, max_abs_difference


def log_softmax_np(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------- free functions


def test_policy_loss_matches_numpy_with_clipping():
  rng = np.random.default_rng(0)
  shape = (4, 9)
  old = -rng.random(shape).astype(np.float32) * 2
  new = old + rng.normal(scale=0.4, size=shape).astype(np.float32)   # ratios well past 1 +- eps
  adv = rng.normal(size=shape).astype(np.float32)
  mask = (rng.random(shape) < 0.7).astype(np.float32)
  eps = 0.2
  loss, metrics = ppo.policy_loss(new, old, adv, mask, eps)
  # Reference: per-token loop.
  total, clipped_count, kl, n = 0.0, 0, 0.0, 0
  for b in range(shape[0]):
    for t in range(shape[1]):
      if not mask[b, t]:
        continue
      r = np.exp(float(new[b, t]) - float(old[b, t]))
      a = float(adv[b, t])
      l1, l2 = -a * r, -a * min(max(r, 1 - eps), 1 + eps)
      total += max(l1, l2)
      clipped_count += l2 > l1
      kl += (r - 1) - np.log(r)
      n += 1
  assert 0 < clipped_count < n                       # clipping is exercised
  np.testing.assert_allclose(loss, total / n, rtol=1e-5)
  np.testing.assert_allclose(metrics["clip_frac"], clipped_count / n, rtol=1e-6)
  np.testing.assert_allclose(metrics["approx_kl"], kl / n, rtol=1e-4)
  # Gradient is zero through the clipped branch: d loss / d logp = -A * r only if unclipped.
  grad = np.asarray(jax.grad(lambda lp: ppo.policy_loss(lp, old, adv, mask, eps)[0])(new))
  r = np.exp(new - old)
  active = (-adv * r >= -adv * np.clip(r, 1 - eps, 1 + eps))
  np.testing.assert_allclose(grad, np.where(active & (mask > 0), -adv * r / n, 0.0),
                             rtol=1e-5, atol=1e-7)


def test_value_loss_matches_numpy():
  rng = np.random.default_rng(1)
  shape = (3, 8)
  old = rng.normal(size=shape).astype(np.float32)
  values = old + rng.normal(scale=0.5, size=shape).astype(np.float32)
  returns = rng.normal(size=shape).astype(np.float32)
  mask = (rng.random(shape) < 0.8).astype(np.float32)
  loss, metrics = ppo.value_loss(values, old, returns, mask, 0.2)
  clipped = old + np.clip(values - old, -0.2, 0.2)
  per = 0.5 * np.maximum((values - returns) ** 2, (clipped - returns) ** 2)
  np.testing.assert_allclose(loss, (per * mask).sum() / mask.sum(), rtol=1e-5)
  frac = (((clipped - returns) ** 2 > (values - returns) ** 2) * mask).sum() / mask.sum()
  np.testing.assert_allclose(metrics["value_clip_frac"], frac, rtol=1e-6)


def test_whiten_matches_numpy():
  rng = np.random.default_rng(2)
  x = rng.normal(loc=3.0, scale=2.0, size=(4, 7)).astype(np.float32)
  mask = rng.random((4, 7)) < 0.6
  out = np.asarray(ppo.whiten(x, mask))
  sel = x[mask].astype(np.float64)
  np.testing.assert_allclose(out[mask], (sel - sel.mean()) / np.sqrt(sel.var() + 1e-8),
                             rtol=1e-5, atol=1e-5)
  assert np.all(out[~mask] == 0)
  kept = np.asarray(ppo.whiten(x, mask, shift_mean=False))
  np.testing.assert_allclose(kept[mask], sel / np.sqrt(sel.var() + 1e-8)
                             - sel.mean() / np.sqrt(sel.var() + 1e-8) + sel.mean(),
                             rtol=1e-5, atol=1e-5)


def test_token_logprobs_and_entropy_alignment():
  rng = np.random.default_rng(3)
  batch, length, vocab = 2, 6, 11
  logits = rng.normal(size=(batch, length, vocab)).astype(np.float32)
  tokens = rng.integers(0, vocab, size=(batch, length))
  temp = 0.7
  out = np.asarray(ppo.token_logprobs(logits, tokens, temp))
  ent = np.asarray(ppo.token_entropy(logits, temp))
  for b in range(batch):
    assert out[b, 0] == 0 and ent[b, 0] == 0
    for t in range(1, length):
      lp = log_softmax_np(logits[b, t - 1].astype(np.float64) / temp)
      np.testing.assert_allclose(out[b, t], lp[tokens[b, t]], rtol=1e-5)
      np.testing.assert_allclose(ent[b, t], -(np.exp(lp) * lp).sum(), rtol=1e-5)
  mask = np.zeros((batch, length))
  mask[:, 3:] = 1
  np.testing.assert_allclose(ppo.entropy_from_logits(logits, mask, temp), ent[:, 3:].mean(),
                             rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(ppo.align_values(np.arange(12.).reshape(2, 6))),
                                [[0, 0, 1, 2, 3, 4], [0, 6, 7, 8, 9, 10]])


def test_config_validation_and_from_config():
  cfg = ppo.PPOConfig(num_minibatches=4)
  assert cfg.minibatch_size(16) == 4
  with pytest.raises(ValueError, match="not divisible by rl.num_minibatches=4"):
    cfg.minibatch_size(10)
  ml_collections = pytest.importorskip("ml_collections")
  rl = ml_collections.ConfigDict(dict(ppo_epochs=3, num_minibatches=2, clip_eps=0.1,
                                      value_clip_eps=0.3, vf_coef=1.0, ent_coef=0.01,
                                      whiten_advantages=False, gamma=1.0, steps=5))
  cfg = ppo.PPOConfig.from_config(rl, temperature=0.8)
  assert (cfg.ppo_epochs, cfg.num_minibatches, cfg.clip_eps, cfg.temperature) == (3, 2, 0.1, 0.8)
  assert not cfg.whiten_advantages


# ----------------------------------------------------------------------------- the update

B, T, PROMPT = 8, 12, 4
# Jitted once per module/shape; the modules are static (hashable) arguments.
policy_logprobs = jax.jit(ppo.policy_logprobs, static_argnums=0)
value_predictions = jax.jit(ppo.value_predictions, static_argnums=0)


@pytest.fixture(scope="module")
def setup():
  cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
  policy, value = CausalLM(cfg), ScalarModel(cfg)
  # The "rbg" generator initialises eagerly about twice as fast as threefry on CPU.
  kp, kv = jax.random.split(jax.random.key(0, impl="rbg"))
  policy_params, value_params = init_params(policy, kp), init_params(value, kv)

  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 50, size=(B, T)).astype(np.int32)
  attention = np.zeros((B, T), np.int32)
  response = np.zeros((B, T), np.int32)
  for b in range(B - 1):
    end = PROMPT + rng.integers(4, T - PROMPT + 1)
    attention[b, :end] = 1
    response[b, PROMPT:end] = 1
  tokens[attention == 0] = 0                    # last row: all padding (a filler row)
  old_logprobs = policy_logprobs(policy, policy_params, tokens, attention)
  values = value_predictions(value, value_params, tokens, attention)
  old_logprobs = np.asarray(old_logprobs) * response
  values = np.asarray(values) * response
  rewards = np.where(response > 0, rng.normal(size=(B, T)), 0.0).astype(np.float32)
  advantages, returns = gae(rewards, values, response, gamma=1.0, lam=0.95)
  batch = dict(tokens=tokens, attention_mask=attention, response_mask=response,
               old_logprobs=old_logprobs, values=values, advantages=np.asarray(advantages),
               returns=np.asarray(returns),
               line_end_mask=np.zeros((B, T), np.int32))   # extra fields are ignored
  optimizers = {"policy": make_optimizer(3e-3, grad_clip=1.0),
                "value": make_optimizer(1e-2, grad_clip=1.0)}
  return dict(policy=policy, value=value, policy_params=policy_params,
              value_params=value_params, batch=batch, optimizers=optimizers)


def fresh_state(s):
  copy = lambda tree: jax.tree.map(jnp.array, tree)   # donation must not eat the originals
  return {"policy": TrainState.create(copy(s["policy_params"]), s["optimizers"]["policy"]),
          "value": TrainState.create(copy(s["value_params"]), s["optimizers"]["value"])}


def response_logprobs(s, params, batch):
  return np.asarray(policy_logprobs(s["policy"], params, batch["tokens"],
                                    batch["attention_mask"]))


def value_mse(s, params, batch):
  v = np.asarray(value_predictions(s["value"], params, batch["tokens"],
                                   batch["attention_mask"]))
  m = batch["response_mask"] > 0
  return float(np.mean((v[m] - batch["returns"][m]) ** 2))


# One compiled update serves the tests below: they also check that it is traced once.
CONFIG = ppo.PPOConfig(ppo_epochs=2, num_minibatches=2, ent_coef=0.0)


@pytest.fixture(scope="module")
def step(setup):
  s = setup
  update = ppo.make_ppo_update(s["policy"], s["value"], s["optimizers"], CONFIG)
  return make_train_step(chex.assert_max_traces(update, n=1))      # donates the state


def test_update_improves_policy_and_value_and_compiles_once(setup, step):
  s = setup
  batch = s["batch"]
  state = fresh_state(s)

  state, m1 = step(state, batch, jax.random.PRNGKey(1))
  assert set(["loss", "policy_loss", "value_loss", "entropy", "clip_frac", "approx_kl",
              "nonfinite", "policy/grad_norm", "value/grad_norm", "policy/lr",
              "explained_variance"]) <= set(m1)
  assert all(np.shape(v) == () for v in m1.values())
  assert float(m1["nonfinite"]) == 0.0
  assert int(state["policy"].step) == 4 and int(state["value"].step) == 4   # 2 epochs x 2

  # The log-probability of positively-advantaged tokens rises, of negative ones falls.
  mask = batch["response_mask"] > 0
  delta = (response_logprobs(s, state["policy"].params, batch)
           - response_logprobs(s, s["policy_params"], batch))
  adv = batch["advantages"]
  assert delta[mask & (adv > 0)].mean() > 0 > delta[mask & (adv < 0)].mean()
  assert float((adv * delta)[mask].sum()) > 0
  # The value moves toward the returns.
  assert value_mse(s, state["value"].params, batch) < value_mse(s, s["value_params"], batch)

  # A second call on the same batch (traced once, see `step`): the losses keep going down.
  state, m2 = step(state, batch, jax.random.PRNGKey(2))
  assert float(m2["policy_loss"]) < float(m1["policy_loss"])
  assert float(m2["value_loss"]) < float(m1["value_loss"])


def test_only_value_loss_leaves_policy_unchanged(setup, step):
  """Zero advantages and no entropy bonus: policy params stay bit-identical."""
  s = setup
  batch = dict(s["batch"], advantages=np.zeros((B, T), np.float32))
  state, metrics = step(fresh_state(s), batch, jax.random.PRNGKey(0))
  assert float(metrics["policy/grad_norm"]) == 0.0
  chex.assert_trees_all_equal(state["policy"].params, s["policy_params"])
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         state["value"].params, s["value_params"])
  assert all(jax.tree.leaves(changed))
  assert value_mse(s, state["value"].params, batch) < value_mse(s, s["value_params"], batch)

  # A non-finite batch is skipped, not applied.
  before = jax.tree.map(np.array, state["value"].params)
  bad = dict(batch, returns=np.full((B, T), np.nan, np.float32))
  state, metrics = step(state, bad, jax.random.PRNGKey(1))
  assert float(metrics["nonfinite"]) == 1.0
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, state["value"].params), before)


def test_joint_loss_composition(setup):
  """loss = policy_loss - ent_coef * entropy + vf_coef * value_loss, on one minibatch."""
  s = setup
  config = dataclasses.replace(CONFIG, ent_coef=0.05, vf_coef=0.7)
  loss_fn = ppo.make_ppo_loss(s["policy"], s["value"], config)
  batch = {k: jnp.asarray(s["batch"][k]) for k in ppo.UPDATE_KEYS}
  params = {"policy": s["policy_params"], "value": s["value_params"]}
  loss, metrics = jax.jit(loss_fn)(params, batch, jax.random.PRNGKey(0))
  np.testing.assert_allclose(
      loss, metrics["policy_loss"] - 0.05 * metrics["entropy"] + 0.7 * metrics["value_loss"],
      rtol=1e-6)
  # At the rollout params the ratio is 1, so nothing is clipped and the value loss is
  # half the squared error to the returns.
  np.testing.assert_allclose(metrics["ratio_mean"], 1.0, rtol=1e-5)
  assert float(metrics["clip_frac"]) == 0.0
  mask = batch["response_mask"] > 0
  err = np.asarray(batch["values"] - batch["returns"])[np.asarray(mask)]
  np.testing.assert_allclose(metrics["value_loss"], 0.5 * np.mean(err ** 2), rtol=1e-5)
  assert float(metrics["entropy"]) > 0


def test_update_validates_batch(setup):
  s = setup
  config = ppo.PPOConfig(ppo_epochs=1, num_minibatches=3)
  update = ppo.make_ppo_update(s["policy"], s["value"], s["optimizers"], config)
  with pytest.raises(ValueError, match="8 rows, which is not divisible by rl.num_minibatches=3"):
    jax.eval_shape(update, fresh_state(s), s["batch"], jax.random.PRNGKey(0))
  batch = {k: v for k, v in s["batch"].items() if k != "returns"}
  with pytest.raises(ValueError, match="returns"):
    jax.eval_shape(ppo.make_ppo_update(s["policy"], s["value"], s["optimizers"],
                                       dataclasses.replace(config, num_minibatches=2)),
                   fresh_state(s), batch, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"\['policy', 'value'\]"):
    ppo.make_ppo_update(s["policy"], s["value"], {"policy": s["optimizers"]["policy"]}, config)
  with pytest.raises(ValueError, match=r"needs optimizers for \['policy'\]"):
    ppo.make_ppo_update(s["policy"], None, s["optimizers"], config)


def test_critic_free_update_trains_the_policy_alone(setup):
  """Without a value model (RLOO / GRPO advantages) the batch needs no values or returns,
  and the policy moves as the joint update's policy does (the value loss has no gradient
  into the policy; each model clips its own gradient)."""
  s = setup
  lrs = {"policy": 3e-3, "value": 1e-2}
  optimizers = {k: make_optimizer(lr, grad_clip=1.0, eps=ADAM_EPS) for k, lr in lrs.items()}
  fresh = lambda names: {k: TrainState.create(jax.tree.map(jnp.array, s[f"{k}_params"]),
                                              optimizers[k]) for k in names}
  batch = {k: v for k, v in s["batch"].items() if k not in ppo.CRITIC_KEYS}
  alone = jax.jit(ppo.make_ppo_update(s["policy"], None, {"policy": optimizers["policy"]},
                                      CONFIG))
  new, metrics = alone(fresh(["policy"]), batch, jax.random.PRNGKey(3))
  assert set(new) == {"policy"} and "value_loss" not in metrics
  assert "explained_variance" not in metrics and float(metrics["nonfinite"]) == 0.0
  assert max_abs_difference(new["policy"].params, s["policy_params"]) > 0.5 * lrs["policy"]
  joint = jax.jit(ppo.make_ppo_update(s["policy"], s["value"], optimizers, CONFIG))
  both, _ = joint(fresh(["policy", "value"]), s["batch"], jax.random.PRNGKey(3))
  updates = CONFIG.ppo_epochs * CONFIG.num_minibatches      # another program: rounding only
  chex.assert_trees_all_close(new["policy"].params, both["policy"].params, rtol=0,
                              atol=adam_param_atol(lrs["policy"], updates))


def test_micro_batches_accumulate_the_whole_batch_gradient(setup):
  """Token-weighted accumulation over micro-batches = one pass over the whole minibatch.

  The rows have different response lengths (one has none), so equal weights would not do.
  """
  s = setup
  loss_fn = ppo.make_ppo_loss(s["policy"], s["value"], CONFIG)
  batch = {k: jnp.asarray(s["batch"][k]) for k in ppo.UPDATE_KEYS}
  params = {"policy": s["policy_params"], "value": s["value_params"]}
  rng = jax.random.PRNGKey(0)
  run = lambda k, key="response_mask": jax.jit(micro_value_and_grad(loss_fn, k, key))(
      params, batch, rng)
  (loss, metrics), grads = run(1)
  for k in (2, 4):
    (loss_k, metrics_k), grads_k = run(k)
    np.testing.assert_allclose(loss_k, loss, rtol=1e-5)
    chex.assert_trees_all_close(metrics_k, metrics, rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(grads_k, grads, rtol=1e-4, atol=1e-7)
  (unweighted, _), _ = run(4, None)
  assert abs(float(unweighted) - float(loss)) > 1e-3 * abs(float(loss))

  # Micro-batch i is rows i, i + k, ...: strided, so a row-sharded batch stays local.
  parts = split_micro_batches(batch, 4)
  np.testing.assert_array_equal(parts["tokens"][1], batch["tokens"][1::4])
  with pytest.raises(ValueError, match="8 rows does not split into 3 micro-batches"):
    split_micro_batches(batch, 3)

  # The whole PPO update with micro-batches ends where the plain one does. Adam with
  # eps = ADAM_EPS bounds how far rounding-level gradient differences (checked above at
  # atol 1e-7) can move the params: `tolerances.adam_param_atol` over the update's
  # epochs x minibatches steps (4e-5 for the value model's lr 1e-2). A wrong accumulation
  # changes most steps by O(lr), far outside it.
  lrs = {"policy": 3e-3, "value": 1e-2}
  optimizers = {k: make_optimizer(lr, grad_clip=1.0, eps=ADAM_EPS) for k, lr in lrs.items()}
  updates = CONFIG.ppo_epochs * CONFIG.num_minibatches
  micro = dataclasses.replace(CONFIG, micro_batches=2)
  states = {}
  for name, config in (("plain", CONFIG), ("micro", micro)):
    update = jax.jit(ppo.make_ppo_update(s["policy"], s["value"], optimizers, config))
    state = {k: TrainState.create(jax.tree.map(jnp.array, s[f"{k}_params"]), optimizers[k])
             for k in lrs}
    states[name], _ = update(state, s["batch"], jax.random.PRNGKey(3))
  for k, lr in lrs.items():
    moved = max_abs_difference(states["plain"][k].params, s[f"{k}_params"])
    assert moved > 0.5 * lr, (k, moved)                   # the update really moved them
    chex.assert_trees_all_close(states["micro"][k].params, states["plain"][k].params,
                                rtol=0, atol=adam_param_atol(lr, updates))
  with pytest.raises(ValueError, match="rl.num_minibatches=2 x rl.micro_batches=3"):
    dataclasses.replace(CONFIG, micro_batches=3).minibatch_size(8)
