"""Checkpoints: a thin wrapper over `orbax.checkpoint.CheckpointManager`.

A checkpoint holds two items:
  * `state`: any pytree of arrays (TrainStates, reference params, RNG keys, counters).
    New-style typed PRNG keys (`jax.random.key`) are stored as their raw uint32 data and
    re-wrapped on restore from the target's key dtype.
  * `meta`: JSON (step counters, the data iterator position, the config, metrics so far).

    with Checkpointer(workdir + "/ckpt", max_to_keep=3) as ckpt:
      ckpt.save(step, {"train": state, "rng": rng}, {"data_position": i, "config": cfg})
      ...
      state, meta = ckpt.restore(target=abstract_state)   # onto target's shardings

Policies (decided here, relied on by the trainers):
  * Saving a state with a NaN/Inf in any floating leaf raises `NonFiniteStateError`: a
    diverged run stops before `max_to_keep` rotates its last good checkpoints away.
  * Saving a step that already exists is skipped with a warning, unless `force=True`,
    which also replaces the existing step (and ignores `save_interval_steps`).
  * Writes are atomic (orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it), so a
    run killed mid-save leaves the previous steps intact; the unfinished write is ignored.
    `restore()` without a step takes the latest *complete* step, skipping (with a warning)
    steps whose item directories are missing.
  * A step that cannot be read raises `CheckpointError` naming the step, its directory and
    the way out (delete that step directory, or `restore(step=...)` an earlier one).
  * `close()` and leaving the `with` block wait for pending asynchronous saves, and so
    does interpreter exit (an unfinished async save would otherwise hang the exit).
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import os
from typing import Any, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from psgpo_jax import faults

log = logging.getLogger(__name__)

ITEMS = ("state", "meta")
_KEY_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored (corrupted, incomplete or mismatched)."""


class NonFiniteStateError(ValueError):
  """Refused to save a state that holds NaN or Inf values."""


# ----------------------------------------------------------------------------- PRNG keys


