"""Mesh parity: the PPO update, the PRM step and the sampler on four meshes vs one device.

For each mesh (data, fsdp, tensor) in (8,1,1), (2,4,1), (2,2,2), (1,1,8):
  * one PPO update (policy + value, 1 epoch x 2 minibatches, through
    `train_step.make_train_step` with `train_step.state_shardings`) gives the params,
    optimizer states and metrics of the single-device run;
  * one PRM step (`prm.train.make_prm_loss` through `train_step.gradient_update`) likewise;
  * the sampler, greedy and sampled, with FSDP/tensor-sharded params, emits the same tokens;
  * params and Adam moments are sharded as the rules say (`.sharding` of every leaf,
    against `sharding.logical_to_mesh_spec` of its logical axes, and the shard shapes).

`make_train_step` traces every update under the activation-sharding context
(`sharding.with_activation_sharding`: `nn.logical_axis_rules` + the mesh), so the
hidden-state constraints in `models/transformer.py` are active in both the PPO update and
the PRM step. Both must match the single-device numbers.

Adam's normalised step turns reduction-order noise in a gradient that is zero in exact
arithmetic (e.g. the k-projection bias, to which softmax is invariant) into a full
+-lr step. The optimizers here use eps = 1e-4, which bounds that amplification
(|delta update| <= lr * |delta grad| / eps) so fp32 params can be compared at
`tolerances.adam_param_atol(LR, 1)` = 1.1e-5 (one step at lr; the warmup step is at lr 0);
the test also checks that the update moved the params by about lr.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from psgpo_jax import sharding
from psgpo_jax import train_step as ts
from psgpo_jax.models import CausalLM, ModelConfig, ScalarModel, init_params, logical_axes
from psgpo_jax.prm.train import make_prm_loss
from psgpo_jax.rl.ppo import PPOConfig, make_ppo_update
from psgpo_jax.sampling import Sampler
from psgpo_jax.sampling_config import SamplingConfig
from tolerances import ADAM_EPS, adam_param_atol, max_abs_difference

# Dims divisible by 8 where it matters: 8 heads split over tensor=8; 4 kv heads split over
# tensor=2 and replicated over tensor=8 (the indivisible fallback).
CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=8, num_key_value_heads=4)
ROWS, LENGTH, PROMPT = 8, 16, 4
LR = 1e-2
MESHES = [pytest.param((8, 1, 1), id="data8"),
          pytest.param((2, 4, 1), id="data2-fsdp4", marks=pytest.mark.slow),
          pytest.param((2, 2, 2), id="data2-fsdp2-tensor2"),
          pytest.param((1, 1, 8), id="tensor8", marks=pytest.mark.slow)]
MODULES = {"policy": CausalLM(CFG), "value": ScalarModel(CFG)}


def host(tree):
  return jax.tree.map(np.asarray, tree)


def optimizer(lr=LR):
  """Warmup step at lr 0 (moments only), then lr; eps bounds Adam's noise amplification."""
  return ts.make_optimizer(lr, weight_decay=0.01, warmup_steps=1, total_steps=10,
                           schedule="cosine", eps=ADAM_EPS)


def assert_close(actual, expected):
  """Params after one step at lr <= LR within the Adam bound; Adam's moments (gradient
  averages) and counters agree to fp32 rounding of the gradients (rtol 1e-5)."""
  atol = adam_param_atol(LR, updates=1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol, rtol=1e-5),
               host(actual), host(expected))


# `value_clip_frac` counts (old + (v - old) - R)^2 > (v - R)^2: a tie in exact arithmetic
# wherever the value is not clipped, decided by float rounding; it gets a share's slack.
LOOSE_METRICS = {"value_clip_frac": 0.05}


