"""Checkpoints: exact resume, restore across meshes, refused and broken checkpoints."""
from __future__ import annotations

import glob
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from jax.sharding import SingleDeviceSharding

from psgpo_jax import sharding
from psgpo_jax import train_step as ts
from psgpo_jax.checkpointing import (CheckpointError, Checkpointer, NonFiniteStateError,
                                     abstract_target)
from psgpo_jax.models import CausalLM, ModelConfig

CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=8, num_key_value_heads=2)


def quad_loss(params, batch, rng):
  """Least squares with dropout-like noise from `rng`: params {'w': [4, 3]}."""
  noise = 1.0 + 0.1 * jax.random.normal(rng, batch["y"].shape)
  return jnp.mean((batch["x"] @ params["w"] - batch["y"] * noise) ** 2), {}


def quad_batch(i):
  rs = np.random.RandomState(i)
  return {"x": rs.randn(6, 4).astype(np.float32), "y": rs.randn(6, 3).astype(np.float32)}


OPTIMIZER = ts.make_optimizer(0.05, weight_decay=0.01, warmup_steps=2, total_steps=20,
                              schedule="cosine")
UPDATE = jax.jit(ts.gradient_update(quad_loss, OPTIMIZER))


def train(run, start, stop):
  """Advances {'train': TrainState, 'rng': typed key} over batches start..stop-1."""
  for i in range(start, stop):
    rng, sub = jax.random.split(run["rng"])
    state, _ = UPDATE(run["train"], quad_batch(i), sub)
    run = {**run, "train": state, "rng": rng}
  return run


def fresh_run():
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (4, 3))}
  return {"train": ts.TrainState.create(params, OPTIMIZER), "rng": jax.random.key(42),
          "legacy_rng": jax.random.PRNGKey(7)}


def host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x)) if jnp.issubdtype(
      x.dtype, jax.dtypes.prng_key) else np.asarray(x), tree)


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, host(a), host(b))


def save_two_steps(directory, **kwargs):
  run = fresh_run()
  with Checkpointer(directory, async_save=False, **kwargs) as ckpt:
    for step in (1, 2):
      run = train(run, step - 1, step)
      assert ckpt.save(step, run, {"step": step})
  return run


def test_resume_continues_bit_for_bit(tmp_path):
  config = ml_collections.ConfigDict({"rl": {"kl_coef": 0.05, "lengths": (64, 128)}})
  run = train(fresh_run(), 0, 3)
  meta = {"data_position": np.int64(3), "config": config, "losses": [np.float32(0.5), 0.25]}
  with Checkpointer(tmp_path / "ckpt") as ckpt:          # asynchronous save
    assert ckpt.save(3, run, meta)
  uninterrupted = train(run, 3, 6)

  ckpt = Checkpointer(tmp_path / "ckpt")                 # as in a new process
  assert ckpt.latest_step() == 3
  restored, restored_meta = ckpt.restore(target=jax.eval_shape(fresh_run))
  ckpt.close()
  assert isinstance(restored["train"], ts.TrainState)
  assert jnp.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
  assert restored["legacy_rng"].dtype == jnp.uint32
  assert_trees_equal(restored, run)
  assert restored_meta == {"data_position": 3, "losses": [0.5, 0.25],
                           "config": {"rl": {"kl_coef": 0.05, "lengths": [64, 128]}}}
  assert ml_collections.ConfigDict(restored_meta["config"]).rl.kl_coef == 0.05
  assert_trees_equal(train(restored, 3, 6), uninterrupted)


@pytest.fixture(scope="module")
def lm_state_on_2x4():
  """A tiny LM's TrainState sharded on mesh (2, 4, 1) from random host values."""
  model = CausalLM(CFG)
  rs = np.random.RandomState(0)
  params = jax.tree.map(lambda x: rs.randn(*x.shape).astype(x.dtype),
                        sharding.abstract_params(model))
  state = ts.TrainState.create(params, OPTIMIZER)
  state = state.replace(opt_state=jax.tree.map(lambda x: x + 1, state.opt_state))  # non-zero
  mesh = sharding.make_mesh((2, 4, 1))
  return model, ts.place_state(host(state), ts.state_shardings(model, OPTIMIZER, mesh))


def test_saved_on_one_mesh_restores_on_another_and_on_one_device(tmp_path, lm_state_on_2x4):
  model, state = lm_state_on_2x4
  q = state.params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == P("fsdp", "tensor", None) and q.sharding.mesh.shape["fsdp"] == 4
  run = {"train": state, "rng": jax.random.key(1)}
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    ckpt.save(10, run, {"note": "mesh 2x4x1"})
  abstract = jax.eval_shape(lambda: run)

  mesh = sharding.make_mesh((1, 1, 8))
  targets = {
      "mesh_1x1x8": {"train": ts.state_shardings(model, OPTIMIZER, mesh),
                     "rng": sharding.replicated(mesh)},
      "one_device": jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[3]), abstract),
  }
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    for name, shardings in targets.items():
      restored, meta = ckpt.restore(target=abstract_target(abstract, shardings))
      assert meta == {"note": "mesh 2x4x1"}
      assert_trees_equal(restored, run)
      assert jax.tree.map(lambda x: x.sharding, restored) == shardings, name


