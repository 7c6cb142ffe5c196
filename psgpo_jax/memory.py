"""A memory planner: bytes per device of a PSGPO run for a model config and a mesh.

    plan = plan_memory(cfg, (2, 4, 1), batch=16, seq_len=640, rollout_batch=64,
                       max_len=640)
    print(format_plan(plan))
    check_fits(plan, device_bytes=16 * 2**30)      # raises NotEnoughMemoryError

Nothing is allocated: parameter shapes come from `jax.eval_shape`, and each parameter's
partition over the mesh is the one the sharding rules give it
(`sharding.param_shardings` on an `AbstractMesh`, so any mesh can be planned on any
machine). What is counted, per device:

  * params/<model>: every model that is resident during the RL stage (policy, value,
    frozen reference, frozen PRM by default), each leaf's shard shape x its dtype.
  * grads/<model>, opt_state/<model>: for the trained models only (policy and value by
    default). Gradients have the params' shardings; the optimizer state is the real
    `train_step.make_optimizer` state (Adam: `mu` and `nu` like the params, plus step
    counts and the injected learning rate), sharded by `sharding.opt_state_shardings`.
  * kv_cache: the sampler's cache, `rollout_batch x max_len x layers x 2 (k, v) x kv_heads
    x head_dim` in the compute dtype, split as the `cache_*` rules say (as `sampling.Sampler`
    pins it): by default rows over data and fsdp, kv heads over tensor when they divide.
  * activations/<model>: an estimate (below) of what one training step keeps for the
    backward pass, for each trained model, with the step's rows split over the `batch`
    rule's axes and heads / mlp / vocab over `tensor` as the rules say.

Activation estimate. With B rows of T tokens (per device), hidden D, heads H, kv heads K,
head dim Dh, MLP width F, vocab V, b bytes per compute-dtype element, one decoder layer
keeps for backprop

    B*T*(4*D + (2*H + 2*K)*Dh + 3*F) * b        residual + norm inputs/outputs (4 D),
                                                q, k, v and the attention output,
                                                gate, up and silu(gate)*up (3 F)
  + B*H*T*T * (4 + b) * (n + 1) / (2n)         float32 scores and the softmax probs, over
                                                n causal query blocks (`model.attention_
                                                query_block`; n = 1 without blocking)

Without remat all L layers keep this. With remat (`model.remat`, `nn.remat` per layer)
each layer keeps only its input (B*T*D*b) and one layer's full set is live again during
its backward. Both add the embedding output and final norm (2*B*T*D*b), the gradients of
the layer being back-propagated (one layer's full set again) and, for the causal LM, the
float32 logits and log-softmax and the logits' gradient (3*B*T*V*4). Against XLA's own
count (`compile().memory_analysis().temp_size_in_bytes` of the gradient step,
tests/test_memory.py) the estimate is within 20% on the sizes tested; treat it as a
planning estimate, not a promise.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, PartitionSpec

from psgpo_jax import sharding as sharding_lib
from psgpo_jax import train_step
from psgpo_jax.models import CausalLM, ModelConfig, ScalarModel
from psgpo_jax.models.transformer import CACHE_AXES
from psgpo_jax.rl.advantages import rl_models

MODELS = ("policy", "value", "reference", "prm")
OPTIMIZERS = ("adamw", "adam", "sgd")
GiB = 2**30


class NotEnoughMemoryError(ValueError):
  """A config and mesh need more bytes per device than a device has."""


@dataclasses.dataclass(frozen=True)
class MemoryItem:
  """One line of a plan.

  Attributes:
    name: e.g. "params/policy", "opt_state/value", "kv_cache", "activations/policy".
    bytes: bytes per device (the largest over the mesh's devices).
    detail: how it was counted, for the table.
  """
  name: str
  bytes: int
  detail: str = ""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Bytes per device of one config on one mesh.

  Attributes:
    mesh_shape: (data, fsdp, tensor) sizes, -1 resolved.
    axis_names: the mesh axis names.
    items: the counted items.
    device_bytes: the device capacity given or detected (None if unknown).
  """
  mesh_shape: Tuple[int, ...]
  axis_names: Tuple[str, ...]
  items: Tuple[MemoryItem, ...]
  device_bytes: Optional[int] = None

  @property
  def total(self) -> int:
    """Sum of all items, bytes per device."""
    return sum(item.bytes for item in self.items)

  def bytes_of(self, prefix: str) -> int:
    """Sum of the items whose name starts with `prefix` (e.g. "params/")."""
    return sum(item.bytes for item in self.items if item.name.startswith(prefix))

  def largest(self, n: int = 3) -> Tuple[MemoryItem, ...]:
    return tuple(sorted(self.items, key=lambda item: -item.bytes)[:n])

  @property
  def fits(self) -> Optional[bool]:
    """Whether the total fits `device_bytes` (None when that is unknown)."""
    return None if self.device_bytes is None else self.total <= self.device_bytes


# ----------------------------------------------------------------------------- helpers


def format_bytes(n: float) -> str:
  """1536 -> '1.5 KiB'; binary units."""
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} TiB"    # pragma: no cover


