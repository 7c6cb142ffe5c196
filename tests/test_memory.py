"""The memory planner: exact param/optimizer bytes against real arrays, and refusals."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from psgpo_jax import memory, sharding
from psgpo_jax import train_step as ts
from psgpo_jax.models import CausalLM, ModelConfig, ScalarModel, init_params
from psgpo_jax.models.transformer import init_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=8, num_key_value_heads=4)
# Qwen2-7B's shapes (bfloat16): nothing is allocated, only traced.
CFG_7B = ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                     num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     tie_word_embeddings=False, dtype="bfloat16", param_dtype="bfloat16")
SIZES = dict(batch=8, seq_len=16, rollout_batch=8, max_len=32)


def item(plan, name):
  return next(i.bytes for i in plan.items if i.name == name)


def per_device_bytes(tree):
  """The largest, over devices, of the bytes of `tree`'s shards held on one device."""
  totals = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
  return max(totals.values())


def test_one_device_param_and_optimizer_bytes_equal_the_real_arrays():
  plan = memory.plan_memory(CFG, (1, 1, 1), **SIZES)
  optimizer = ts.make_optimizer(1e-4, weight_decay=0.01)
  for name, module in (("policy", CausalLM(CFG)), ("value", ScalarModel(CFG)),
                       ("reference", CausalLM(CFG)), ("prm", ScalarModel(CFG))):
    params = init_params(module, jax.random.PRNGKey(0))
    nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
    assert item(plan, f"params/{name}") == nbytes
    if name in ("policy", "value"):
      assert item(plan, f"grads/{name}") == nbytes
      opt_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(optimizer.init(params)))
      assert item(plan, f"opt_state/{name}") == opt_bytes
      assert 2 * nbytes < opt_bytes < 2 * nbytes + 64       # two moments + a few scalars
    else:
      assert not any(i.name.endswith(f"/{name}") and not i.name.startswith("params/")
                     for i in plan.items)                  # frozen: params only
  assert plan.total == sum(i.bytes for i in plan.items)


