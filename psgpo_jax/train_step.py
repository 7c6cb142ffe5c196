"""The one step builder: every trained model (SFT, PRM, PPO policy + value) goes through it.

Three layers, each a pure function:

  * `make_optimizer(...)`: global-norm clipping, then AdamW with a warmup + constant or
    cosine learning-rate schedule (the current rate lives in the optimizer state, so it can
    be reported and is checkpointed).
  * `gradient_update(loss_fn, optimizer)` / `multi_gradient_update(loss_fn, optimizers)`:
    `update(state, batch, rng) -> (state, metrics)` for one gradient step, with a
    non-finite guard and optional gradient accumulation over micro-batches
    (`micro_value_and_grad`). Pure and traceable, so PPO composes it inside `lax.scan`
    over epochs and minibatches.
  * `make_train_step(update, mesh, state_shardings, batch_shardings)`: `jax.jit` with
    explicit in/out shardings and the state donated; with a mesh the update is traced
    under the logical-axis rules (`sharding.with_activation_sharding`).

    optimizer = make_optimizer(lr=1e-4, total_steps=1000, schedule="cosine")
    shardings = state_shardings(CausalLM(cfg), optimizer, mesh)
    state = init_train_state(CausalLM(cfg), optimizer, rng, mesh)
    step = make_train_step(gradient_update(loss_fn, optimizer), mesh, shardings)
    state, metrics = step(state, batch, rng)
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from psgpo_jax import sharding as sharding_lib
from psgpo_jax.models import init_params

Array = jax.Array
Metrics = Dict[str, Array]
LossFn = Callable[[Any, Mapping[str, Array], Array], Tuple[Array, Metrics]]
UpdateFn = Callable[[Any, Mapping[str, Array], Array], Tuple[Any, Metrics]]


@flax.struct.dataclass
class TrainState:
  """What one trained model carries between steps (the optimizer itself is not in it).

  Attributes:
    step: int32 scalar, number of update calls (skipped non-finite updates included).
    params: the model's params pytree.
    opt_state: the optimizer's state for `params`.
  """
  step: Array
  params: Any
  opt_state: Any

  @classmethod
  def create(cls, params: Any, optimizer: optax.GradientTransformation) -> "TrainState":
    """A fresh state at step 0."""
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


# ----------------------------------------------------------------------------- optimizer


SCHEDULES = ("constant", "cosine", "wsd")
WSD_DECAY_FRACTION = 0.2     # wsd: share of the steps spent decaying (linearly) to 0


def make_schedule(lr: float, warmup_steps: int = 0, total_steps: int = 0,
                  schedule: str = "constant") -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then one of:

    constant: `lr` to the end;
    cosine:   cosine decay to 0 at `total_steps`;
    wsd:      warmup-stable-decay: `lr` until the last `WSD_DECAY_FRACTION` of
              `total_steps`, then linear decay to 0 (Hu et al. 2024). On the synthetic
              suite's SFT (1000 steps) it ends at half the loss of cosine: the model's
              copying skill forms after a plateau, which a high learning rate crosses
              sooner.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule={schedule!r}; choose one of {SCHEDULES}.")
  warmup_steps = int(warmup_steps)
  if schedule in ("cosine", "wsd") and total_steps <= warmup_steps:
    raise ValueError(f"A {schedule} schedule needs total_steps ({total_steps}) > "
                     f"warmup_steps ({warmup_steps}).")
  if schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, int(total_steps), 0.0)
  if schedule == "wsd":
    decay = max(1, int(round(WSD_DECAY_FRACTION * (total_steps - warmup_steps))))
    stable = int(total_steps) - warmup_steps - decay
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup_steps, 1)), optax.constant_schedule(lr),
         optax.linear_schedule(lr, 0.0, decay)],
        [warmup_steps, warmup_steps + stable])
  if warmup_steps <= 0:
    return optax.constant_schedule(lr)
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps),
                               optax.constant_schedule(lr)], [warmup_steps])


def _decay_mask(params: Any) -> Any:
  """Weight decay on matrices only (not on norms' scales or biases)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(lr: float, weight_decay: float = 0.0, grad_clip: Optional[float] = 1.0,
                   warmup_steps: int = 0, total_steps: int = 0, b1: float = 0.9,
                   b2: float = 0.999, schedule: str = "constant", eps: float = 1e-8
                   ) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW (decoupled decay on >=2-D params) with a schedule.

  Equivalent to `optax.chain(clip_by_global_norm, adamw(schedule, ...))`, written out so
  that the learning rate of the current step is stored in the optimizer state
  (`current_learning_rate` reads it). `grad_clip` None or <= 0 disables clipping.
  """
  parts = []
  if grad_clip is not None and grad_clip > 0:
    parts.append(optax.clip_by_global_norm(grad_clip))
  parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay, mask=_decay_mask))
  parts.append(optax.inject_hyperparams(optax.scale_by_learning_rate)(
      learning_rate=make_schedule(lr, warmup_steps, total_steps, schedule)))
  return optax.chain(*parts)


def current_learning_rate(opt_state: Any) -> Optional[Array]:
  """The learning rate injected in `opt_state` (of the last update), or None if absent."""
  found = []

  def visit(node):
    hyper = getattr(node, "hyperparams", None)
    if isinstance(hyper, Mapping) and "learning_rate" in hyper:
      found.append(hyper["learning_rate"])
      return
    if isinstance(node, (tuple, list)):
      for child in node:
        visit(child)
    elif isinstance(node, Mapping):
      for child in node.values():
        visit(child)

  visit(opt_state)
  return jnp.asarray(found[0], jnp.float32) if found else None


# ----------------------------------------------------------------------------- updates


def _all_finite(tree: Any) -> Array:
  """Scalar bool: every element of every inexact leaf of `tree` is finite."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return jnp.asarray(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _select(keep_new: Array, new: Any, old: Any) -> Any:
  return jax.tree.map(lambda n, o: jnp.where(keep_new, n, o), new, old)