def _is_key(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl_name(dtype) -> str:
  for name in _KEY_IMPLS:
    if jax.random.key(0, impl=name).dtype == dtype:
      return name
  raise ValueError(f"Unknown PRNG key dtype {dtype}; known implementations: {_KEY_IMPLS}.")


def keys_to_data(tree: Any) -> Any:
  """Replaces typed PRNG keys by their raw uint32 data ([..., key_size])."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _raw_key_target(leaf: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
  """The uint32 data target of a typed-key target, its sharding extended to the key dims."""
  raw = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
  sharding = getattr(leaf, "sharding", None)
  if isinstance(sharding, NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (len(raw.shape) - len(tuple(sharding.spec)))
    sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec))
  return jax.ShapeDtypeStruct(raw.shape, raw.dtype, sharding=sharding)


def _to_abstract(leaf: Any) -> Any:
  """A restore target leaf: arrays become ShapeDtypeStructs keeping their sharding."""
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  if isinstance(leaf, np.ndarray):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
  return leaf


def abstract_target(target: Any, shardings: Any = None) -> Any:
  """ShapeDtypeStructs for `target` (arrays or structs), with `shardings` if given."""
  target = jax.tree.map(_to_abstract, target)
  if shardings is None:
    return target
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      target, shardings)


# ----------------------------------------------------------------------------- meta + checks


def to_json(value: Any, path: str = "meta") -> Any:
  """Converts `value` to JSON types (ConfigDicts, dataclasses, numpy and jax scalars...)."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if hasattr(value, "to_dict") and callable(value.to_dict):           # ConfigDict
    return to_json(value.to_dict(), path)
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return to_json(dataclasses.asdict(value), path)
  if isinstance(value, Mapping):
    return {str(k): to_json(v, f"{path}.{k}") for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_json(v, f"{path}[{i}]") for i, v in enumerate(value)]
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    return np.asarray(value).tolist()
  raise TypeError(f"{path} has a value of type {type(value).__name__} that cannot be "
                  f"stored as JSON; convert it to numbers, strings, lists or dicts.")


@jax.jit
def _finite_flags(leaves: List[jax.Array]) -> jax.Array:
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_paths(tree: Any) -> List[str]:
  """Paths of the floating leaves of `tree` that hold a NaN or Inf.

  Device arrays are reduced on their devices, one jitted call per set of devices (a
  state may mix a mesh's arrays with single-device ones); host arrays on the host.
  """
  bad, groups = [], {}
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    if not hasattr(x, "dtype") or _is_key(x) or not jnp.issubdtype(x.dtype, jnp.inexact):
      continue
    name = jax.tree_util.keystr(path)
    if isinstance(x, jax.Array):
      devices = tuple(sorted(d.id for d in x.sharding.device_set))
      groups.setdefault(devices, []).append((name, x))
    elif not np.all(np.isfinite(x)):
      bad.append(name)
  for leaves in groups.values():
    flags = np.asarray(_finite_flags([x for _, x in leaves]))
    bad.extend(name for (name, _), ok in zip(leaves, flags) if not ok)
  return bad


# ----------------------------------------------------------------------------- manager


class Checkpointer:
  """Saves and restores (`state` pytree, `meta` JSON) per step under one directory.

  Args:
    directory: where step folders go (made absolute; created unless `create=False`).
    max_to_keep: keep the newest N steps (None: all).
    save_interval_steps: `save` writes only steps divisible by this (unless forced).
    async_save: write in the background; `save` returns after the device->host copy.
    check_finite: refuse states with NaN/Inf (`NonFiniteStateError`).
    create: create the directory if missing; otherwise a missing one is an error.
  """

  def __init__(self, directory: str, max_to_keep: Optional[int] = 3,
               save_interval_steps: int = 1, async_save: bool = True,
               check_finite: bool = True, create: bool = True):
    directory = os.fspath(directory)
    # Local paths are made absolute (orbax needs it); URLs (gs://...) are kept.
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    if not create and not epath.Path(self.directory).is_dir():
      raise FileNotFoundError(f"Checkpoint directory {self.directory} does not exist.")
    self.check_finite = check_finite
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=create,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    self._closed = False
    atexit.register(self.close)

  # -- queries

  def all_steps(self) -> List[int]:
    """Steps orbax considers finalized (it ignores unfinished temporary directories).

    Waits for pending saves, then re-reads the directory (other processes may write it).
    `latest_step` further skips steps with a missing item directory.
    """
    self.wait()
    if not self._closed:
      self._manager.reload()
    return sorted(int(s) for s in self._manager.all_steps())

  @property
  def stage_name(self) -> str:
    """The name of the folder above the checkpoint folder (e.g. "rl" for run/rl/checkpoints)."""
    return os.path.basename(os.path.dirname(self.directory.rstrip("/")))

  def step_dir(self, step: int) -> str:
    """The directory of one step."""
    return str(epath.Path(self.directory) / str(step))

  def _missing_items(self, step: int) -> List[str]:
    return [item for item in ITEMS if not (epath.Path(self.step_dir(step)) / item).is_dir()]

  def latest_step(self) -> Optional[int]:
    """The newest complete step, or None if there is none."""
    for step in reversed(self.all_steps()):
      missing = self._missing_items(step)
      if not missing:
        return step
      log.warning("Checkpoint step %d in %s is incomplete (missing %s); skipping it.",
                  step, self.directory, missing)
    return None

  # -- save

  def save(self, step: int, state: Any, meta: Optional[Mapping[str, Any]] = None,
           force: bool = False) -> bool:
    """Saves `state` and `meta` as `step`.

    Returns:
      True if a save was started; False if skipped (not on `save_interval_steps`, or the
      step already exists and `force` is False).
    Raises:
      NonFiniteStateError: a floating leaf of `state` holds NaN/Inf (with `check_finite`).
      TypeError: `meta` is not JSON-serialisable.
    """
    step = int(step)
    self._check_open()
    meta_json = to_json(dict(meta or {}))
    if self.check_finite:
      bad = nonfinite_paths(state)
      if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteStateError(
            f"Refusing to save step {step} to {self.directory}: NaN/Inf in {shown}. "
            f"Restore the last good step (restore(step=...)) and lower the learning rate, "
            f"or pass check_finite=False to save anyway.")
    if step in self._manager.all_steps():   # cached: includes a save still in flight
      if not force:
        log.warning("Checkpoint step %d already exists in %s; not saving it again "
                    "(pass force=True to replace it).", step, self.directory)
        return False
      self._manager.wait_until_finished()
      self._manager.delete(step)
    args = ocp.args.Composite(state=ocp.args.StandardSave(keys_to_data(state)),
                              meta=ocp.args.JsonSave(meta_json))
    started = bool(self._manager.save(step, args=args, force=force))
    faults.reached(f"save:{self.stage_name}:{step}")      # the save may still be in flight
    return started

  # -- restore

  def restore(self, step: Optional[int] = None, target: Any = None) -> Tuple[Any, dict]:
    """Restores `(state, meta)` of `step` (default: the latest complete one).

    Args:
      step: which step; None for the latest complete step.
      target: the state's structure with ShapeDtypeStructs (or arrays) carrying the
        shardings to restore onto, so a checkpoint saved on one mesh loads on another.
        Typed-key leaves are re-wrapped. Without a target, arrays come back as saved
        (containers as dicts/lists, typed keys as raw uint32 data).
    Raises:
      FileNotFoundError: no complete checkpoint, or `step` is not one of them.
      CheckpointError: the step's files cannot be read or do not match `target`.
    """
    self._check_open()
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"No checkpoint to restore in {self.directory}: the directory "
                              f"holds no complete checkpoint step.")
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"No complete checkpoint in {self.directory}: steps {steps} "
                                f"are all missing item directories {ITEMS}.")
    step = int(step)
    if step not in steps:
      raise FileNotFoundError(f"No checkpoint step {step} in {self.directory}; "
                              f"available steps: {steps}.")
    advice = (f"Delete {self.step_dir(step)} to fall back to the previous step, or restore "
              f"an earlier one with restore(step=...); available steps: {steps}.")
    missing = self._missing_items(step)
    if missing:
      raise CheckpointError(f"Checkpoint step {step} in {self.directory} is incomplete "
                            f"(missing {missing}). {advice}")
    abstract, key_impls = None, None
    if target is not None:
      abstract = abstract_target(target)
      key_impls = jax.tree.map(lambda x: _key_impl_name(x.dtype) if _is_key(x) else None,
                               abstract)
      abstract = jax.tree.map(lambda x: _raw_key_target(x) if _is_key(x) else x, abstract)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                              meta=ocp.args.JsonRestore())
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as e:  # orbax/tensorstore raise many types for unreadable files.
      cause = str(e)
      cause = cause if len(cause) <= 500 else cause[:500] + " ..."
      raise CheckpointError(
          f"Could not restore checkpoint step {step} from {self.step_dir(step)}: it may be "
          f"corrupted, or not match the restore target. {advice} "
          f"Cause: {type(e).__name__}: {cause}") from e
    state, meta = restored.state, restored.meta
    if key_impls is not None:
      state = jax.tree.map(
          lambda x, impl: x if impl is None else jax.random.wrap_key_data(x, impl=impl),
          state, key_impls, is_leaf=lambda x: x is None)
    return state, dict(meta or {})

  def restore_meta(self, step: Optional[int] = None) -> dict:
    """Only the `meta` JSON of `step` (default: the latest complete one)."""
    self._check_open()
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"No complete checkpoint in {self.directory}.")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:
      raise CheckpointError(f"Could not read the meta of checkpoint step {step} in "
                            f"{self.step_dir(step)}: {type(e).__name__}: {e}.") from e
    return dict(restored.meta or {})

  def delete(self, step: int) -> None:
    """Removes one step (e.g. a corrupted one)."""
    self._check_open()
    if int(step) in self.all_steps():
      self._manager.delete(int(step))
    elif epath.Path(self.step_dir(step)).is_dir():
      epath.Path(self.step_dir(step)).rmtree()

  # -- lifetime

  def _check_open(self) -> None:
    if self._closed:
      raise RuntimeError(f"Checkpointer for {self.directory} is closed.")

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are written."""
    if not self._closed:
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, then releases the manager (idempotent)."""
    if self._closed:
      return
    self._manager.wait_until_finished()
    self._manager.close()
    self._closed = True
    atexit.unregister(self.close)

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ----------------------------------------------------------------------------- loops


