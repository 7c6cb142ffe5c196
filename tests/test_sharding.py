"""Meshes, logical-axis rules, and the shardings of params, optimizer states and batches."""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from psgpo_jax import multihost, sharding
from psgpo_jax.models import CausalLM, ModelConfig, ScalarModel, init_params
from psgpo_jax.train_step import make_optimizer

# 8 query heads (divisible by tensor=8), 2 kv heads (not: replicated there).
CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=8, num_key_value_heads=2)


def _attn(tree):
  return tree["model"]["layers_0"]["self_attn"]


def test_make_mesh_fills_minus_one_and_uses_auto_axes():
  mesh = sharding.make_mesh((2, -1, 1))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  small = sharding.make_mesh((2,), ("data",), devices=jax.devices()[:2])
  assert small.devices.size == 2


@pytest.mark.parametrize("shape,message", [
    ((3, 1, 1), "needs 3 devices, but there are 8"),
    ((3, -1, 1), "multiple of 3 devices, but there are 8"),
    ((-1, -1, 1), "at most one axis may be -1"),
    ((8, 1), "has 2 axes"),
])
def test_make_mesh_errors_name_the_numbers(shape, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(shape)


def test_mesh_and_rules_from_config():
  mesh = sharding.mesh_from_config({"shape": (1, 4, 2)})
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  assert dict(sharding.mesh_from_config(None).shape)["data"] == 8
  rules = sharding.rules_from_config({"rules": {"mlp": None, "length": "tensor"}})
  assert rules["mlp"] == () and rules["length"] == ("tensor",)
  assert rules["batch"] == ("data", "fsdp")


def test_indivisible_dimension_falls_back_to_replication(caplog):
  mesh = sharding.make_mesh((1, 1, 8))
  sharding._LOGGED_FALLBACKS.clear()      # logged once per process: earlier tests may have
  with caplog.at_level(logging.INFO, logger="psgpo_jax.sharding"):
    spec = sharding.logical_to_mesh_spec(P("embed", "kv_heads", "head_dim"), (64, 2, 8), mesh)
  assert spec == P("fsdp", None, None)
  assert "kv_heads" in caplog.text and "replicating" in caplog.text
  assert sharding.logical_to_mesh_spec(P("embed", "heads", None), (64, 8, 8), mesh) == \
      P("fsdp", "tensor", None)


def test_rules_must_not_use_a_mesh_axis_twice():
  mesh = sharding.make_mesh((2, 2, 2))
  rules = sharding.make_rules({"mlp": "fsdp"})
  with pytest.raises(ValueError, match="mesh axis 'fsdp' twice"):
    sharding.logical_to_mesh_spec(P("embed", "mlp"), (64, 128), mesh, rules)
  with pytest.raises(ValueError, match="no sharding rule"):
    sharding.logical_to_mesh_spec(P("embedding",), (64,), mesh)


def test_rules_drop_mesh_axes_the_mesh_does_not_have():
  mesh = sharding.make_mesh((8,), ("data",))
  assert sharding.logical_to_mesh_spec(P("batch", "length"), (16, 4), mesh) == P("data", None)
  assert sharding.logical_to_mesh_spec(P("embed", "heads", "head_dim"), (64, 8, 8), mesh) == \
      P(None, None, None)


def test_param_shardings_follow_the_rules():
  mesh = sharding.make_mesh((2, 4, 1))
  specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(CausalLM(CFG), mesh))
  assert _attn(specs)["q_proj"]["kernel"] == P("fsdp", "tensor", None)
  assert _attn(specs)["q_proj"]["bias"] == P("tensor", None)
  assert _attn(specs)["o_proj"]["kernel"] == P("tensor", None, "fsdp")
  assert specs["model"]["embed_tokens"]["embedding"] == P("tensor", "fsdp")
  assert specs["model"]["layers_0"]["mlp"]["down_proj"]["kernel"] == P("tensor", "fsdp")
  assert specs["model"]["norm"]["scale"] == P(None)
  scalar = jax.tree.map(lambda s: s.spec, sharding.param_shardings(ScalarModel(CFG), mesh))
  assert scalar["score"]["kernel"] == P("fsdp", None)


def test_init_sharded_params_matches_unsharded_init_and_is_split():
  mesh = sharding.make_mesh((1, 2, 4))
  model = CausalLM(CFG)
  params = sharding.init_sharded_params(model, jax.random.PRNGKey(3), mesh)
  reference = jax.jit(lambda key: init_params(model, key))(jax.random.PRNGKey(3))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6),
               params, reference)
  q = _attn(params)["q_proj"]["kernel"]                       # [64, 8, 8]
  assert q.sharding.spec == P("fsdp", "tensor", None)
  assert {s.data.shape for s in q.addressable_shards} == {(32, 2, 8)}
  k = _attn(params)["k_proj"]["kernel"]                       # [64, 2, 8]: 2 kv heads on 4
  assert k.sharding.spec == P("fsdp", None, None)          # falls back to replication
  assert {s.data.shape for s in k.addressable_shards} == {(32, 2, 8)}


