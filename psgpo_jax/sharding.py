"""Device meshes, logical-axis rules and the shardings of params, optimizer states, batches.

Model parameters carry *logical* axis names (`vocab`, `embed`, `heads`, `kv_heads`,
`head_dim`, `mlp`, `norm`); batches use `batch` (and `length`); the sampler's KV cache
`cache_batch`, `cache_kv_heads`, `cache_length`, `cache_head_dim`. One rules table maps each
logical name to zero, one or several mesh axes (`data`, `fsdp`, `tensor`), so changing the
parallelism is a config change:

    mesh = make_mesh((2, 4, 1))                       # data=2, fsdp=4, tensor=1
    rules = make_rules({"mlp": None})                 # override one default rule
    params = init_sharded_params(CausalLM(cfg), rng, mesh, rules)

Resolution of a logical spec against a concrete shape (`logical_to_mesh_spec`):
  * mesh axes named by a rule but absent from the mesh are dropped (a 1-D `data` mesh works
    with the default rules);
  * using the same mesh axis twice in one spec is an error;
  * a dimension not divisible by the product of its mesh axes' sizes is replicated instead
    (logged once), e.g. `kv_heads=2` on `tensor=8`.

Activations: `with_activation_sharding(fn, mesh)` traces `fn` under the same rules in
Flax's form (`flax_rules`) and the mesh, so the model's `nn.with_logical_constraint`
calls (hidden states between layers) pin activations; `train_step.make_train_step` does
this for every step it builds with a mesh.

Multi-host helpers (distributed init, per-process samplers, global batches from each
process's rows) live in `psgpo_jax.multihost`.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from psgpo_jax.models import init_params, logical_axes

log = logging.getLogger(__name__)

AXIS_NAMES = ("data", "fsdp", "tensor")
MeshAxes = Tuple[str, ...]
Rules = Mapping[str, MeshAxes]

# Logical name -> mesh axes. `None`/() means replicated along that dimension.
DEFAULT_RULES: Mapping[str, Optional[Union[str, MeshAxes]]] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    # The sampler's KV cache, per layer [B, KV, S, Dh] (`transformer.CACHE_AXES`): rows
    # as the batch, kv heads as the params' (so each device attends with its own heads).
    "cache_batch": ("data", "fsdp"),
    "cache_kv_heads": "tensor",
    "cache_length": None,
    "cache_head_dim": None,
}

_LOGGED_FALLBACKS: set = set()


# ----------------------------------------------------------------------------- meshes


def make_mesh(shape: Sequence[int], axis_names: Sequence[str] = AXIS_NAMES,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A device mesh with Auto axes (GSPMD propagates shardings through matmuls).

  Args:
    shape: one size per axis; at most one `-1`, which takes the remaining devices.
    axis_names: mesh axis names, as many as `shape`.
    devices: defaults to all devices (`jax.devices()`, every host's on multi-host).
  Returns:
    `Mesh` whose axis sizes multiply to the number of devices.
  """
  shape, axis_names = tuple(int(s) for s in shape), tuple(axis_names)
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if len(shape) != len(axis_names):
    raise ValueError(f"Mesh shape {shape} has {len(shape)} axes but axis_names {axis_names} "
                     f"has {len(axis_names)}.")
  if len(set(axis_names)) != len(axis_names):
    raise ValueError(f"Mesh axis names must be distinct, got {axis_names}.")
  if shape.count(-1) > 1:
    raise ValueError(f"Mesh shape {shape}: at most one axis may be -1.")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"Mesh shape {shape}: sizes must be positive (or one -1).")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if n % known:
      raise ValueError(f"Mesh shape {shape}: the fixed axes need a multiple of {known} "
                       f"devices, but there are {n}.")
    shape = tuple(n // known if s == -1 else s for s in shape)
  if math.prod(shape) != n:
    raise ValueError(f"Mesh shape {dict(zip(axis_names, shape))} needs {math.prod(shape)} "
                     f"devices, but there are {n}.")
  auto = (jax.sharding.AxisType.Auto,) * len(shape)
  return jax.make_mesh(shape, axis_names, axis_types=auto, devices=devices)


def mesh_from_config(config: Optional[Mapping[str, Any]] = None,
                     devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh from a config section with `shape` (default (-1, 1, 1)) and `axis_names`."""
  config = config or {}
  shape = config.get("shape", None) or (-1,) + (1,) * (len(AXIS_NAMES) - 1)
  names = config.get("axis_names", None) or AXIS_NAMES
  return make_mesh(tuple(shape), tuple(names), devices)


# ----------------------------------------------------------------------------- rules


def _as_axes(value) -> MeshAxes:
  """None / "axis" / ("a", "b") -> a tuple of mesh axis names."""
  if value is None:
    return ()
  if isinstance(value, str):
    return (value,)
  return tuple(value)


def make_rules(overrides: Optional[Union[Mapping[str, Any], Iterable[Tuple[str, Any]]]] = None
               ) -> dict:
  """The default rules updated with `overrides` (a mapping or (name, axes) pairs).

  Returns:
    dict logical name -> tuple of mesh axis names (empty tuple: replicated).
  """
  rules = {name: _as_axes(axes) for name, axes in DEFAULT_RULES.items()}
  if overrides is not None:
    items = overrides.items() if hasattr(overrides, "items") else overrides
    for name, axes in items:
      rules[str(name)] = _as_axes(axes)
  return rules


def parse_rules(value: Any) -> Optional[dict]:
  """Rule overrides as written in a config (`mesh.rules`), as a mapping or None.

  A string lists `logical:axes` pairs, comma-separated, with several mesh axes joined by
  `+` and nothing after the colon for "replicated": "embed:fsdp,mlp:tensor+fsdp,vocab:"
  (the command line's form); a mapping is taken as is; "" or None is no override.

  Raises:
    ValueError: a string entry without a colon.
  """
  if value is None or (isinstance(value, str) and not value.strip()):
    return None
  if not isinstance(value, str):
    return dict(value)
  out = {}
  for entry in value.split(","):
    if not entry.strip():
      continue
    name, sep, axes = entry.partition(":")
    if not sep or not name.strip():
      raise ValueError(f"mesh.rules entry {entry!r} is not 'logical:axes' (e.g. "
                       f"'embed:fsdp', 'mlp:tensor+fsdp', 'vocab:' for replicated).")
    out[name.strip()] = tuple(a.strip() for a in axes.split("+") if a.strip()) or None
  return out


def rules_from_config(config: Optional[Mapping[str, Any]] = None) -> dict:
  """Rules from a mesh config section: its optional `rules` entry (`parse_rules`)
  overrides the defaults."""
  return make_rules(parse_rules((config or {}).get("rules", None)))


def _mesh_axes_for(name: Optional[str], rules: Rules, mesh: Mesh) -> MeshAxes:
  if name is None:
    return ()
  if name not in rules:
    raise ValueError(f"Logical axis {name!r} has no sharding rule; known: {sorted(rules)}. "
                     f"Add it with make_rules({{{name!r}: ...}}).")
  return tuple(a for a in _as_axes(rules[name]) if a in mesh.shape)


def logical_to_mesh_spec(logical: PartitionSpec, shape: Sequence[int], mesh: Mesh,
                         rules: Optional[Rules] = None) -> PartitionSpec:
  """Resolves a spec of logical names against a concrete shape and mesh.

  Args:
    logical: PartitionSpec of logical names (or None), at most len(shape) entries.
    shape: the array's shape.
    mesh: the device mesh.
    rules: logical name -> mesh axes (`make_rules()` by default).
  Returns:
    PartitionSpec of mesh axes, one entry per dimension; a dimension whose size is not
    divisible by its mesh axes' size is replicated (and logged once).
  Raises:
    ValueError: a mesh axis is used twice, or a logical name has no rule.
  """
  rules = make_rules() if rules is None else rules
  names = tuple(logical)
  if len(names) > len(shape):
    raise ValueError(f"Logical spec {logical} has more entries than shape {tuple(shape)}.")
  names = names + (None,) * (len(shape) - len(names))
  used, out = {}, []
  for dim, (name, size) in enumerate(zip(names, shape)):
    axes = _mesh_axes_for(name, rules, mesh)
    for axis in axes:
      if axis in used:
        raise ValueError(f"Sharding rules map logical spec {logical} onto mesh axis {axis!r} "
                         f"twice (via {used[axis]!r} and {name!r}); a mesh axis may shard "
                         f"only one dimension of an array. Change the rules.")
      used[axis] = name
    ways = math.prod(mesh.shape[a] for a in axes)
    if axes and size % ways:
      key = (name, size, axes, ways)
      if key not in _LOGGED_FALLBACKS:
        _LOGGED_FALLBACKS.add(key)
        log.info("Logical axis %r of size %d is not divisible by mesh axes %s (%d ways): "
                 "replicating that dimension.", name, size, axes, ways)
      axes = ()
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def logical_to_sharding(logical: PartitionSpec, shape: Sequence[int], mesh: Mesh,
                        rules: Optional[Rules] = None) -> NamedSharding:
  """`logical_to_mesh_spec` wrapped in a NamedSharding."""
  return NamedSharding(mesh, logical_to_mesh_spec(logical, shape, mesh, rules))


def tree_shardings(logical_specs: Any, abstract_tree: Any, mesh: Mesh,
                   rules: Optional[Rules] = None) -> Any:
  """NamedShardings for a tree of arrays from a matching tree of logical PartitionSpecs."""
  return jax.tree.map(lambda spec, x: logical_to_sharding(spec, x.shape, mesh, rules),
                      logical_specs, abstract_tree,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that puts a full copy on every device of `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def flax_rules(mesh: Mesh, rules: Optional[Rules] = None) -> Tuple[Tuple[str, Any], ...]:
  """Our rules as Flax's `(logical name, mesh axes)` pairs, dropping axes `mesh` lacks.

  Args:
    mesh: the device mesh.
    rules: logical name -> mesh axes (`make_rules()` by default).
  Returns:
    A tuple of pairs for `nn.logical_axis_rules`; the axes entry is None (replicated), one
    axis name, or a tuple of names.
  """
  rules = make_rules() if rules is None else rules
  pairs = []
  for name, axes in rules.items():
    axes = tuple(a for a in _as_axes(axes) if a in mesh.shape)
    pairs.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
  return tuple(pairs)


def with_activation_sharding(fn, mesh: Mesh, rules: Optional[Rules] = None):
  """`fn`, traced under the logical-axis rules and the (abstract) mesh.

  Inside, Flax's `nn.with_logical_constraint` becomes a sharding constraint (e.g. the
  transformer's `constrain_hidden` pins hidden states [B, T, D] to rows over `batch`);
  without this context those calls are no-ops. Wrap the function before `jax.jit`.

  Args:
    fn: any traceable function.
    mesh: the device mesh the jitted function runs on.
    rules: logical name -> mesh axes (`make_rules()` by default).
  Returns:
    A function with `fn`'s signature.
  """
  pairs = flax_rules(mesh, rules)

  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(pairs):
      return fn(*args, **kwargs)

  traced.__name__ = getattr(fn, "__name__", "traced")
  return traced


# ----------------------------------------------------------------------------- params


def abstract_params(module, seq_len: int = 8) -> Any:
  """Shapes and dtypes of `module`'s params (ShapeDtypeStructs; nothing allocated)."""
  return jax.eval_shape(lambda rng: init_params(module, rng, seq_len), jax.random.PRNGKey(0))


def param_shardings(module, mesh: Mesh, rules: Optional[Rules] = None) -> Any:
  """NamedShardings of `module`'s params (same tree as `init_params(module, rng)`)."""
  return tree_shardings(logical_axes(module), abstract_params(module), mesh, rules)


def init_sharded_params(module, rng: jax.Array, mesh: Mesh,
                        rules: Optional[Rules] = None) -> Any:
  """Random params created directly in their shardings (never whole on one device)."""
  shardings = param_shardings(module, mesh, rules)
  return jax.jit(lambda key: init_params(module, key), out_shardings=shardings)(rng)


def _path_key(path) -> Tuple[str, ...]:
  return tuple(str(k) for k in path)


def opt_state_shardings(optimizer, abstract_params_tree: Any, params_shardings: Any,
                        mesh: Mesh) -> Any:
  """Shardings of `optimizer.init(params)`: param-like leaves follow their param.

  Optax states hold copies of the params tree (Adam's `mu`, `nu`) inside tuples and named
  tuples. A state leaf takes the sharding of the param whose tree path is a suffix of the
  leaf's path and whose shape matches; every other leaf (counts, scalars, injected
  hyper-parameters) is replicated.

  Args:
    optimizer: an `optax.GradientTransformation`.
    abstract_params_tree: the params, or their ShapeDtypeStructs.
    params_shardings: the params' shardings (same tree).
    mesh: the mesh for replicated leaves.
  Returns:
    A tree like `optimizer.init(params)` of NamedShardings.
  """
  by_path = {}
  flat_params = jax.tree_util.tree_leaves_with_path(abstract_params_tree)
  flat_shardings = jax.tree_util.tree_leaves(params_shardings)
  for (path, leaf), sharding in zip(flat_params, flat_shardings):
    by_path[_path_key(path)] = (tuple(leaf.shape), sharding)
  abstract_state = jax.eval_shape(optimizer.init, abstract_params_tree)
  rep = replicated(mesh)

  def pick(path, leaf):
    key = _path_key(path)
    for start in range(len(key)):
      hit = by_path.get(key[start:])
      if hit is not None and hit[0] == tuple(leaf.shape):
        return hit[1]
    return rep

  return jax.tree_util.tree_map_with_path(pick, abstract_state)


# ----------------------------------------------------------------------------- batches


def batch_sharding(mesh: Mesh, rules: Optional[Rules] = None) -> NamedSharding:
  """Leading (batch) dimension over the `batch` rule's mesh axes, the rest replicated.

  Valid for any array of rank >= 1 whose leading size is divisible by those axes' size;
  `batch_shardings` checks divisibility per array.
  """
  axes = _mesh_axes_for("batch", make_rules() if rules is None else rules, mesh)
  return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def batch_axes(mesh: Mesh, rules: Optional[Rules] = None) -> MeshAxes:
  """The mesh axes `batch_sharding` splits rows over (the `batch` rule's, in `mesh`)."""
  return _mesh_axes_for("batch", make_rules() if rules is None else rules, mesh)


def batch_axis_size(mesh: Mesh, rules: Optional[Rules] = None) -> int:
  """How many ways `batch_sharding` splits rows: the product of the `batch` axes' sizes."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def check_batch_rows(rows: int, mesh: Mesh, rules: Optional[Rules] = None,
                     what: str = "the batch", fix: str = "") -> None:
  """Raises a ValueError naming what to change unless `rows` splits evenly over the mesh.

  Args:
    rows: rows of every batch the step will see.
    mesh, rules: as in `batch_sharding`.
    what: how the config produces `rows` (e.g. "prm.batch_size").
    fix: the config fields to change, for the message (defaults to `what`).
  """
  ways = batch_axis_size(mesh, rules)
  if rows % ways:
    axes = _mesh_axes_for("batch", make_rules() if rules is None else rules, mesh)
    sizes = {a: int(mesh.shape[a]) for a in axes}
    raise ValueError(
        f"{what} = {rows} rows cannot be split over the mesh's batch axes {sizes} "
        f"({ways} ways). Make it a multiple of {ways}: change {fix or what}, or "
        f"mesh.shape (now {dict(mesh.shape)}).")


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh, rules: Optional[Rules] = None
                    ) -> dict:
  """Per-array shardings of a batch: dim 0 is `batch`, dim 1 (if any) is `length`."""
  def one(x):
    ndim = np.ndim(x)
    logical = PartitionSpec(*(("batch", "length")[:ndim] + (None,) * max(0, ndim - 2)))
    return logical_to_sharding(logical, np.shape(x), mesh, rules)
  return {k: one(v) for k, v in batch.items()}


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, rules: Optional[Rules] = None) -> dict:
  """Single host: places each array of `batch` ([B, ...]) across the mesh by rows."""
  shardings = batch_shardings(batch, mesh, rules)
  return {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}
