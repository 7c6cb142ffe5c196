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


def test_kv_cache_and_activation_estimates():
  one = memory.plan_memory(CFG, (1, 1, 1), **SIZES)
  # rollout_batch x max_len x layers x (k, v) x kv_heads x head_dim x 4 bytes.
  assert item(one, "kv_cache") == 8 * 32 * 1 * 2 * 4 * 8 * 4
  split = memory.plan_memory(CFG, (2, 2, 2), **SIZES)    # rows over data, kv heads over tensor
  assert item(split, "kv_cache") == item(one, "kv_cache") // 4
  wide = memory.plan_memory(CFG, (1, 1, 8), **SIZES)     # 4 kv heads do not split 8 ways
  assert item(wide, "kv_cache") == item(one, "kv_cache")
  # The documented formula, one layer, one device: b=4 bytes, B=8, T=16.
  b_, t, d, h, kv, dh, f, v = 8, 16, 64, 8, 4, 8, 128, 128
  layer = b_ * t * (4 * d + (2 * h + 2 * kv) * dh + 3 * f) * 4 + b_ * h * t * t * 8
  assert item(one, "activations/policy") == layer + 2 * b_ * t * d * 4 + 2 * b_ * t * v * 4
  assert item(one, "activations/value") == layer + 2 * b_ * t * d * 4
  # Rows split over data x fsdp = 8 devices.
  rows = memory.plan_memory(CFG, (2, 4, 1), **SIZES)
  assert item(rows, "activations/value") == item(one, "activations/value") // 8
  # Causal attention in 4 query blocks of 4 keeps (4 + 1) / (2 * 4) of the scores.
  blocked = memory.plan_memory(CFG.replace(attention_query_block=4), (1, 1, 1), **SIZES)
  assert (item(one, "activations/value") - item(blocked, "activations/value")
          == b_ * h * t * t * 8 * 3 // 8)
  deep = CFG.replace(num_hidden_layers=8)
  assert (item(memory.plan_memory(deep, (1, 1, 1), **SIZES, remat=True), "activations/policy")
          < item(memory.plan_memory(deep, (1, 1, 1), **SIZES), "activations/policy"))


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