def test_opt_state_shardings_mirror_params_and_replicate_scalars():
  mesh = sharding.make_mesh((2, 2, 2))
  model = CausalLM(CFG)
  optimizer = make_optimizer(1e-3, weight_decay=0.1, warmup_steps=2, total_steps=10,
                             schedule="cosine")
  abstract = sharding.abstract_params(model)
  param_sh = sharding.param_shardings(model, mesh)
  opt_sh = sharding.opt_state_shardings(optimizer, abstract, param_sh, mesh)
  # Adam's mu and nu take their param's sharding; every other leaf is replicated.
  adam = [s for s in jax.tree.leaves(opt_sh, is_leaf=lambda x: hasattr(x, "mu"))
          if hasattr(s, "mu")][0]
  for moment in (adam.mu, adam.nu):
    assert jax.tree.map(lambda s: s.spec, moment) == jax.tree.map(lambda s: s.spec, param_sh)
  assert adam.count.spec == P()
  n_param_like = 2 * len(jax.tree.leaves(param_sh))
  assert sum(s.spec != P() for s in jax.tree.leaves(opt_sh)) == sum(
      s.spec != P() for s in jax.tree.leaves((adam.mu, adam.nu)))
  assert len(jax.tree.leaves(opt_sh)) > n_param_like          # counts, injected lr
  # The shardings are valid out_shardings of a real init.
  params = sharding.init_sharded_params(model, jax.random.PRNGKey(0), mesh)
  state = jax.jit(optimizer.init, out_shardings=opt_sh)(params)
  assert jax.tree.map(lambda x: x.sharding.spec, state) == jax.tree.map(lambda s: s.spec, opt_sh)


def test_opt_state_shardings_match_by_path_not_only_by_shape():
  mesh = sharding.make_mesh((1, 8, 1))
  params = {"a": jnp.zeros((8, 4)), "b": jnp.zeros((8, 4))}
  param_sh = {"a": sharding.NamedSharding(mesh, P("fsdp", None)),
              "b": sharding.NamedSharding(mesh, P(None, None))}
  opt_sh = sharding.opt_state_shardings(optax.adam(1e-3), params, param_sh, mesh)
  assert opt_sh[0].mu["a"].spec == P("fsdp", None)
  assert opt_sh[0].nu["b"].spec == P(None, None)


def test_shard_batch_splits_rows_and_replicates_indivisible_ones():
  mesh = sharding.make_mesh((2, 4, 1))
  batch = {"tokens": np.arange(8 * 5, dtype=np.int32).reshape(8, 5),
           "rewards": np.ones((8,), np.float32)}
  placed = sharding.shard_batch(batch, mesh)
  assert placed["tokens"].sharding.spec == P(("data", "fsdp"), None)
  assert {s.data.shape for s in placed["tokens"].addressable_shards} == {(1, 5)}
  np.testing.assert_array_equal(np.asarray(placed["tokens"]), batch["tokens"])
  odd = sharding.shard_batch({"tokens": np.zeros((6, 5), np.int32)}, mesh)
  assert odd["tokens"].sharding.spec == P(None, None)
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))


def test_global_batch_from_local_on_one_process_equals_shard_batch():
  mesh = sharding.make_mesh((4, 2, 1))
  local = {"tokens": np.arange(16 * 3, dtype=np.int32).reshape(16, 3)}
  glob = multihost.global_batch_from_local(local, mesh)["tokens"]
  assert glob.shape == (16, 3)
  assert glob.sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(glob), local["tokens"])
  assert multihost.is_main_process()
  assert multihost.initialize_distributed({"distributed": False}) is False


def test_rule_overrides_from_the_command_line_string():
  rules = sharding.rules_from_config({"rules": "embed:fsdp+tensor, mlp:, vocab:data"})
  assert rules["embed"] == ("fsdp", "tensor") and rules["mlp"] == ()
  assert rules["vocab"] == ("data",) and rules["batch"] == ("data", "fsdp")   # default kept
  assert sharding.rules_from_config({"rules": ""}) == sharding.make_rules()
  assert sharding.parse_rules({"mlp": None}) == {"mlp": None}
  with pytest.raises(ValueError, match="logical:axes"):
    sharding.parse_rules("embed=fsdp")