def resume_step(directory: str) -> int:
  """The step a loop checkpointing into `directory` resumes at (0: no complete step)."""
  if not os.path.isdir(directory):
    return 0
  with Checkpointer(directory, max_to_keep=1, create=False) as ckpt:
    return 0 if ckpt.latest_step() is None else int(ckpt.restore_meta()["next_step"])


def resume_or_start(directory: Optional[str], every: int, state: Any, what: str
                    ) -> Tuple[Optional[Checkpointer], Any, int]:
  """(checkpointer, state, first step) of a training loop that saves every `every` steps.

  Without a directory or with `every <= 0`: (None, state, 0), nothing is saved. With a
  complete checkpoint in `directory`: its state, restored onto `state`'s structure and
  shardings, and its `next_step` (announced as "[what] resumed from ..."). The loop
  calls `save_on_schedule` after each step and closes the checkpointer at the end.
  """
  if not directory or every <= 0:
    return None, state, 0
  checkpointer = Checkpointer(directory, max_to_keep=1)
  latest = checkpointer.latest_step()
  if latest is None:
    return checkpointer, state, 0
  state, meta = checkpointer.restore(latest, target=abstract_target(state))
  print(f"[{what}] resumed from the checkpoint of step {latest} in {checkpointer.directory}")
  return checkpointer, state, int(meta["next_step"])


def save_on_schedule(checkpointer: Optional[Checkpointer], steps_done: int, every: int,
                     total: int, state: Any) -> None:
  """Saves `state` as step `steps_done` when it is a multiple of `every` before `total`
  (the finished loop saves its result elsewhere); a no-op without a checkpointer."""
  if checkpointer is not None and steps_done % every == 0 and steps_done < total:
    checkpointer.save(steps_done, state, {"next_step": steps_done})