def assert_metrics_close(actual, expected):
  """Metrics are means over the batch's tokens, summed in another order on a mesh: fp32
  rounding gives ~1e-7 relative per term, so rtol 1e-5 (atol 1e-6 for means near 0)."""
  assert set(actual) == set(expected)
  for key in expected:
    np.testing.assert_allclose(float(actual[key]), float(expected[key]), rtol=1e-5,
                               atol=LOOSE_METRICS.get(key, 1e-6), err_msg=key)


# ----------------------------------------------------------------------------- inputs


def lengths():
  return np.array([16, 12, 9, 16, 7, 14, 10, 5])


def ppo_batch(seed=0):
  """A rollout-shaped batch: right-padded [8, 16] rows, prompt of 4 tokens.

  Old log-probs sit near the random policy's (close to uniform: -log V) and old values
  near its value head's (close to 0), so ratios are near 1 and few tokens are clipped.
  """
  rs = np.random.RandomState(seed)
  mask = (np.arange(LENGTH)[None, :] < lengths()[:, None]).astype(np.int32)
  response = mask * (np.arange(LENGTH)[None, :] >= PROMPT)
  normal = lambda scale: (scale * rs.randn(ROWS, LENGTH)).astype(np.float32)
  return {
      "tokens": (rs.randint(1, CFG.vocab_size, (ROWS, LENGTH)) * mask).astype(np.int32),
      "attention_mask": mask,
      "response_mask": response.astype(np.int32),
      "old_logprobs": (-math.log(CFG.vocab_size) + normal(0.02)) * response,
      "values": normal(0.05) * response,
      "advantages": normal(1.0) * response,
      "returns": normal(0.5) * response,
  }


def prm_batch(seed=1):
  """PRM rows: +-1 targets at a few line-end positions of each response."""
  batch = ppo_batch(seed)
  rs = np.random.RandomState(seed)
  line_end = (rs.rand(ROWS, LENGTH) < 0.3) * batch["response_mask"]
  targets = np.where(rs.rand(ROWS, LENGTH) < 0.5, 1.0, -1.0) * line_end
  return {"tokens": batch["tokens"], "attention_mask": batch["attention_mask"],
          "line_end_mask": line_end.astype(np.int32), "targets": targets.astype(np.float32),
          "loss_mask": line_end.astype(np.float32)}


def prompts():
  rs = np.random.RandomState(3)
  return [rs.randint(1, CFG.vocab_size, (n,)).tolist() for n in (5, 3, 8, 1, 6, 2, 7, 4)]


SAMPLERS = {
    "greedy": SamplingConfig(max_new_tokens=6, greedy=True, eos_ids=(), min_prompt_bucket=8,
                             min_batch_bucket=8),
    "sampled": SamplingConfig(max_new_tokens=6, temperature=0.8, top_p=0.95, num_samples=2,
                              eos_ids=(), min_prompt_bucket=8, min_batch_bucket=8),
}


# ----------------------------------------------------------------------------- references


@pytest.fixture(scope="module")
def reference():
  """Everything on one device: initial states, updates and their results (host copies)."""
  rng = jax.random.PRNGKey(0)
  policy = init_params(MODULES["policy"], jax.random.fold_in(rng, 1))
  value = init_params(MODULES["value"], jax.random.fold_in(rng, 2))
  optimizers = {"policy": optimizer(), "value": optimizer(LR / 2)}
  ppo_initial = host({name: ts.TrainState.create(p, optimizers[name])
                      for name, p in (("policy", policy), ("value", value))})
  ppo_update = make_ppo_update(MODULES["policy"], MODULES["value"], optimizers,
                               PPOConfig(ppo_epochs=1, num_minibatches=2))
  ppo_state, ppo_metrics = ts.make_train_step(ppo_update, donate=False)(
      ppo_initial, ppo_batch(), jax.random.PRNGKey(5))

  prm_optimizer = optimizer()
  prm_initial = host(ts.TrainState.create(value, prm_optimizer))
  prm_update = ts.gradient_update(make_prm_loss(CFG, "mse"), prm_optimizer)
  prm_step = ts.make_train_step(prm_update, donate=False)
  prm_state, prm_metrics = prm_step(prm_initial, prm_batch(), jax.random.PRNGKey(6))
  # The PRM's first step runs at lr 0 (warmup); a second one moves the params.
  prm_state, prm_metrics = prm_step(prm_state, prm_batch(seed=2), jax.random.PRNGKey(7))

  samples = {name: Sampler(CFG, config).generate(policy, prompts(), jax.random.PRNGKey(9))
             for name, config in SAMPLERS.items()}
  return dict(optimizers=optimizers, ppo_initial=ppo_initial, ppo_update=ppo_update,
              ppo_state=host(ppo_state), ppo_metrics=host(ppo_metrics),
              prm_optimizer=prm_optimizer, prm_initial=prm_initial, prm_update=prm_update,
              prm_state=host(prm_state), prm_metrics=host(prm_metrics), samples=samples)