def _apply_gradients(state: TrainState, grads: Any, optimizer: optax.GradientTransformation,
                     ok: Array) -> Tuple[TrainState, Metrics]:
  """One optimizer step, kept only where `ok`; returns the new state and its metrics."""
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new = TrainState(step=state.step + 1, params=_select(ok, params, state.params),
                   opt_state=_select(ok, opt_state, state.opt_state))
  metrics = {"grad_norm": optax.global_norm(grads).astype(jnp.float32)}
  lr = current_learning_rate(opt_state)
  if lr is not None:
    metrics["lr"] = lr
  return new, metrics


def split_micro_batches(batch: Mapping[str, Array], micro_batches: int) -> Dict[str, Array]:
  """[R, ...] arrays -> [micro_batches, R / micro_batches, ...], micro-batch i = rows i::k.

  Strided rows keep each micro-batch spread over the devices that hold the batch's rows
  (a row-sharded batch stays local), where contiguous blocks would move rows between
  devices.
  """
  rows = {int(x.shape[0]) for x in jax.tree.leaves(batch)}
  if len(rows) != 1:
    raise ValueError(f"Batch arrays disagree on the row count: {sorted(rows)}.")
  rows = rows.pop()
  if rows % micro_batches:
    raise ValueError(f"A batch of {rows} rows does not split into {micro_batches} "
                     f"micro-batches; make the rows a multiple of the micro-batch count.")
  return jax.tree.map(
      lambda x: jnp.swapaxes(x.reshape((rows // micro_batches, micro_batches) + x.shape[1:]),
                             0, 1), dict(batch))


def micro_value_and_grad(loss_fn: LossFn, micro_batches: int = 1,
                         weight_key: Optional[str] = None):
  """`jax.value_and_grad(loss_fn, has_aux=True)`, accumulated over micro-batches.

  The batch's rows are split into `micro_batches` parts (`split_micro_batches`) that a
  `lax.scan` runs one after another, so only one part's activations are alive at a time.
  Each part's loss, gradients and metrics are weighted by its share of the batch's
  tokens, `sum(batch[weight_key])` (equal shares without a key or when the batch has no
  such tokens). For a loss that is a mean over those tokens (`masked_mean`) the
  accumulated loss and gradients equal the whole batch's (up to float rounding), and
  so do token-mean metrics; a metric that is a count becomes a weighted mean.

  Args:
    loss_fn: `(params, batch, rng) -> (scalar loss, dict of scalar metrics)`.
    micro_batches: parts per batch (1: plain value_and_grad).
    weight_key: the batch field whose sum counts a part's tokens (e.g. "response_mask").
  Returns:
    `(params, batch, rng) -> ((loss, metrics), grads)`.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if micro_batches < 1:
    raise ValueError(f"micro_batches={micro_batches} must be >= 1.")
  if micro_batches == 1:
    return grad_fn

  def accumulated(params, batch, rng):
    parts = split_micro_batches(batch, micro_batches)
    if weight_key is None:
      weights = jnp.full((micro_batches,), 1.0 / micro_batches, jnp.float32)
    else:
      tokens = jnp.sum(parts[weight_key].reshape(micro_batches, -1).astype(jnp.float32), -1)
      total = jnp.sum(tokens)
      weights = jnp.where(total > 0, tokens / jnp.maximum(total, 1.0), 1.0 / micro_batches)

    def add_part(acc, xs):
      part, weight, key = xs
      out = grad_fn(params, part, key)
      return jax.tree.map(lambda a, x: a + weight * x.astype(a.dtype), acc, out), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                         jax.eval_shape(grad_fn, params,
                                        jax.tree.map(lambda x: x[0], parts), rng))
    total, _ = jax.lax.scan(add_part, zeros,
                            (parts, weights, jax.random.split(rng, micro_batches)))
    return total

  return accumulated


def gradient_update(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    micro_batches: int = 1, weight_key: Optional[str] = None) -> UpdateFn:
  """One gradient step on one model.

  Args:
    loss_fn: `(params, batch, rng) -> (scalar loss, dict of scalar metrics)`.
    optimizer: applied to the gradients of the loss.
    micro_batches, weight_key: gradient accumulation (`micro_value_and_grad`).
  Returns:
    `update(state: TrainState, batch, rng) -> (TrainState, metrics)`, pure. If the loss or
    any gradient is NaN/Inf, params and opt_state are returned unchanged (the step counter
    still advances) and `metrics["nonfinite"]` is 1.0 (else 0.0). Metrics also hold
    `loss`, `grad_norm`, `lr` (when the optimizer injects it) and the loss's own metrics.
  """
  grad_fn = micro_value_and_grad(loss_fn, micro_batches, weight_key)

  def update(state: TrainState, batch: Mapping[str, Array], rng: Array
             ) -> Tuple[TrainState, Metrics]:
    (loss, aux), grads = grad_fn(state.params, batch, rng)
    ok = jnp.isfinite(loss) & _all_finite(grads)
    state, step_metrics = _apply_gradients(state, grads, optimizer, ok)
    metrics = {**aux, **step_metrics, "loss": loss.astype(jnp.float32),
               "nonfinite": 1.0 - ok.astype(jnp.float32)}
    return state, metrics

  return update


def multi_gradient_update(loss_fn: LossFn, optimizers: Mapping[str, optax.GradientTransformation],
                          micro_batches: int = 1, weight_key: Optional[str] = None
                          ) -> UpdateFn:
  """One gradient step on several models with a joint loss (PPO: policy + value).

  Args:
    loss_fn: `(params: {name: params}, batch, rng) -> (scalar loss, metrics)`.
    optimizers: `{name: optimizer}`, one per model (own learning rate, clipping, ...).
    micro_batches, weight_key: gradient accumulation (`micro_value_and_grad`).
  Returns:
    `update(states: {name: TrainState}, batch, rng) -> ({name: TrainState}, metrics)`.
    The non-finite guard is joint: if the loss or any model's gradient is not finite, no
    model changes. Metrics: `loss`, `nonfinite`, `{name}/grad_norm`, `{name}/lr`, and the
    loss's own metrics.
  """
  grad_fn = micro_value_and_grad(loss_fn, micro_batches, weight_key)
  names = tuple(optimizers)

  def update(states: Mapping[str, TrainState], batch: Mapping[str, Array], rng: Array
             ) -> Tuple[Dict[str, TrainState], Metrics]:
    if set(states) != set(names):
      raise ValueError(f"States {sorted(states)} do not match optimizers {sorted(names)}.")
    params = {name: states[name].params for name in names}
    (loss, aux), grads = grad_fn(params, batch, rng)
    ok = jnp.isfinite(loss) & _all_finite(grads)
    new_states, metrics = {}, dict(aux)
    for name in names:
      new_states[name], own = _apply_gradients(states[name], grads[name], optimizers[name], ok)
      metrics.update({f"{name}/{k}": v for k, v in own.items()})
    metrics.update(loss=loss.astype(jnp.float32), nonfinite=1.0 - ok.astype(jnp.float32))
    return new_states, metrics

  return update


# ----------------------------------------------------------------------------- jit + shardings


def make_train_step(update_fn: UpdateFn, mesh: Optional[Mesh] = None,
                    state_shardings: Any = None, batch_shardings: Any = None,
                    donate: bool = True, rules: Optional[sharding_lib.Rules] = None
                    ) -> UpdateFn:
  """Jits `update_fn(state, batch, rng) -> (state, metrics)` once for all same-shape batches.

  Args:
    update_fn: e.g. `gradient_update(...)` or a PPO update over epochs x minibatches.
    mesh: None for a plain single-device jit.
    state_shardings: shardings of the state (`state_shardings(...)`); required with a mesh.
    batch_shardings: one sharding for every batch array, or a dict like the batch;
      defaults to `sharding.batch_sharding(mesh)` (rows over the `batch` mesh axes, so
      every array needs rank >= 1 and a row count divisible by those axes' size; else
      pass `sharding.batch_shardings(example_batch, mesh)`, which replicates the rest).
    donate: donate the input state's buffers (the caller must not reuse them).
    rules: logical name -> mesh axes for the activation constraints (default rules).
  Returns:
    The jitted step. With a mesh the rng and all metrics are replicated, and the update
    is traced under `sharding.with_activation_sharding(update_fn, mesh, rules)`, so the
    model's activation constraints (hidden states split by rows) are active.
  """
  donate_argnums = (0,) if donate else ()
  if mesh is None:
    return jax.jit(update_fn, donate_argnums=donate_argnums)
  if state_shardings is None:
    raise ValueError("make_train_step with a mesh needs state_shardings "
                     "(build them with train_step.state_shardings).")
  if batch_shardings is None:
    batch_shardings = sharding_lib.batch_sharding(mesh)
  rep = sharding_lib.replicated(mesh)
  update_fn = sharding_lib.with_activation_sharding(update_fn, mesh, rules)
  return jax.jit(update_fn, in_shardings=(state_shardings, batch_shardings, rep),
                 out_shardings=(state_shardings, rep), donate_argnums=donate_argnums)


def _single_state_shardings(module, optimizer, mesh, rules) -> TrainState:
  abstract = sharding_lib.abstract_params(module)
  params = sharding_lib.param_shardings(module, mesh, rules)
  return TrainState(step=sharding_lib.replicated(mesh), params=params,
                    opt_state=sharding_lib.opt_state_shardings(optimizer, abstract, params,
                                                               mesh))


def state_shardings(module_or_modules, optimizer_or_optimizers, mesh: Mesh,
                    rules: Optional[sharding_lib.Rules] = None):
  """Shardings of a TrainState, or of a dict of them.

  Args:
    module_or_modules: a flax module, or `{name: module}`.
    optimizer_or_optimizers: one optimizer (shared) or `{name: optimizer}`.
    mesh, rules: as in `psgpo_jax.sharding`.
  Returns:
    A TrainState of NamedShardings, or `{name: TrainState}` for a dict of modules.
  """
  if isinstance(module_or_modules, Mapping):
    opts = optimizer_or_optimizers
    if not isinstance(opts, Mapping):
      opts = {name: opts for name in module_or_modules}
    return {name: _single_state_shardings(module, opts[name], mesh, rules)
            for name, module in module_or_modules.items()}
  return _single_state_shardings(module_or_modules, optimizer_or_optimizers, mesh, rules)


def init_train_state(module, optimizer: optax.GradientTransformation, rng: Array,
                     mesh: Optional[Mesh] = None,
                     rules: Optional[sharding_lib.Rules] = None) -> TrainState:
  """A fresh TrainState with random params; with a mesh, created directly sharded."""
  def create(key):
    return TrainState.create(init_params(module, key), optimizer)
  if mesh is None:
    return jax.jit(create)(rng)
  shardings = state_shardings(module, optimizer, mesh, rules)
  return jax.jit(create, out_shardings=shardings)(rng)


def place_state(state: Any, shardings: Any) -> Any:
  """Puts an existing state (e.g. params loaded from disk) onto `shardings`."""
  return jax.device_put(state, shardings)


def single_model_step(update_fn: UpdateFn, state: TrainState, module,
                      optimizer: optax.GradientTransformation, mesh: Optional[Mesh] = None,
                      rules: Optional[sharding_lib.Rules] = None
                      ) -> Tuple[TrainState, UpdateFn]:
  """(state placed on the mesh, its jitted step) for one model's training (SFT, PRM).

  Without a mesh the state is returned as is with a plain jitted step; with one, the
  state goes onto `state_shardings(module, optimizer, mesh, rules)` and batch rows are
  split over the `batch` axes.
  """
  if mesh is None:
    return state, make_train_step(update_fn)
  shardings = state_shardings(module, optimizer, mesh, rules)
  return place_state(state, shardings), make_train_step(
      update_fn, mesh, shardings, sharding_lib.batch_sharding(mesh, rules), rules=rules)