def detect_device_bytes() -> Optional[int]:
  """`bytes_limit` of the first device's memory stats, or None (CPU, or not reported)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats or not stats.get("bytes_limit"):
    return None
  return int(stats["bytes_limit"])


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: Optional[int] = None
                       ) -> Tuple[int, ...]:
  """Fills a -1 in `mesh_shape` from `num_devices` (default: `jax.device_count()`)."""
  shape = tuple(int(s) for s in mesh_shape)
  if any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: sizes must be positive, with at most one -1.")
  if -1 not in shape:
    return shape
  n = jax.device_count() if num_devices is None else int(num_devices)
  known = math.prod(s for s in shape if s != -1)
  if n % known:
    raise ValueError(f"mesh shape {shape}: the fixed axes need a multiple of {known} "
                     f"devices, but there are {n}.")
  return tuple(n // known if s == -1 else s for s in shape)


def _abstract_mesh(shape: Tuple[int, ...], axis_names: Sequence[str]) -> AbstractMesh:
  if len(shape) != len(axis_names):
    raise ValueError(f"mesh shape {shape} has {len(shape)} axes but axis_names "
                     f"{tuple(axis_names)} has {len(axis_names)}.")
  return AbstractMesh(shape, tuple(axis_names))


def _tree_bytes(abstract: Any, shardings: Any) -> int:
  """Per-device bytes of a tree of ShapeDtypeStructs under a matching tree of shardings."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    shard = sharding.shard_shape(tuple(leaf.shape))
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


def _shard_elems(logical: Tuple[Optional[str], ...], shape: Tuple[int, ...], mesh,
                 rules: Mapping[str, Any]) -> int:
  """Elements per device of an array with logical axes `logical`, as the rules shard it."""
  spec = sharding_lib.logical_to_mesh_spec(PartitionSpec(*logical), shape, mesh, rules)
  ways = []
  for entry in tuple(spec) + (None,) * (len(shape) - len(tuple(spec))):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    ways.append(math.prod(mesh.shape[a] for a in axes))
  return math.prod(-(-size // w) for size, w in zip(shape, ways))


def _abstract_params_and_shardings(module, mesh, rules) -> Tuple[Any, Any]:
  """(ShapeDtypeStructs, shardings) of `module`'s params from one `jax.eval_shape`.

  The same trees as `sharding.abstract_params` and `sharding.param_shardings`, traced
  once instead of twice (a 7B model's init takes seconds to trace).
  """
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), tokens)["params"]
  abstract = nn.unbox(boxed)
  specs = nn.get_partition_spec(boxed)
  return abstract, sharding_lib.tree_shardings(specs, abstract, mesh, rules)


def _module(name: str, cfg: ModelConfig):
  return CausalLM(cfg) if name in ("policy", "reference") else ScalarModel(cfg)


