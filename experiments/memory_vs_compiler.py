"""The memory planner against XLA's own count, as a table (README: "Will it fit?").

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python -m experiments.memory_vs_compiler

For the causal LM (the policy's PPO gradient step) and the scalar model (the value's and
the PRM's step), on a few sizes and meshes: `memory.activation_bytes` per device next to
the temporary bytes per device of the compiled gradient step
(`jax.jit(...).lower(...).compile().memory_analysis().temp_size_in_bytes`), with and
without remat, and the planner's KV cache next to the sampler's cache arrays. Meshes
need as many devices as their product; the ones this host cannot make are skipped.
"""
from __future__ import annotations

import itertools
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from psgpo_jax import memory, sharding  # pylint: disable=g-import-not-at-top
from psgpo_jax.models import CausalLM, ModelConfig, ScalarModel  # pylint: disable=g-import-not-at-top
from psgpo_jax.models.transformer import init_cache  # pylint: disable=g-import-not-at-top

MESHES = ((1, 1, 1), (2, 4, 1), (2, 2, 2))
SHAPES = ((2, 128, 512, 8, 128), (4, 256, 2048, 16, 128))   # layers, hidden, vocab, rows, tokens


def compiled_temp_bytes(module, mesh, rules, batch: int, seq_len: int) -> int:
  """Per-device temporary bytes of one jitted gradient step of `module` on `mesh`."""
  params = sharding.abstract_params(module)
  param_sh = sharding.param_shardings(module, mesh, rules)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)

  def loss(p, tokens):
    out = module.apply({"params": p}, tokens).astype(jnp.float32)
    if out.ndim == 3:                                          # causal LM: token NLL
      out = jnp.take_along_axis(jax.nn.log_softmax(out), tokens[..., None], -1)
    return -out.mean()

  step = jax.jit(jax.grad(sharding.with_activation_sharding(loss, mesh, rules)),
                 in_shardings=(param_sh, sharding.batch_sharding(mesh, rules)))
  return int(step.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes)


def rows():
  """Yields one table row (dict) per model kind x shape x mesh x remat."""
  rules = sharding.make_rules()
  for (layers, hidden, vocab, batch, seq_len), shape in itertools.product(SHAPES, MESHES):
    if jax.device_count() < shape[0] * shape[1] * shape[2]:
      continue
    mesh = sharding.make_mesh(shape, devices=jax.devices()[:shape[0] * shape[1] * shape[2]])
    for remat in (False, True):
      cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                        num_hidden_layers=layers, num_attention_heads=8,
                        num_key_value_heads=4, remat=remat)
      for module in (CausalLM(cfg), ScalarModel(cfg)):
        planned = memory.activation_bytes(cfg, mesh, rules, batch, seq_len, remat,
                                          with_logits=isinstance(module, CausalLM))
        compiled = compiled_temp_bytes(module, mesh, rules, batch, seq_len)
        yield {"model": type(module).__name__, "layers": layers, "hidden": hidden,
               "rows x tokens": f"{batch}x{seq_len}", "mesh": shape, "remat": remat,
               "planner MB": planned / 1e6, "compiler MB": compiled / 1e6,
               "planner / compiler": planned / compiled}


def main() -> None:
  print("| model | layers | hidden | rows x tokens | mesh | remat | planner MB | compiler MB "
        "| planner / compiler |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows():
    print(f"| {r['model']} | {r['layers']} | {r['hidden']} | {r['rows x tokens']} | "
          f"{r['mesh']} | {'on' if r['remat'] else 'off'} | {r['planner MB']:.1f} | "
          f"{r['compiler MB']:.1f} | {r['planner / compiler']:.2f} |", flush=True)
  cfg = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=512,
                    num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4)
  mesh = memory._abstract_mesh((1, 1, 1), sharding.AXIS_NAMES)   # pylint: disable=protected-access
  planned = memory.kv_cache_bytes(cfg, mesh, sharding.make_rules(), 64, 640)
  actual = sum(x.nbytes for x in jax.tree.leaves(init_cache(cfg, 64, 640)))
  print(f"\nKV cache, 64 rows x 640 slots, one device: planner {planned / 1e6:.1f} MB, "
        f"the sampler's cache arrays {actual / 1e6:.1f} MB")


if __name__ == "__main__":
  if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in sys.argv[1:]):
    print(__doc__.strip())
    sys.exit(0)
  main()
