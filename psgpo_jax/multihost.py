"""Several processes (multi-host): distributed init, per-process samplers, global batches.

Every stage runs the same program on every process. Each process samples and tests its own
share of the prompts on its own devices (`sampling_mesh`, with `local_copy` of the
policy), builds its own rows, and `global_batch_from_local` assembles them into the
global arrays the sharded steps read; `max_over_processes` agrees on a padded length;
`barrier` waits for every process (e.g. before reading files the others wrote to the
shared run directory); `allgather_json` concatenates every process's records. On one process every helper is the identity (or a no-op).
"""
from __future__ import annotations

import json
import logging
from typing import Any, List, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from psgpo_jax.sharding import Rules, batch_sharding, make_mesh, replicated

log = logging.getLogger(__name__)


def initialize_distributed(mesh: Optional[Mapping[str, Any]] = None) -> bool:
  """Calls `jax.distributed.initialize` when the config asks for it.

  Args:
    mesh: the `mesh` config section (any mapping) with optional keys `distributed`
      (bool), `coordinator_address` ("host:port"), `num_processes`, `process_id`,
      `local_device_ids`. Unset values (None, "", or `num_processes` 0 / `process_id` -1
      as in configs/base.py) are auto-detected by JAX (TPU pods, SLURM, ...).
  Returns:
    True if this call (or an earlier one) initialised the distributed runtime.
  """
  mesh = mesh or {}
  address = mesh.get("coordinator_address", None) or None
  if not (mesh.get("distributed", False) or address):
    return False
  if jax.distributed.is_initialized():
    return True
  kwargs = {"num_processes": mesh.get("num_processes", None),
            "process_id": mesh.get("process_id", None),
            "local_device_ids": mesh.get("local_device_ids", None)}
  unset = {"num_processes": 0, "process_id": -1, "local_device_ids": ""}
  kwargs = {k: v for k, v in kwargs.items() if v is not None and v != unset[k]}
  jax.distributed.initialize(coordinator_address=address, **kwargs)
  log.info("jax.distributed initialised: process %d of %d, %d local / %d global devices.",
           jax.process_index(), jax.process_count(), jax.local_device_count(),
           jax.device_count())
  return True


def is_main_process() -> bool:
  """True on process 0 (the one that writes logs and summaries)."""
  return jax.process_index() == 0


def sampling_mesh(mesh: Optional[Mesh]) -> Optional[Mesh]:
  """The mesh a sampler runs on: `mesh` itself on one process; on many, this process's
  own devices as a 1-D `data` mesh, since each process samples its own prompts (the
  sampler's host loop reads its tokens back)."""
  if mesh is None or jax.process_count() == 1:
    return mesh
  return make_mesh((-1,), ("data",), jax.local_devices())


def local_copy(tree: Any, mesh: Optional[Mesh]) -> Any:
  """`tree` (e.g. params sharded over `mesh`) as this process's full local copy: as is
  on one process; on many, gathered over the global mesh and read from a local device
  (what a `sampling_mesh` sampler needs)."""
  if mesh is None or jax.process_count() == 1:
    return tree
  full = jax.device_put(tree, replicated(mesh))
  return jax.tree.map(lambda x: x.addressable_data(0), full)


def global_batch_from_local(local_batch: Mapping[str, Any], mesh: Mesh,
                            rules: Optional[Rules] = None) -> dict:
  """Assembles global arrays from each host's rows.

  Every process passes its own rows ([B_local, ...], the same B_local on every host);
  the result has B = B_local * process_count rows, sharded as `batch_sharding`. On one
  host this equals `sharding.shard_batch` (without the divisibility fallback).
  """
  target = batch_sharding(mesh, rules)
  return {k: jax.make_array_from_process_local_data(target, np.asarray(v))
          for k, v in local_batch.items()}


def max_over_processes(value: int) -> int:
  """The largest of every process's `value` (e.g. its longest row); `value` on one."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op on one process); e.g.
  before reading files the other processes write to the shared run directory."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  multihost_utils.sync_global_devices(name)


def allgather_json(values: Sequence[Any]) -> List[Any]:
  """Every process's list of JSON-serialisable values, concatenated in process order (the
  list itself on one process); e.g. each process's evaluation samples."""
  if jax.process_count() == 1:
    return list(values)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  data = np.frombuffer(json.dumps(list(values)).encode("utf-8"), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(data)] = data
  every = np.asarray(multihost_utils.process_allgather(padded))
  out: List[Any] = []
  for row, n in zip(every, lengths):
    out.extend(json.loads(bytes(row[:int(n)]).decode("utf-8")))
  return out