def _optimizer(name: str):
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer={name!r}; choose one of {OPTIMIZERS}.")
  if name == "sgd":
    return None
  return train_step.make_optimizer(1e-4, weight_decay=0.01 if name == "adamw" else 0.0)


# ----------------------------------------------------------------------------- estimates


def kv_cache_bytes(cfg: ModelConfig, mesh, rules: Mapping[str, Any], rollout_batch: int,
                   max_len: int) -> int:
  """Per-device bytes of the sampler's KV cache.

  Each cache tensor [rows, kv_heads, slots, head_dim] is split as the `cache_*` rules say
  (`transformer.CACHE_AXES`; by default rows over data and fsdp, as the sampler splits
  them, kv heads over tensor when they divide); all layers, keys and values, compute dtype.
  """
  shape = (rollout_batch, cfg.num_key_value_heads, max_len, cfg.kv_head_dim)
  per_layer = _shard_elems(CACHE_AXES, shape, mesh, rules)
  itemsize = np.dtype(cfg.compute_dtype).itemsize
  return per_layer * 2 * cfg.num_hidden_layers * itemsize


def activation_bytes(cfg: ModelConfig, mesh, rules: Mapping[str, Any], batch: int,
                     seq_len: int, remat: bool, with_logits: bool = True) -> int:
  """Per-device bytes one training step keeps for backprop (see the module docstring).

  Args:
    cfg: the model config.
    mesh: a Mesh or AbstractMesh.
    rules: sharding rules (logical name -> mesh axes).
    batch: rows of one gradient step (a PPO minibatch), before splitting over devices.
    seq_len: tokens per row.
    remat: whether each decoder layer is rematerialised.
    with_logits: count the LM head's logits (the causal LM; not the scalar head).
  """
  b_, t = batch, seq_len
  d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  h, k, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.kv_head_dim
  b = np.dtype(cfg.compute_dtype).itemsize
  elems = lambda logical, shape: _shard_elems(logical, shape, mesh, rules)
  hidden = elems(("batch", "length", None), (b_, t, d))
  q_like = elems(("batch", "length", "heads", "head_dim"), (b_, t, h, dh))
  kv_like = elems(("batch", "length", "kv_heads", "head_dim"), (b_, t, k, dh))
  mlp = elems(("batch", "length", "mlp"), (b_, t, f))
  # Causal attention in n query blocks keeps sum_i block * (i + 1) * block score entries.
  blocks = math.ceil(t / cfg.attention_query_block) if 0 < cfg.attention_query_block < t else 1
  scores = elems(("batch", "heads", "length", None), (b_, h, t, t)) * (blocks + 1) // (2 * blocks)
  full_layer = (4 * hidden + 2 * q_like + 2 * kv_like + 3 * mlp) * b + scores * (4 + b)
  if remat:
    layers = cfg.num_hidden_layers * hidden * b + full_layer
  else:
    layers = cfg.num_hidden_layers * full_layer
  backward = full_layer          # the gradients of the layer being back-propagated
  outside = 2 * hidden * b
  if with_logits:
    logits = elems(("batch", "length", "vocab"), (b_, t, v)) * 4
    outside += 2 * logits
    backward += logits           # the gradient of the logits
  return layers + backward + outside


# ----------------------------------------------------------------------------- the plan


