"""The step builder: optimizer, non-finite guard, joint updates, jit/donation, mesh parity."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from psgpo_jax import sharding
from psgpo_jax import train_step as ts
from psgpo_jax.models import CausalLM, ModelConfig, ScalarModel
from tolerances import ADAM_EPS, adam_param_atol

CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=8, num_key_value_heads=2)
MODEL = CausalLM(CFG)


def lm_loss(params, batch, rng):
  """Next-token cross-entropy over masked tokens: tokens, mask [B, T]."""
  del rng
  logits = MODEL.apply({"params": params}, batch["tokens"], attention_mask=batch["mask"])
  logp = jax.nn.log_softmax(logits[:, :-1])
  nll = -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
  mask = batch["mask"][:, 1:].astype(jnp.float32)
  loss = jnp.sum(nll * mask) / jnp.sum(mask)     # NaN when the mask is empty
  return loss, {"tokens": jnp.sum(mask)}


def lm_batches(n, batch=8, length=8, seed=0):
  rs = np.random.RandomState(seed)
  return [{"tokens": rs.randint(0, CFG.vocab_size, (batch, length)).astype(np.int32),
           "mask": np.ones((batch, length), np.int32)} for _ in range(n)]


def quad_loss(params, batch, rng):
  """A least-squares loss on {'w': [D, K], 'b': [K]}; x [B, D], y [B, K]."""
  del rng
  pred = batch["x"] @ params["w"] + params["b"]
  return jnp.mean((pred - batch["y"]) ** 2), {}


def quad_params(seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return {"w": jax.random.normal(k1, (4, 3)), "b": jax.random.normal(k2, (3,))}


def quad_batch(seed=1, rows=6):
  rs = np.random.RandomState(seed)
  return {"x": rs.randn(rows, 4).astype(np.float32), "y": rs.randn(rows, 3).astype(np.float32)}


def host(tree):
  return jax.tree.map(np.asarray, tree)


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, host(a), host(b))


# ----------------------------------------------------------------------------- optimizer


def test_make_optimizer_equals_clip_then_optax_adamw_and_reports_the_schedule():
  kwargs = dict(lr=0.1, weight_decay=0.05, grad_clip=0.5, warmup_steps=2, total_steps=6,
                b1=0.8, b2=0.95, schedule="cosine")
  ours = ts.make_optimizer(**kwargs)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 0.1, 2, 6, 0.0)
  reference = optax.chain(
      optax.clip_by_global_norm(0.5),
      optax.adamw(schedule, b1=0.8, b2=0.95, weight_decay=0.05,
                  mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))
  update = jax.jit(ts.gradient_update(quad_loss, ours))

  @jax.jit
  def ref_update(params, opt_state, batch):
    grads = jax.grad(lambda p: quad_loss(p, batch, None)[0])(params)
    updates, opt_state = reference.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  state = ts.TrainState.create(quad_params(), ours)
  ref_params, ref_opt = quad_params(), reference.init(quad_params())
  for i in range(5):
    batch = quad_batch(seed=i)
    state, metrics = update(state, batch, jax.random.PRNGKey(0))
    ref_params, ref_opt = ref_update(ref_params, ref_opt, batch)
    np.testing.assert_allclose(metrics["lr"], schedule(i), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 host(state.params), host(ref_params))
  assert int(state.step) == 5


def test_constant_schedule_warms_up_then_stays():
  schedule = ts.make_schedule(1.0, warmup_steps=4, schedule="constant")
  np.testing.assert_allclose([schedule(i) for i in (0, 2, 4, 100)], [0.0, 0.5, 1.0, 1.0])
  assert ts.make_schedule(0.3)(7) == pytest.approx(0.3)
  with pytest.raises(ValueError, match="total_steps"):
    ts.make_schedule(1.0, warmup_steps=5, total_steps=5, schedule="cosine")
  with pytest.raises(ValueError, match="schedule="):
    ts.make_schedule(1.0, schedule="linear")



def test_wsd_schedule_warms_up_holds_then_decays_linearly_over_the_last_fifth():
  schedule = ts.make_schedule(1.0, warmup_steps=10, total_steps=110, schedule="wsd")
  steps = (0, 5, 10, 50, 90, 95, 100, 110)
  # Warmup 10 steps; then 100 steps: 80 at 1.0, 20 decaying from 1.0 to 0 at step 110.
  np.testing.assert_allclose([schedule(i) for i in steps],
                             [0.0, 0.5, 1.0, 1.0, 1.0, 0.75, 0.5, 0.0], atol=1e-6)
  no_warmup = ts.make_schedule(2.0, total_steps=10, schedule="wsd")
  np.testing.assert_allclose([no_warmup(i) for i in (0, 8, 9, 10)], [2.0, 2.0, 1.0, 0.0])
  with pytest.raises(ValueError, match="total_steps"):
    ts.make_schedule(1.0, warmup_steps=5, total_steps=5, schedule="wsd")

# ----------------------------------------------------------------------------- guard


def test_nan_loss_leaves_params_and_opt_state_unchanged(lm_run):
  good, other = lm_batches(2)
  bad = {**good, "mask": np.zeros_like(good["mask"])}           # 0/0 -> NaN loss
  step, rng = lm_run["step"], jax.random.PRNGKey(1)
  state1, m1 = step(lm_run["initial"], good, rng)
  assert float(m1["nonfinite"]) == 0.0 and np.isfinite(float(m1["loss"]))
  state2, m2 = step(state1, bad, rng)
  assert float(m2["nonfinite"]) == 1.0 and np.isnan(float(m2["loss"]))
  assert_trees_equal(state2.params, state1.params)
  assert_trees_equal(state2.opt_state, state1.opt_state)
  assert int(state2.step) == 2
  # The skipped step leaves no trace: the next update equals one that never saw it.
  after_skip, _ = step(state2, other, rng)
  assert_trees_equal(after_skip.params, lm_run["states"][-1].params)


def test_nonfinite_gradient_with_finite_loss_is_skipped():
  def loss_fn(params, batch, rng):   # sqrt'(0) = inf: finite loss, NaN gradient
    del rng
    return jnp.sum(jnp.sqrt(jnp.abs(params["w"] * batch["x"]))), {}
  optimizer = ts.make_optimizer(0.1)
  state = ts.TrainState.create({"w": jnp.ones((3,))}, optimizer)
  new, metrics = jax.jit(ts.gradient_update(loss_fn, optimizer))(
      state, {"x": jnp.zeros((3,))}, jax.random.PRNGKey(0))
  assert float(metrics["loss"]) == 0.0 and float(metrics["nonfinite"]) == 1.0
  assert_trees_equal(new.params, state.params)


# ----------------------------------------------------------------------------- joint updates


def test_multi_gradient_update_equals_separate_updates_with_own_learning_rates():
  optimizers = {"policy": ts.make_optimizer(0.1), "value": ts.make_optimizer(0.01, grad_clip=None)}
  params = {"policy": quad_params(0), "value": quad_params(1)}
  batch = {"a": quad_batch(2), "b": quad_batch(3)}

  def joint(p, batch, rng):
    la, _ = quad_loss(p["policy"], batch["a"], rng)
    lb, _ = quad_loss(p["value"], batch["b"], rng)
    return la + lb, {"policy_loss": la}

  states = {k: ts.TrainState.create(params[k], optimizers[k]) for k in params}
  new, metrics = jax.jit(ts.multi_gradient_update(joint, optimizers))(
      states, batch, jax.random.PRNGKey(0))
  for name, sub in (("policy", "a"), ("value", "b")):
    alone, own = jax.jit(ts.gradient_update(quad_loss, optimizers[name]))(
        states[name], batch[sub], jax.random.PRNGKey(0))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 host(new[name].params), host(alone.params))
    np.testing.assert_allclose(metrics[f"{name}/grad_norm"], own["grad_norm"], rtol=1e-6)
  np.testing.assert_allclose([metrics["policy/lr"], metrics["value/lr"]], [0.1, 0.01])
  assert "policy_loss" in metrics and float(metrics["nonfinite"]) == 0.0

  def poisoned(p, batch, rng):       # value gradient NaN: neither model may move
    loss, aux = joint(p, batch, rng)
    return loss + jnp.sum(jnp.sqrt(jnp.abs(p["value"]["b"] * 0.0))), aux
  skipped, metrics = jax.jit(ts.multi_gradient_update(poisoned, optimizers))(
      states, batch, jax.random.PRNGKey(0))
  assert float(metrics["nonfinite"]) == 1.0
  assert_trees_equal({k: s.params for k, s in skipped.items()},
                     {k: s.params for k, s in states.items()})


def test_update_composes_inside_lax_scan():
  optimizer = ts.make_optimizer(0.05, weight_decay=0.01)
  update = ts.gradient_update(quad_loss, optimizer)
  minibatches = [quad_batch(seed) for seed in range(4)]
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *minibatches)
  state = ts.TrainState.create(quad_params(), optimizer)

  @jax.jit
  def scanned(state, stacked):
    return jax.lax.scan(lambda s, b: update(s, b, jax.random.PRNGKey(0)), state, stacked)

  scan_state, scan_metrics = scanned(state, stacked)
  loop_state = state
  for b in minibatches:
    loop_state, _ = jax.jit(update)(loop_state, b, jax.random.PRNGKey(0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               host(scan_state.params), host(loop_state.params))
  assert scan_metrics["loss"].shape == (4,) and int(scan_state.step) == 4


# ----------------------------------------------------------------------------- jit


def test_train_step_compiles_once_and_donates_the_state():
  optimizer = ts.make_optimizer(0.05)
  update = chex.assert_max_traces(ts.gradient_update(quad_loss, optimizer), n=1)
  step = ts.make_train_step(update)
  state = ts.TrainState.create(quad_params(), optimizer)
  for seed in range(3):
    old = state
    state, _ = step(state, quad_batch(seed), jax.random.PRNGKey(seed))
    assert old.params["w"].is_deleted()
  with pytest.raises(AssertionError, match="traced > 1 times"):
    step(state, quad_batch(0, rows=5), jax.random.PRNGKey(0))     # a new shape re-traces
  chex.clear_trace_counter()


# ----------------------------------------------------------------------------- meshes


LM_LR = 1e-2
# Sharded vs one-device params after the reference's steps: one real step at <= LM_LR (the
# first is warmup at lr 0), within the Adam bound of tests/tolerances.py.
LM_PARAM_ATOL = adam_param_atol(LM_LR, updates=1)


@pytest.fixture(scope="module")
def lm_run():
  """Two steps of the tiny LM on one device: the reference for the sharded runs.

  Returns a dict: optimizer, update (the pure function), step (jitted, no donation),
  initial (host copy of the initial state), losses and states (host) after each step.
  """
  optimizer = ts.make_optimizer(LM_LR, weight_decay=0.01, warmup_steps=1, total_steps=10,
                                schedule="cosine", eps=ADAM_EPS)
  update = ts.gradient_update(lm_loss, optimizer)
  step = ts.make_train_step(update, donate=False)
  initial = host(ts.init_train_state(MODEL, optimizer, jax.random.PRNGKey(0)))
  state, losses, states = initial, [], []
  for batch in lm_batches(2):
    state, metrics = step(state, batch, jax.random.PRNGKey(1))
    losses.append(float(metrics["loss"]))
    states.append(host(state))
  return dict(optimizer=optimizer, update=update, step=step, initial=initial, losses=losses,
              states=states)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)])
def test_sharded_training_matches_one_device(shape, lm_run):
  optimizer = lm_run["optimizer"]
  mesh = sharding.make_mesh(shape)
  shardings = ts.state_shardings(MODEL, optimizer, mesh)
  if shape == (2, 2, 2):   # created sharded: same values as the unsharded init
    state = ts.init_train_state(MODEL, optimizer, jax.random.PRNGKey(0), mesh)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 host(state), lm_run["initial"])
  else:
    state = ts.place_state(lm_run["initial"], shardings)
  step = ts.make_train_step(lm_run["update"], mesh, shardings)
  losses = []
  for batch in lm_batches(2):
    state, metrics = step(state, batch, jax.random.PRNGKey(1))
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses, lm_run["losses"], rtol=1e-6)   # a mean, fp32 order
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=LM_PARAM_ATOL, rtol=1e-5),
               host(state), lm_run["states"][-1])
  assert jax.tree.map(lambda x: x.sharding.spec, state) == \
      jax.tree.map(lambda s: s.spec, shardings)
  # Sharded as the rules say, params and Adam moments alike; metrics replicated.
  q = state.params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  k = state.params["model"]["layers_0"]["self_attn"]["k_proj"]["kernel"]
  adam = state.opt_state[1]
  mu_q = adam.mu["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == mu_q.sharding.spec == P("fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (64 // mesh.shape["fsdp"],
                                                8 // mesh.shape["tensor"], 8)
  kv_spec = P("fsdp", None, None) if mesh.shape["tensor"] > 2 else P("fsdp", "tensor", None)
  assert k.sharding.spec == kv_spec
  assert state.params["model"]["embed_tokens"]["embedding"].sharding.spec == P("tensor", "fsdp")
  assert metrics["loss"].sharding.is_fully_replicated
  assert state.step.sharding.is_fully_replicated and int(state.step) == 2


def test_policy_and_value_update_jointly_on_a_mesh(lm_run):
  """A PPO-shaped step: two sharded TrainStates, one joint loss, one optimizer each.

  The loss is separable, so the policy must move exactly as in the reference LM run, and
  the value model by Adam's first step (|delta| = lr * |g| / (|g| + eps) <= its own lr).
  """
  value_model = ScalarModel(CFG)
  modules = {"policy": MODEL, "value": value_model}
  optimizers = {"policy": lm_run["optimizer"], "value": ts.make_optimizer(1e-3)}

  def joint(params, batch, rng):
    policy_loss, _ = lm_loss(params["policy"], batch, rng)
    values = value_model.apply({"params": params["value"]}, batch["tokens"])
    value_loss = jnp.mean((values - 1.0) ** 2)
    return policy_loss + value_loss, {"value_loss": value_loss}

  # The value model starts from the policy's backbone with a fresh head (as from the PRM).
  head = {"kernel": 0.02 * np.random.RandomState(0).randn(CFG.hidden_size, 1).astype(np.float32),
          "bias": np.zeros((1,), np.float32)}
  value_params = {"model": lm_run["initial"].params["model"], "score": head}
  initial = {"policy": lm_run["states"][0],     # after the warmup step (lr 0)
             "value": host(ts.TrainState.create(value_params, optimizers["value"]))}
  mesh = sharding.make_mesh((2, 2, 2))
  shardings = ts.state_shardings(modules, optimizers, mesh)
  step = ts.make_train_step(ts.multi_gradient_update(joint, optimizers), mesh, shardings)
  new, metrics = step(ts.place_state(initial, shardings), lm_batches(2)[1],
                      jax.random.PRNGKey(1))

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=LM_PARAM_ATOL, rtol=1e-5),
               host(new["policy"]), lm_run["states"][1])
  deltas = np.concatenate([np.abs(a - b).ravel() for a, b in zip(
      jax.tree.leaves(host(new["value"].params)), jax.tree.leaves(value_params))])
  assert 0.9e-3 < deltas.max() <= 1e-3 + 1e-6          # float32 rounding of params ~1
  assert np.mean(deltas > 0) > 0.5
  np.testing.assert_allclose([metrics["policy/lr"], metrics["value/lr"]], [1e-2, 1e-3])
  assert float(metrics["nonfinite"]) == 0.0 and np.isfinite(float(metrics["value_loss"]))
  assert jax.tree.map(lambda x: x.sharding.spec, new) == \
      jax.tree.map(lambda s: s.spec, shardings)
  assert new["value"].params["score"]["kernel"].sharding.spec == P("fsdp", None)