_PPO_RESULTS = {}


def sharded_ppo(reference, shape):
  """One sharded PPO update on `shape` (cached: the sharding test reuses its state)."""
  if shape not in _PPO_RESULTS:
    mesh = sharding.make_mesh(shape)
    shardings = ts.state_shardings(MODULES, reference["optimizers"], mesh)
    step = ts.make_train_step(reference["ppo_update"], mesh, shardings)
    state = ts.place_state(reference["ppo_initial"], shardings)
    state, metrics = step(state, ppo_batch(), jax.random.PRNGKey(5))
    _PPO_RESULTS[shape] = (mesh, shardings, state, metrics)
  return _PPO_RESULTS[shape]


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("shape", MESHES)
def test_ppo_update_matches_one_device(reference, shape):
  _, _, state, metrics = sharded_ppo(reference, shape)
  assert_metrics_close(metrics, reference["ppo_metrics"])
  assert float(metrics["nonfinite"]) == 0.0
  assert_close(state, reference["ppo_state"])
  for name, lr in (("policy", LR), ("value", LR / 2)):    # the second minibatch moved it
    moved = max_abs_difference(state[name].params, reference["ppo_initial"][name].params)
    assert 0.5 * lr < moved < 2 * lr, (name, moved)


@pytest.mark.parametrize("shape", MESHES)
def test_prm_step_matches_one_device(reference, shape):
  mesh = sharding.make_mesh(shape)
  shardings = ts.state_shardings(MODULES["value"], reference["prm_optimizer"], mesh)
  step = ts.make_train_step(reference["prm_update"], mesh, shardings)
  state = ts.place_state(reference["prm_initial"], shardings)
  state, _ = step(state, prm_batch(), jax.random.PRNGKey(6))
  state, metrics = step(state, prm_batch(seed=2), jax.random.PRNGKey(7))
  assert_metrics_close(metrics, reference["prm_metrics"])
  assert_close(state, reference["prm_state"])
  assert max_abs_difference(state.params, reference["prm_initial"].params) > 0.5 * LR
  assert state.params["score"]["kernel"].sharding.spec == \
      sharding.logical_to_mesh_spec(P("embed", None), (CFG.hidden_size, 1), mesh)


@pytest.mark.parametrize("shape", MESHES)
def test_sampler_matches_one_device(reference, shape):
  mesh, _, state, _ = sharded_ppo(reference, shape)
  # The reference sampled with the initial policy; sample with the same values, laid out
  # by the rules (FSDP / tensor shards), as the RL loop hands the trained policy over.
  placed = jax.device_put(reference["ppo_initial"]["policy"].params,
                          sharding.param_shardings(MODULES["policy"], mesh))
  for name, config in SAMPLERS.items():
    sampler = Sampler(CFG, config, mesh=mesh)
    assert sampler.data_size == shape[0] * shape[1]     # rows over data x fsdp (the rules)
    out = sampler.generate(placed, prompts(), jax.random.PRNGKey(9))
    expected = reference["samples"][name]
    np.testing.assert_array_equal(out.tokens, expected.tokens, err_msg=name)
    np.testing.assert_array_equal(out.lengths, expected.lengths, err_msg=name)
    # Same tokens; a log-softmax over 128 logits in another reduction order (fp32).
    np.testing.assert_allclose(out.logprobs, expected.logprobs, atol=1e-5, err_msg=name)
  assert len(out.tokens) == 2 * len(prompts())