def plan_memory(model_cfg: ModelConfig, mesh_shape: Sequence[int], *, batch: int,
                seq_len: int, rollout_batch: int, max_len: int, optimizer: str = "adamw",
                models: Sequence[str] = MODELS,
                trainable: Sequence[str] = ("policy", "value"), remat: bool = False,
                device_bytes: Optional[int] = None,
                rules: Optional[Mapping[str, Any]] = None,
                axis_names: Sequence[str] = sharding_lib.AXIS_NAMES,
                num_devices: Optional[int] = None) -> MemoryPlan:
  """Bytes per device of params, gradients, optimizer state, KV cache and activations.

  Args:
    model_cfg: the policy's config (value, reference and PRM share its backbone).
    mesh_shape: (data, fsdp, tensor) sizes; one -1 takes the remaining devices
      (`num_devices`, default `jax.device_count()`).
    batch: rows per gradient step (a PPO minibatch), all devices together.
    seq_len: tokens per training row (prompt + response).
    rollout_batch: rows the sampler decodes at once (prompts x samples per prompt).
    max_len: KV-cache slots per row (padded prompt + max new tokens).
    optimizer: "adamw" / "adam" (two moments per param) or "sgd" (no state).
    models: the resident models: any of "policy", "reference" (CausalLM), "value",
      "prm" (ScalarModel).
    trainable: those of `models` that get gradients, optimizer state and activations.
    remat: rematerialise decoder layers (`model.remat`); `model_cfg.remat` also counts.
    device_bytes: capacity of one device; default: detected (`detect_device_bytes`).
    rules: sharding rules (default `sharding.make_rules()`).
    axis_names: the mesh axis names.
  Returns:
    A MemoryPlan; `check_fits` raises when it does not fit.
  """
  unknown = [m for m in tuple(models) + tuple(trainable) if m not in MODELS]
  if unknown:
    raise ValueError(f"Unknown model(s) {unknown}; choose from {MODELS}.")
  if not set(trainable) <= set(models):
    raise ValueError(f"trainable={tuple(trainable)} must be a subset of models="
                     f"{tuple(models)}.")
  shape = resolve_mesh_shape(mesh_shape, num_devices)
  mesh = _abstract_mesh(shape, axis_names)
  rules = sharding_lib.make_rules(rules)
  opt = _optimizer(optimizer)
  remat = bool(remat or model_cfg.remat)
  items = []
  cache = {}
  for name in models:
    module = _module(name, model_cfg)
    kind = type(module).__name__
    if kind not in cache:
      abstract, shardings = _abstract_params_and_shardings(module, mesh, rules)
      count = sum(x.size for x in jax.tree.leaves(abstract))
      cache[kind] = (abstract, shardings, count, _tree_bytes(abstract, shardings))
    abstract, shardings, count, nbytes = cache[kind]
    dtype = model_cfg.param_dtype
    items.append(MemoryItem(f"params/{name}", nbytes, f"{kind}, {count:,} params ({dtype})"))
    if name in trainable:
      items.append(MemoryItem(f"grads/{name}", nbytes, "like the params"))
      if opt is not None:
        opt_abstract = jax.eval_shape(opt.init, abstract)
        opt_shardings = sharding_lib.opt_state_shardings(opt, abstract, shardings, mesh)
        items.append(MemoryItem(f"opt_state/{name}", _tree_bytes(opt_abstract, opt_shardings),
                                f"{optimizer}: 2 moments like the params + scalars"))
      items.append(MemoryItem(
          f"activations/{name}",
          activation_bytes(model_cfg, mesh, rules, batch, seq_len, remat,
                           with_logits=kind == "CausalLM"),
          f"{batch} rows x {seq_len} tokens, remat={'on' if remat else 'off'} (estimate)"))
  if "policy" in models and rollout_batch:
    items.append(MemoryItem(
        "kv_cache", kv_cache_bytes(model_cfg, mesh, rules, rollout_batch, max_len),
        f"{rollout_batch} rows x {max_len} slots x {model_cfg.num_hidden_layers} layers"))
  if device_bytes is None:
    device_bytes = detect_device_bytes()
  return MemoryPlan(shape, tuple(axis_names), tuple(items), device_bytes)