def test_sharded_bytes_divide_as_the_rules_say():
  mesh = sharding.make_mesh((2, 2, 2))
  plan = memory.plan_memory(CFG, (2, 2, 2), **SIZES)
  optimizer = ts.make_optimizer(1e-4, weight_decay=0.01)
  for name, module in (("policy", CausalLM(CFG)), ("value", ScalarModel(CFG))):
    params = sharding.init_sharded_params(module, jax.random.PRNGKey(0), mesh)
    assert item(plan, f"params/{name}") == per_device_bytes(params)
    opt_sh = sharding.opt_state_shardings(optimizer, params,
                                          sharding.param_shardings(module, mesh), mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(params)
    assert item(plan, f"opt_state/{name}") == per_device_bytes(opt_state)
  # By hand: q_proj [64, 8, 8] is (fsdp, tensor, -): a quarter per device; norms are
  # replicated; the [128, 64] embedding is (tensor, fsdp).
  d, h, dh, f, v, kv = 64, 8, 8, 128, 128, 4
  by_hand = 4 * (v * d // 4 + d                       # embedding, final norm
                 + (d * h * dh + d * 2 * kv * dh + h * dh * d) // 4   # q, k, v, o kernels
                 + (h * dh + 2 * kv * dh) // 2         # q, k, v biases: heads over tensor
                 + 3 * d * f // 4 + 2 * d)             # mlp kernels, two layer norms
  assert item(plan, "params/policy") == by_hand
  single = memory.plan_memory(CFG, (1, 1, 1), **SIZES)
  assert item(single, "params/policy") > 3.5 * item(plan, "params/policy")


def test_kv_cache_equals_the_sampler_cache_and_splits_as_the_rules_say():
  one = memory.plan_memory(CFG, (1, 1, 1), **SIZES)
  cache = init_cache(CFG, SIZES["rollout_batch"], SIZES["max_len"])
  assert item(one, "kv_cache") == sum(x.nbytes for x in jax.tree.leaves(cache))
  split = memory.plan_memory(CFG, (2, 2, 2), **SIZES)    # rows over data x fsdp, kv heads
  assert item(split, "kv_cache") == item(one, "kv_cache") // 8     # over tensor
  fsdp = memory.plan_memory(CFG, (1, 4, 1), **SIZES)     # an FSDP mesh splits the rows too
  assert item(fsdp, "kv_cache") == item(one, "kv_cache") // 4
  wide = memory.plan_memory(CFG, (1, 1, 8), **SIZES)     # 4 kv heads do not split 8 ways
  assert item(wide, "kv_cache") == item(one, "kv_cache")


def _compiled_gradient_temp_bytes(module, batch, seq_len):
  """XLA's count of the temporary bytes of one gradient step of `module` (one device)."""
  params = init_params(module, jax.random.PRNGKey(0))
  tokens = jax.numpy.zeros((batch, seq_len), jax.numpy.int32)

  def loss(p, tokens):
    out = module.apply({"params": p}, tokens).astype(jax.numpy.float32)
    if out.ndim == 3:                                      # the causal LM: token NLL
      out = jax.numpy.take_along_axis(jax.nn.log_softmax(out), tokens[..., None], -1)
    return -out.mean()

  compiled = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("layers,hidden,vocab,batch,seq_len", [
    (2, 128, 512, 4, 256), (4, 256, 2048, 8, 64)])
def test_activation_estimate_is_within_a_quarter_of_the_compilers_count(layers, hidden, vocab,
                                                                          batch, seq_len):
  """The planner's activations against `memory_analysis()` of the compiled gradient
  step, for the causal LM and the scalar head (without remat: XLA's CPU scheduler does
  not realise remat's savings, so the remat estimate is checked only for its order)."""
  cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                    num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4)
  mesh = memory._abstract_mesh((1, 1, 1), sharding.AXIS_NAMES)
  rules = sharding.make_rules()
  for module, with_logits in ((CausalLM(cfg), True), (ScalarModel(cfg), False)):
    planned = memory.activation_bytes(cfg, mesh, rules, batch, seq_len, remat=False,
                                      with_logits=with_logits)
    compiled = _compiled_gradient_temp_bytes(module, batch, seq_len)
    assert 0.75 < planned / compiled < 1.25, (type(module).__name__, planned, compiled)
    assert memory.activation_bytes(cfg, mesh, rules, batch, seq_len, remat=True,
                                   with_logits=with_logits) < planned


def test_activations_split_over_rows_and_shrink_with_query_blocks():
  one = memory.plan_memory(CFG, (1, 1, 1), **SIZES)
  rows = memory.plan_memory(CFG, (2, 4, 1), **SIZES)     # rows over data x fsdp = 8 devices
  assert item(rows, "activations/value") == item(one, "activations/value") // 8
  blocked = memory.plan_memory(CFG.replace(attention_query_block=4), (1, 1, 1), **SIZES)
  assert item(blocked, "activations/value") < item(one, "activations/value")


def test_a_7b_config_on_a_16gb_device_is_refused_with_the_number():
  plan = memory.plan_memory(CFG_7B, (1, 1, 1), batch=4, seq_len=1024, rollout_batch=64,
                            max_len=1024, device_bytes=16 * memory.GiB)
  assert item(plan, "params/policy") == CFG_7B.num_params() * 2   # bfloat16, untied head
  assert plan.fits is False
  with pytest.raises(memory.NotEnoughMemoryError) as info:
    memory.check_fits(plan)
  message = str(info.value)
  assert f"{plan.total:,} bytes" in message and format(16 * memory.GiB, ",") in message
  assert memory.format_bytes(plan.total) in message
  assert "activations/policy" in message                 # the largest item is named
  table = memory.format_plan(plan)
  assert "DOES NOT FIT" in table and "kv_cache" in table
  # Sharded over 256 chips of 95 GiB with remat it fits.
  pod = memory.plan_memory(CFG_7B, (1, -1, 4), batch=64, seq_len=1024, rollout_batch=256,
                           max_len=1024, remat=True, num_devices=256)
  assert pod.mesh_shape == (1, 64, 4)
  memory.check_fits(pod, 95 * memory.GiB)


def test_check_fits_needs_a_capacity_on_cpu_and_validates_arguments():
  plan = memory.plan_memory(CFG, (8, 1, 1), **SIZES)
  if plan.device_bytes is None:
    with pytest.raises(ValueError, match="needs device_bytes"):
      memory.check_fits(plan)
  assert memory.check_fits(plan, 2**30) is plan
  assert memory.plan_memory(CFG, (-1, 1, 1), **SIZES).mesh_shape == (jax.device_count(), 1, 1)
  with pytest.raises(ValueError, match="subset"):
    memory.plan_memory(CFG, (1, 1, 1), **SIZES, models=("policy",))
  with pytest.raises(ValueError, match="optimizer="):
    memory.plan_memory(CFG, (1, 1, 1), **SIZES, optimizer="lion")
  sgd = memory.plan_memory(CFG, (1, 1, 1), **SIZES, optimizer="sgd")
  assert not any(i.name.startswith("opt_state/") for i in sgd.items)


def test_cli_prints_the_table_and_refuses_a_config_that_does_not_fit():
  def cli(*args):
    return subprocess.run([sys.executable, "-m", "experiments.plan_memory", "--config",
                           "configs/quickstart.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  ok = cli("--config.mesh.shape=(2,2,2)", "--num_devices=8", "--device_gb=16")
  assert ok.returncode == 0, ok.stderr
  assert "mesh (data=2, fsdp=2, tensor=2)" in ok.stdout and "fits" in ok.stdout
  assert "params/policy" in ok.stdout and "kv_cache" in ok.stdout
  refused = cli("--device_gb=0.01")
  assert refused.returncode == 1
  assert "error: This config needs" in refused.stderr and "per device" in refused.stderr
