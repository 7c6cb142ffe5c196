"""One process of the multi-process check (`tests/test_multihost.py` starts it).

Every process of a run executes this same program, as on a pod: it joins the
distributed runtime (gloo between CPU processes), builds the global (2, 2, 1) mesh over
every process's devices, and then

  * takes its own rows of a fixed batch and assembles the global arrays with
    `multihost.global_batch_from_local` (the rows a process must hold are read from the
    batch sharding, and must be the contiguous block of rows the RL trainer's
    `local_problem_order` fills with this process's rollouts);
  * runs two PPO updates (policy + value, micro-batched) and one PRM step on that batch,
    with the states created directly sharded;
  * saves the PPO state with the orbax checkpointer (every process takes part), restores
    it onto the mesh and checks it is the state that was saved.

Process 0 writes the gathered params and the metrics to `--out`/result.npz, so a run of
two processes with 2 devices each can be compared with one process of 4 devices.

    python -m tests.multihost_job --num_processes 2 --process_id 0 --port 12355 --out DIR
"""
from __future__ import annotations

import argparse
import os

LR = 1e-3     # every optimizer's learning rate (the test derives its tolerance from it)
UPDATES = 4   # most Adam steps of one parameter set: 2 PPO calls x 2 minibatches (PRM: 1)


def parse_and_join(description: str) -> argparse.Namespace:
  """A job's command line (`--num_processes`, `--process_id`, `--port`, `--out`); with
  several processes, joins the distributed runtime (gloo on CPU) before JAX starts."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  from psgpo_jax import multihost                             # pylint: disable=import-outside-toplevel
  if args.num_processes > 1:
    multihost.initialize_distributed({
        "distributed": True, "coordinator_address": f"localhost:{args.port}",
        "num_processes": args.num_processes, "process_id": args.process_id})
  return args


def main() -> None:
  args = parse_and_join(__doc__.splitlines()[0])

  import jax                                                  # pylint: disable=import-outside-toplevel
  import numpy as np                                          # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils                # pylint: disable=import-outside-toplevel

  from psgpo_jax import checkpointing, multihost, sharding, train_step  # pylint: disable=import-outside-toplevel
  from psgpo_jax.models import CausalLM, ModelConfig, ScalarModel   # pylint: disable=import-outside-toplevel
  from psgpo_jax.prm.train import make_prm_loss              # pylint: disable=import-outside-toplevel
  from psgpo_jax.rl import ppo                                # pylint: disable=import-outside-toplevel
  from tests.tolerances import ADAM_EPS                       # pylint: disable=import-outside-toplevel

  assert jax.process_count() == args.num_processes and jax.device_count() == 4
  mesh = sharding.make_mesh((2, 2, 1))

  # A fixed global batch, the same in every process; each keeps its own rows.
  rows, length, prompt = 8, 16, 5
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    attention_query_block=4)
  rng = np.random.default_rng(0)
  response = np.zeros((rows, length), np.int32)
  for r in range(rows):
    response[r, prompt:prompt + 1 + (3 * r) % (length - prompt - 1)] = 1
  full = {
      "tokens": rng.integers(1, cfg.vocab_size, (rows, length)).astype(np.int32),
      "attention_mask": np.ones((rows, length), np.int32),
      "response_mask": response,
      "old_logprobs": (-rng.random((rows, length)) * 3 * response).astype(np.float32),
      "values": (rng.normal(size=(rows, length)) * response).astype(np.float32),
      "advantages": (rng.normal(size=(rows, length)) * response).astype(np.float32),
      "returns": (rng.normal(size=(rows, length)) * response).astype(np.float32),
  }
  index_map = sharding.batch_sharding(mesh).addressable_devices_indices_map((rows, length))
  local_rows = sorted({r for idx in index_map.values() for r in range(rows)[idx[0]]})
  # The RL trainer's layout: process p's rollouts are rows [p * R / n, (p + 1) * R / n).
  share = rows // jax.process_count()
  assert local_rows == list(range(jax.process_index() * share,
                                  (jax.process_index() + 1) * share)), local_rows
  batch = multihost.global_batch_from_local({k: v[local_rows] for k, v in full.items()}, mesh)

  # Two PPO updates, states created sharded.
  modules = {"policy": CausalLM(cfg), "value": ScalarModel(cfg)}
  optimizers = {name: train_step.make_optimizer(LR, eps=ADAM_EPS) for name in modules}
  config = ppo.PPOConfig(ppo_epochs=1, num_minibatches=2, micro_batches=2)
  shardings = train_step.state_shardings(modules, optimizers, mesh)
  step = train_step.make_train_step(
      ppo.make_ppo_update(modules["policy"], modules["value"], optimizers, config), mesh,
      shardings)
  state = {name: train_step.init_train_state(module, optimizers[name], jax.random.PRNGKey(i),
                                             mesh)
           for i, (name, module) in enumerate(modules.items())}
  metrics = {}
  for k in range(2):
    state, m = step(state, batch, jax.random.PRNGKey(10 + k))
    metrics.update({f"ppo{k}/{name}": v for name, v in m.items()})

  # One PRM step on the same rows (targets at the response tokens).
  prm_batch = multihost.global_batch_from_local({
      "tokens": full["tokens"][local_rows], "attention_mask": full["attention_mask"][local_rows],
      "targets": np.where(full["response_mask"] > 0, 1.0, 0.0)[local_rows].astype(np.float32),
      "loss_mask": full["response_mask"][local_rows].astype(np.float32)}, mesh)
  prm_opt = train_step.make_optimizer(LR, eps=ADAM_EPS)
  prm_state, prm_step = train_step.single_model_step(
      train_step.gradient_update(make_prm_loss(cfg), prm_opt),
      train_step.init_train_state(ScalarModel(cfg), prm_opt, jax.random.PRNGKey(7), mesh),
      ScalarModel(cfg), prm_opt, mesh)
  prm_state, m = prm_step(prm_state, prm_batch, jax.random.PRNGKey(0))
  metrics.update({f"prm/{name}": v for name, v in m.items()})

  # The orbax checkpoint: all processes save and restore together.
  directory = os.path.join(os.path.abspath(args.out), "checkpoints")
  with checkpointing.Checkpointer(directory) as checkpointer:
    checkpointer.save(1, state, {"next_step": 1})
    checkpointer.wait()
    restored, meta = checkpointer.restore(1, target=checkpointing.abstract_target(state))
  assert meta["next_step"] == 1
  same = jax.tree.map(lambda a, b: bool(np.array_equal(*multihost_utils.process_allgather(
      (a, b), tiled=True))), state, restored)
  assert all(jax.tree.leaves(same)), same
  assert jax.tree.leaves(restored["policy"].params)[0].sharding == \
      jax.tree.leaves(state["policy"].params)[0].sharding

  gathered = multihost_utils.process_allgather(
      {"policy": state["policy"].params, "value": state["value"].params,
       "prm": prm_state.params, "metrics": metrics}, tiled=True)
  if jax.process_index() == 0:
    flat = {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(gathered)}
    np.savez(os.path.join(args.out, "result.npz"), **flat)
  multihost_utils.sync_global_devices("done")
  print(f"process {jax.process_index()} of {jax.process_count()}: ok", flush=True)


if __name__ == "__main__":
  main()