def _expected_spec(logical, shape, mesh):
  return sharding.logical_to_mesh_spec(logical, shape, mesh)


@pytest.mark.parametrize("shape", MESHES)
def test_params_and_opt_states_are_sharded_as_the_rules_say(reference, shape):
  mesh, shardings, state, metrics = sharded_ppo(reference, shape)
  for name, module in MODULES.items():
    params = state[name].params
    logical = logical_axes(module)
    flat_logical = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, P))
    adam = state[name].opt_state[1]
    for leaf, spec, mu, nu in zip(jax.tree.leaves(params), flat_logical,
                                  jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu)):
      expected = _expected_spec(spec, leaf.shape, mesh)
      assert leaf.sharding.spec == mu.sharding.spec == nu.sharding.spec == expected
      ways = [1] * leaf.ndim
      for dim, axes in enumerate(tuple(expected)):
        for axis in ((axes,) if isinstance(axes, str) else axes or ()):
          ways[dim] *= mesh.shape[axis]
      want = tuple(s // w for s, w in zip(leaf.shape, ways))
      assert {s.data.shape for s in leaf.addressable_shards} == {want}
    assert adam.count.sharding.is_fully_replicated
    assert state[name].step.sharding.is_fully_replicated
  # The rules, spelled out for this config.
  attn = state["policy"].params["model"]["layers_0"]["self_attn"]
  assert attn["q_proj"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
  kv_heads = None if mesh.shape["tensor"] > 4 else "tensor"      # 4 kv heads on 8: replicated
  assert attn["k_proj"]["kernel"].sharding.spec == P("fsdp", kv_heads, None)
  assert state["value"].params["score"]["kernel"].sharding.spec[1] is None
  assert jax.tree.map(lambda x: x.sharding.spec, state) == \
      jax.tree.map(lambda s: s.spec, shardings)
  assert all(m.sharding.is_fully_replicated for m in jax.tree.leaves(metrics))


def test_activation_constraints_apply_only_under_rules():
  """The hidden-state constraints appear in a mesh trace and are absent otherwise."""
  model, tokens = MODULES["policy"], jnp.zeros((ROWS, LENGTH), jnp.int32)
  params = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
  forward = lambda p, t: model.apply({"params": p}, t)
  plain = str(jax.make_jaxpr(forward)(params, tokens))
  assert "sharding_constraint" not in plain
  mesh = sharding.make_mesh((2, 4, 1))
  constrained = str(jax.make_jaxpr(sharding.with_activation_sharding(forward, mesh))(
      params, tokens))
  # The embedding table (gathered over fsdp) and the hidden states after the embedding and
  # after each layer.
  assert constrained.count("sharding_constraint") == 2 + CFG.num_hidden_layers


def test_train_step_on_a_mesh_traces_the_activation_constraints(reference):
  """`make_train_step` with a mesh wraps the update in `with_activation_sharding`."""
  mesh = sharding.make_mesh((2, 4, 1))
  shardings = ts.state_shardings(MODULES["value"], reference["prm_optimizer"], mesh)
  step = ts.make_train_step(reference["prm_update"], mesh, shardings, donate=False)
  jaxpr = str(jax.make_jaxpr(step)(reference["prm_initial"], prm_batch(),
                                   jax.random.PRNGKey(6)))
  assert "sharding_constraint" in jaxpr
  plain = str(jax.make_jaxpr(ts.make_train_step(reference["prm_update"], donate=False))(
      reference["prm_initial"], prm_batch(), jax.random.PRNGKey(6)))
  assert "sharding_constraint" not in plain