def test_restore_from_missing_or_empty_directory_names_the_path(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError, match=f"{missing} does not exist"):
    Checkpointer(missing, create=False)
  with Checkpointer(tmp_path / "empty") as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match=f"No checkpoint to restore in {tmp_path}/empty"):
      ckpt.restore()
  save_two_steps(tmp_path / "two")
  with Checkpointer(tmp_path / "two") as ckpt:
    with pytest.raises(FileNotFoundError, match=r"step 7 .* available steps: \[1, 2\]"):
      ckpt.restore(step=7)


# orbax's async reader leaves an "event loop is closed" callback behind a failed read.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupted_checkpoint_error_names_the_step_and_the_way_out(tmp_path):
  run = save_two_steps(tmp_path)
  for path in glob.glob(str(tmp_path / "2" / "state" / "**" / "d" / "*"), recursive=True):
    with open(path, "wb") as f:
      f.write(b"garbled")
  target = jax.eval_shape(fresh_run)
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError) as info:
      ckpt.restore(target=target)
    message = str(info.value)
    assert "step 2" in message and f"Delete {tmp_path}/2" in message
    assert "restore(step=...)" in message and "[1, 2]" in message
    earlier, meta = ckpt.restore(step=1, target=target)
    assert meta == {"step": 1}
    ckpt.delete(2)
    latest, meta = ckpt.restore(target=target)
    assert meta == {"step": 1} and ckpt.all_steps() == [1]
    assert_trees_equal(latest, earlier)
  assert int(run["train"].step) == 2


def test_unfinished_writes_are_skipped_for_the_latest_complete_step(tmp_path):
  save_two_steps(tmp_path)
  # A save killed mid-write (orbax's temporary name) and a step folder missing an item.
  shutil.copytree(tmp_path / "2", tmp_path / "3.orbax-checkpoint-tmp-1700000000")
  os.makedirs(tmp_path / "4")
  shutil.copytree(tmp_path / "2" / "meta", tmp_path / "4" / "meta")
  with Checkpointer(tmp_path) as ckpt:
    assert 3 not in ckpt.all_steps()
    assert ckpt.latest_step() == 2
    _, meta = ckpt.restore(target=jax.eval_shape(fresh_run))
    assert meta == {"step": 2}
    assert 4 in ckpt.all_steps()
    with pytest.raises(CheckpointError, match=r"step 4 .* incomplete \(missing \['state'\]\)"):
      ckpt.restore(step=4)


def test_nonfinite_state_is_refused(tmp_path):
  run = fresh_run()
  bad = {**run, "train": run["train"].replace(
      params={"w": run["train"].params["w"].at[1, 2].set(jnp.nan)})}
  with Checkpointer(tmp_path / "a") as ckpt:
    with pytest.raises(NonFiniteStateError, match=r"step 5 .*\['train'\]\.params\['w'\]"):
      ckpt.save(5, bad)
    assert ckpt.all_steps() == []
    assert ckpt.save(5, run)
  with Checkpointer(tmp_path / "b", check_finite=False) as ckpt:
    assert ckpt.save(5, bad)
  # Leaves on a mesh and on one device are checked together.
  mesh = sharding.make_mesh((1, 8, 1))
  mixed = {"params": jax.device_put(jnp.ones((8, 2)), sharding.NamedSharding(mesh, P("fsdp"))),
           "ema": jax.device_put(jnp.array([1.0, jnp.inf]), jax.devices()[2])}
  with Checkpointer(tmp_path / "c") as ckpt:
    with pytest.raises(NonFiniteStateError, match=r"\['ema'\]"):
      ckpt.save(1, mixed)


def test_existing_steps_intervals_and_rotation(tmp_path):
  run = fresh_run()
  with Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2) as ckpt:
    assert ckpt.save(2, run, {"v": 1})
    assert not ckpt.save(2, run, {"v": 2})                # exists: skipped
    assert not ckpt.save(3, run, {"v": 3})                # off the interval
    assert ckpt.save(3, run, {"v": 3}, force=True)
    assert ckpt.restore_meta(2) == {"v": 1}
    assert ckpt.save(2, run, {"v": 4}, force=True)        # replaced
    assert ckpt.restore_meta(2) == {"v": 4}
    assert ckpt.save(4, run) and ckpt.save(6, run)
    assert ckpt.all_steps() == [4, 6]                     # max_to_keep: newest writes


def test_close_waits_for_pending_saves_and_relative_paths_work(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  run = train(fresh_run(), 0, 1)
  ckpt = Checkpointer("relative/ckpt")
  assert ckpt.directory == str(tmp_path / "relative" / "ckpt")
  assert ckpt.save(1, run, {"done": True})
  ckpt.close()
  with pytest.raises(RuntimeError, match="closed"):
    ckpt.save(2, run)
  with Checkpointer(str(tmp_path / "relative" / "ckpt")) as again:
    restored, meta = again.restore(target=jax.eval_shape(fresh_run))
  assert meta == {"done": True}
  assert_trees_equal(restored, run)
