"""PPO step throughput: tokens/s and achieved FLOP/s against the machine's matmul peak.

One PPO update (policy CausalLM + value ScalarModel, one joint gradient step each) of the
25M-parameter Qwen2 config on a batch of 16 x 512 tokens, jitted through the shared step
builder exactly as the trainer runs it. The step's gradient is accumulated over
`--micro_batches` parts of the batch (`rl.micro_batches`; the same update): 4 parts of
4 x 512 keep each part's activations in cache, where one pass over 16 x 512 spends much
of its time on page faults and memory traffic.

Model FLOPs per trained token: 6 x (matmul weights) for each model's forward + backward,
plus attention scores and mixing (2 x 2 x T x d per layer forward, x3 with backward); the
value model has no LM head. The baseline is a jitted float32 matmul measured in the same
run (the practical peak).

Usage: python benchmarks/bench_train_step.py [--batch 16] [--length 512] [--repeats 3]
       [--micro_batches 4] [--remat] [--mesh 1,1,1]   (data,fsdp,tensor; needs that many
       devices)
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax                                                   # noqa: E402
import jax.numpy as jnp                                      # noqa: E402
import numpy as np                                           # noqa: E402

from benchmarks.common import MODEL_25M, best_of, matmul_flops_per_s   # noqa: E402
from psgpo_jax import sharding, train_step                   # noqa: E402
from psgpo_jax.models import CausalLM, ScalarModel, init_params   # noqa: E402
from psgpo_jax.rl import ppo                                 # noqa: E402


def ppo_flops_per_token(cfg, length: int) -> float:
  """Training FLOPs per token of one policy + value gradient step."""
  d, layers, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
  backbone = cfg.num_params(with_head=False) - v * d        # matmul weights (no embedding)
  attention = 2 * 2 * length * cfg.num_attention_heads * cfg.kv_head_dim * layers
  policy = 6 * (backbone + v * d) + 3 * attention           # LM head is a matmul (tied)
  value = 6 * backbone + 3 * attention
  return float(policy + value)


def make_batch(cfg, batch: int, length: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  prompt = length // 4
  response_mask = np.zeros((batch, length), np.int32)
  response_mask[:, prompt:] = 1
  return {
      "tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, length)), jnp.int32),
      "attention_mask": jnp.ones((batch, length), jnp.int32),
      "response_mask": jnp.asarray(response_mask),
      "old_logprobs": jnp.asarray(-rng.random((batch, length)) * 8, jnp.float32),
      "values": jnp.asarray(rng.normal(size=(batch, length)), jnp.float32),
      "advantages": jnp.asarray(rng.normal(size=(batch, length)), jnp.float32),
      "returns": jnp.asarray(rng.normal(size=(batch, length)), jnp.float32),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--mesh", default="1,1,1")
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--micro_batches", type=int, default=4)
  args = parser.parse_args()
  cfg = MODEL_25M.replace(remat=args.remat)
  shape = tuple(int(s) for s in args.mesh.split(","))
  mesh = None
  if np.prod(shape) > 1:
    mesh = sharding.make_mesh(shape)
  optimizers = {"policy": train_step.make_optimizer(1e-5), "value": train_step.make_optimizer(1e-5)}
  modules = {"policy": CausalLM(cfg), "value": ScalarModel(cfg)}
  ppo_cfg = ppo.PPOConfig(ppo_epochs=1, num_minibatches=1, micro_batches=args.micro_batches)
  update = ppo.make_ppo_update(modules["policy"], modules["value"], optimizers, ppo_cfg)
  if mesh is None:
    step = train_step.make_train_step(update)
    state = {name: train_step.TrainState.create(init_params(m, jax.random.PRNGKey(i)),
                                                optimizers[name])
             for i, (name, m) in enumerate(modules.items())}
  else:
    shardings = train_step.state_shardings(modules, optimizers, mesh)
    step = train_step.make_train_step(update, mesh, shardings)
    state = {name: train_step.init_train_state(m, optimizers[name], jax.random.PRNGKey(i), mesh)
             for i, (name, m) in enumerate(modules.items())}
  batch = make_batch(cfg, args.batch, args.length)
  rng = jax.random.PRNGKey(0)
  holder = {"state": state}

  def run():
    holder["state"], metrics = step(holder["state"], batch, rng)
    jax.block_until_ready(metrics)

  run()                                                      # compile
  seconds = best_of(run, args.repeats)
  tokens = args.batch * args.length
  flops = ppo_flops_per_token(cfg, args.length) * tokens / seconds
  peak = matmul_flops_per_s()
  print(f"PPO step, {cfg.num_params() / 1e6:.1f}M-param Qwen2 policy + value, "
        f"batch {args.batch} x {args.length} in {args.micro_batches} micro-batches, "
        f"mesh {shape}, {jax.devices()[0].platform}")
  print(f"{'seconds':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'matmul GFLOP/s':>15} {'of peak':>8}")
  print(f"{seconds:8.2f} {tokens / seconds:9.0f} {flops / 1e9:8.1f} {peak / 1e9:15.1f} "
        f"{flops / peak:8.1%}")
  print(json.dumps({"benchmark": "train_step", "metric": "model FLOP/s", "ours": flops,
                    "baseline": peak, "ratio": flops / peak, "tokens_per_s": tokens / seconds,
                    "seconds": seconds, "batch": args.batch, "length": args.length,
                    "micro_batches": args.micro_batches, "remat": args.remat,
                    "mesh": list(shape), "device": jax.devices()[0].device_kind}))


if __name__ == "__main__":
  main()