def check_fits(plan: MemoryPlan, device_bytes: Optional[int] = None) -> MemoryPlan:
  """Returns `plan` if its total fits a device, else raises NotEnoughMemoryError.

  Args:
    plan: from `plan_memory`.
    device_bytes: capacity of one device; default: the plan's, else detected from
      `jax.devices()[0].memory_stats()['bytes_limit']`.
  Raises:
    NotEnoughMemoryError naming the total, the capacity and the largest items.
    ValueError when no capacity is given and none can be detected (e.g. on CPU).
  """
  if device_bytes is None:
    device_bytes = plan.device_bytes or detect_device_bytes()
  if device_bytes is None:
    raise ValueError("check_fits needs device_bytes: this device reports no memory limit "
                     "(e.g. CPU); pass the capacity of one accelerator in bytes.")
  total = plan.total
  if total <= device_bytes:
    return plan
  mesh = ", ".join(f"{n}={s}" for n, s in zip(plan.axis_names, plan.mesh_shape))
  largest = ", ".join(f"{item.name} {format_bytes(item.bytes)}" for item in plan.largest(3))
  raise NotEnoughMemoryError(
      f"This config needs {format_bytes(total)} ({total:,} bytes) per device on the mesh "
      f"({mesh}), but a device has {format_bytes(device_bytes)} ({device_bytes:,} bytes). "
      f"Largest items: {largest}. Shard further (a larger fsdp or tensor axis), turn on "
      f"model.remat, lower the batch or rollout size, or use bfloat16 params.")


def format_plan(plan: MemoryPlan) -> str:
  """A plain-text table: one row per item, the total and the device capacity."""
  mesh = ", ".join(f"{n}={s}" for n, s in zip(plan.axis_names, plan.mesh_shape))
  width = max([len(item.name) for item in plan.items] + [12])
  lines = [f"memory per device, mesh ({mesh}), {math.prod(plan.mesh_shape)} devices",
           f"{'item':<{width}}  {'bytes':>12}  detail"]
  for item in plan.items:
    lines.append(f"{item.name:<{width}}  {format_bytes(item.bytes):>12}  {item.detail}")
  lines.append(f"{'total':<{width}}  {format_bytes(plan.total):>12}  {plan.total:,} bytes")
  if plan.device_bytes is not None:
    share = plan.total / plan.device_bytes
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"{'device':<{width}}  {format_bytes(plan.device_bytes):>12}  "
                 f"{verdict} ({share:.0%} used)")
  return "\n".join(lines)


def plan_from_config(config: Any, model_cfg: Optional[ModelConfig] = None,
                     device_bytes: Optional[int] = None,
                     num_devices: Optional[int] = None) -> MemoryPlan:
  """The plan of a pipeline config's RL stage (the stage with the most resident models).

  Rows per gradient step = rl.prompts_per_step * rl.samples_per_prompt /
  (rl.num_minibatches * rl.micro_batches) (a micro-batch's activations are what is live);
  tokens per row = data.max_prompt_tokens + sampling.max_new_tokens
  (also the KV-cache slots); the sampler decodes all rollouts of a step at once.
  """
  from psgpo_jax.configuration import model_config  # pylint: disable=import-outside-toplevel
  if model_cfg is None:
    if config.model.path:
      from psgpo_jax.models.hf_config import load_hf_config  # pylint: disable=import-outside-toplevel
      model_cfg = load_hf_config(config.model.path).with_execution_fields(config.model)
    else:
      model_cfg = model_config(config.model, vocab_size=config.tokenizer.vocab_size)
  rl = config.rl
  rollouts = int(rl.prompts_per_step * rl.samples_per_prompt)
  seq_len = int(config.data.max_prompt_tokens + config.sampling.max_new_tokens)
  models = rl_models(rl)
  critic = "value" in models                        # RLOO / GRPO: no value model
  mesh = config.mesh
  rows = rollouts // (rl.num_minibatches * rl.get("micro_batches", 1))
  return plan_memory(model_cfg, tuple(mesh.shape), batch=max(1, rows),
                     seq_len=seq_len, rollout_batch=rollouts, max_len=seq_len,
                     models=models,
                     trainable=("policy", "value") if critic else ("policy",),
                     remat=bool(config.model.remat),
                     device_bytes=device_bytes,
                     rules=sharding_lib.parse_rules(mesh.get("rules", None)),
                     num_devices=num_devices)
