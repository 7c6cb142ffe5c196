"""PRM training on binary-search line labels.

The PRM is a `ScalarModel` (one float per token, the same class as the value model)
initialised from the policy's backbone with a fresh head. It is trained only at line-end
tokens: the output at the token that completes line m has seen y<=m and regresses to that
line's label (+1 recoverable prefix, -1 not, 0 for blank/comment-only lines), with MSE
(paper default) or BCE on (label + 1) / 2. Either way `scoring.score` reports values on the
[-1, 1] label scale (raw output for MSE, 2 * sigmoid - 1 for BCE), so thresholds and
calibration do not depend on the loss. Examples and batches are in `batches.py`, the
held-out metrics in `metrics.py`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from psgpo_jax import batching, checkpointing, faults, multihost, sharding, train_step
from psgpo_jax.jsonio import write_json
from psgpo_jax.models import ModelConfig, ScalarModel, scalar_params_from_causal
from psgpo_jax.prm.baselines import position_scores
from psgpo_jax.prm.batches import BATCH_KEYS, Row, make_examples, train_batches
from psgpo_jax.plots import plot_calibration
from psgpo_jax.prm.metrics import (evaluate_prm, line_scores, prm_metrics,
                                    within_prompt_pick)
from psgpo_jax.prm.scoring import make_score_fn

Array = jax.Array
LOSSES = ("mse", "bce")


# ----------------------------------------------------------------------------- loss


def prm_objective(outputs: Array, targets: Array, mask: Array, loss: str = "mse"
                  ) -> Tuple[Array, Dict[str, Array]]:
  """The PRM loss on line-end tokens.

  Args:
    outputs: [B, T] float32 raw scalar-model outputs.
    targets: [B, T] float32 labels in {-1, 0, +1} at line ends.
    mask: [B, T] float, 1 where a line end trains.
    loss: "mse" (regress the output to the label) or "bce" (sigmoid of the output against
      (label + 1) / 2).
  Returns:
    (mean loss over masked positions, metrics: loss, line_accuracy on +-1 labels,
    lines = number of masked positions).
  """
  outputs = outputs.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  count = jnp.maximum(mask.sum(), 1.0)
  if loss == "mse":
    per = jnp.square(outputs - targets)
    scores = outputs
  elif loss == "bce":
    per = optax.sigmoid_binary_cross_entropy(outputs, (targets + 1.0) / 2.0)
    scores = 2.0 * jax.nn.sigmoid(outputs) - 1.0
  else:
    raise ValueError(f"prm.loss={loss!r}; choose one of {LOSSES}.")
  value = (per * mask).sum() / count
  signed = mask * (targets != 0)
  hits = ((scores >= 0) == (targets > 0)) * signed
  accuracy = hits.sum() / jnp.maximum(signed.sum(), 1.0)
  return value, {"loss": value, "line_accuracy": accuracy, "lines": mask.sum()}


def make_prm_loss(model_cfg: ModelConfig, loss: str = "mse") -> Callable:
  """Returns `loss_fn(params, batch, rng) -> (loss, metrics)` for `train_step`."""
  model = ScalarModel(model_cfg)

  def loss_fn(params, batch, rng):
    del rng
    outputs = model.apply({"params": params}, batch["tokens"],
                          attention_mask=batch["attention_mask"])
    return prm_objective(outputs, batch["targets"], batch["loss_mask"], loss)

  return loss_fn


# ----------------------------------------------------------------------------- training


def split_by_prompt(rows: Sequence[Row], eval_fraction: float, seed: int = 0
                    ) -> Tuple[List[Row], List[Row]]:
  """(train, held-out) rows; all responses of a prompt fall on the same side.

  A prompt is held out when a hash of (seed, problem_id) falls below `eval_fraction`,
  so the split of a prompt does not depend on which other prompts are present. At least
  one prompt is held out (and one kept) when there are two or more.
  """
  ids = sorted({str(r["problem_id"]) for r in rows})

  def u(pid):
    digest = hashlib.sha256(f"{seed}/{pid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64

  held = {pid for pid in ids if u(pid) < eval_fraction}
  if eval_fraction > 0 and len(ids) >= 2:
    if not held:
      held = {min(ids, key=u)}
    if len(held) == len(ids):
      held.discard(max(ids, key=u))
  return ([r for r in rows if str(r["problem_id"]) not in held],
          [r for r in rows if str(r["problem_id"]) in held])


@dataclasses.dataclass(frozen=True)
class PRMTrainConfig:
  """PRM training knobs (the `prm` config section, plus lengths).

  Attributes:
    steps: gradient steps.
    batch_size: rows per step (a multiple of the mesh's batch axes).
    learning_rate: peak AdamW learning rate (linear warmup, cosine decay).
    loss: mse | bce.
    eval_fraction: held-out share of prompts.
    threshold: a line is predicted wrong below this score.
    max_len: longest prompt + response, in tokens.
    warmup_steps: learning-rate warmup.
    weight_decay: AdamW decoupled decay.
    grad_clip: global-norm clipping.
    balance: balance positive and negative training lines (`select.balance_lines`).
    log_every: steps between logged training metrics.
    eval_train_rows: training rows scored at the end for train-set metrics (0 = none).
    adam_eps: Adam's epsilon (larger values damp steps on near-zero gradients).
  """
  steps: int = 300
  batch_size: int = 32
  learning_rate: float = 5e-4
  loss: str = "mse"
  eval_fraction: float = 0.15
  threshold: float = 0.0
  max_len: int = 512
  warmup_steps: int = 10
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  balance: bool = False
  log_every: int = 10
  eval_train_rows: int = 256
  adam_eps: float = 1e-8

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f"prm.loss={self.loss!r}; choose one of {LOSSES}.")

  @classmethod
  def from_config(cls, config: Any, max_len: int = 512) -> "PRMTrainConfig":
    """From a pipeline config (`prm` section; `collect.balance`)."""
    p = config.prm
    return cls(steps=int(p.steps), batch_size=int(p.batch_size),
               learning_rate=float(p.learning_rate), loss=str(p.loss),
               eval_fraction=float(p.eval_fraction), threshold=float(p.threshold),
               max_len=max_len, balance=bool(config.collect.balance),
               log_every=int(config.logging.every_steps) if "logging" in config else 10)


def init_prm_params(policy_params: Any, model_cfg: ModelConfig, rng: Array) -> Any:
  """ScalarModel params: a copy of the policy's backbone and a fresh scalar head."""
  params = scalar_params_from_causal(policy_params, model_cfg, rng)
  return jax.tree.map(jnp.array, params)   # own buffers: the train step donates them


def _optimise(params: Any, model_cfg: ModelConfig, optimizer: Any, examples: Sequence[Any],
              config: PRMTrainConfig, pad_id: int, seed: int, step_rng: Array, mesh: Any,
              rules: Optional[Mapping[str, Any]], writer: Any, show_progress: bool,
              checkpoint_dir: Optional[str], checkpoint_every: int
              ) -> Tuple[Any, Dict[str, float]]:
  """`config.steps` training steps on `examples` from `params` (resumed from the latest
  checkpoint in `checkpoint_dir` when there is one, with the batches an uninterrupted run
  sees); returns the trained params and the last logged training metrics."""
  from psgpo_jax.logging import progress  # pylint: disable=import-outside-toplevel
  state = train_step.TrainState.create(params, optimizer)
  update = train_step.gradient_update(make_prm_loss(model_cfg, config.loss), optimizer)
  state, step_fn = train_step.single_model_step(update, state, ScalarModel(model_cfg), optimizer,
                                                mesh, rules)
  checkpointer, state, first = checkpointing.resume_or_start(checkpoint_dir, checkpoint_every,
                                                             state, "prm")
  batches = train_batches(examples, config.batch_size, pad_id,
                          batching.default_buckets(config.max_len), np.random.default_rng(seed))
  for _ in range(first):        # the batch order is the seed's: skip the steps done
    next(batches)
  train_metrics: Dict[str, float] = {}
  bar = progress(range(first, config.steps), desc="prm", enabled=show_progress)
  for step in bar:
    batch = {k: v for k, v in next(batches).items() if k in BATCH_KEYS}
    if mesh is not None:     # the same rows on every process: each places its shards
      batch = sharding.shard_batch(batch, mesh, rules)
    state, metrics = step_fn(state, batch, jax.random.fold_in(step_rng, step))
    checkpointing.save_on_schedule(checkpointer, step + 1, checkpoint_every, config.steps,
                                   state)
    faults.reached(f"prm:{step + 1}", settle=checkpointer and checkpointer.wait)
    if step % max(config.log_every, 1) == 0 or step == config.steps - 1:
      train_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      bar.set_postfix(loss=f"{train_metrics['loss']:.3f}")
      if writer is not None:
        writer.write(step, train_metrics, prefix="prm/train/")
  if checkpointer is not None:
    checkpointer.close()
  return state.params, train_metrics


QUALITY = ("auroc", "line_accuracy", "first_error_accuracy")


def _result(before: Mapping[str, Any], after: Mapping[str, Any], position: Mapping[str, Any],
            train_metrics: Mapping[str, float], train_eval: Mapping[str, Any]
            ) -> Dict[str, Any]:
  """The held-out metrics after training, beside those at init (`init/`), of the
  position-only predictor (`position/`), the last training step (`train/`) and the
  trained PRM on training rows (`train_eval/`)."""
  result: Dict[str, Any] = {k: v for k, v in after.items() if k != "calibration"}
  result.update({f"init/{k}": v for k, v in before.items() if k in QUALITY + ("ece",)})
  result.update({f"position/{k}": v for k, v in position.items() if k in QUALITY})
  result.update({f"train/{k}": v for k, v in train_metrics.items()})
  result.update({f"train_eval/{k}": v for k, v in train_eval.items() if k in QUALITY})
  return result


def train_prm(policy_params: Any, model_cfg: ModelConfig, tokenizer: Any,
              rows: Sequence[Row], config: PRMTrainConfig, out_dir: str, pad_id: int,
              seed: int = 0, mesh: Any = None, writer: Any = None,
              show_progress: bool = True, rules: Optional[Mapping[str, Any]] = None,
              checkpoint_dir: Optional[str] = None, checkpoint_every: int = 0,
              all_rows: Optional[Sequence[Row]] = None) -> Tuple[Any, Dict[str, Any]]:
  """Trains a PRM on labeled rows; writes `metrics.json` and `calibration.png`.

  Args:
    policy_params: CausalLM params whose backbone initialises the PRM.
    model_cfg: the model config (policy and PRM share it).
    tokenizer: encodes prompts and responses (as at collection time).
    rows: selected labeled rows (`shards.load_labels`).
    config: training knobs.
    out_dir: where metrics.json and calibration.png go.
    pad_id: padding token id.
    seed: split, init, shuffling.
    mesh: optional device mesh; the step is then sharded (`train_step.state_shardings`),
      batch rows split over the mesh's `batch` axes (`config.batch_size` must divide
      evenly: checked before anything runs) and activations constrained by the rules.
    writer: optional MetricWriter (metrics under `prm/`).
    rules: logical-axis rules for `mesh` (default `sharding.make_rules()`).
    checkpoint_dir, checkpoint_every: with both, the training state is saved every
      `checkpoint_every` steps and a run started again resumes from the latest complete
      one (`checkpointing.resume_or_start`), with the batches an uninterrupted run sees.
    all_rows: optional labeled rows of every response, selected or not
      (`shards.load_labels(selected_only=False)`): the trained PRM is also measured on
      the held-out prompts' ones (`responses_metrics`).
  Returns:
    (PRM params, metrics): held-out metrics before (`init/...`) and after training,
    those of the position-only predictor on the same rows (`position/...`),
    the last training metrics (`train/...`), with `all_rows` the `responses/...` and
    `responses_position/...` metrics, counts and seconds.
  """
  from psgpo_jax.prm.select import balance_lines  # pylint: disable=import-outside-toplevel
  start = time.time()
  if mesh is not None:
    sharding.check_batch_rows(config.batch_size, mesh, rules, "prm.batch_size")
  os.makedirs(out_dir, exist_ok=True)
  train_rows, eval_rows = split_by_prompt(rows, config.eval_fraction, seed)
  if config.balance:
    train_rows = balance_lines(train_rows, seed)
  examples = make_examples(train_rows, tokenizer, config.max_len)
  optimizer = train_step.make_optimizer(
      config.learning_rate, weight_decay=config.weight_decay, grad_clip=config.grad_clip,
      warmup_steps=min(config.warmup_steps, max(config.steps - 1, 0)),
      total_steps=max(config.steps, config.warmup_steps + 1), schedule="cosine",
      eps=config.adam_eps)
  rng = jax.random.PRNGKey(seed)
  init_rng, step_rng = jax.random.split(rng)
  params = init_prm_params(policy_params, model_cfg, init_rng)
  score_fn = make_score_fn(model_cfg, config.loss)

  def held_out(p):
    if not eval_rows:
      return {}
    return evaluate_prm(p, model_cfg, tokenizer, eval_rows, config.max_len,
                        config.batch_size, pad_id, config.threshold, config.loss, score_fn)

  before = held_out(params)
  params, train_metrics = _optimise(params, model_cfg, optimizer, examples, config, pad_id,
                                    seed, step_rng, mesh, rules, writer, show_progress,
                                    checkpoint_dir, checkpoint_every)
  after = held_out(params)
  train_eval = {}
  if train_rows and config.eval_train_rows:
    train_eval = evaluate_prm(params, model_cfg, tokenizer,
                              train_rows[:config.eval_train_rows], config.max_len,
                              config.batch_size, pad_id, config.threshold, config.loss,
                              score_fn)
  position = (prm_metrics(eval_rows, position_scores(train_rows, eval_rows), threshold=0.0)
              if eval_rows else {})      # the trivial predictor: line position alone
  result = _result(before, after, position, train_metrics, train_eval)
  if all_rows is not None:
    result.update(responses_metrics(params, model_cfg, tokenizer, all_rows, config, pad_id,
                                    seed, score_fn))
  result.update(train_rows=len(train_rows), eval_rows=len(eval_rows),
                train_examples=len(examples), steps=config.steps, loss_type=config.loss,
                seconds=time.time() - start)
  if writer is not None:
    writer.write(config.steps, {k: v for k, v in result.items()
                                if isinstance(v, (int, float))}, prefix="prm/")
  if multihost.is_main_process():       # every process holds the same result
    if after.get("calibration"):
      plot_calibration(after["calibration"], os.path.join(out_dir, "calibration.png"),
                       title=f"PRM held-out calibration (ECE {after['ece']:.3f})")
    _write_json(os.path.join(out_dir, "metrics.json"),
                {**result, "calibration": after.get("calibration", [])})
  return params, result


def responses_metrics(params: Any, model_cfg: ModelConfig, tokenizer: Any,
                      all_rows: Sequence[Row], config: PRMTrainConfig, pad_id: int,
                      seed: int = 0, score_fn: Optional[Callable] = None) -> Dict[str, Any]:
  """The PRM and the position-only predictor on every labeled response of the held-out
  prompts, selected for training or not: the distribution RL's dense rewards score.

  A PRM trained on a narrow selection (`revised`: failed responses only) never sees a
  passing response's last line, and its metrics on that selection's held-out rows do not
  show how it scores the rest. The split is `split_by_prompt`'s (the same prompts are
  held out whatever the selection); the position predictor is fitted on the training
  prompts' responses.

  Returns:
    `responses/{auroc, line_accuracy, first_error_accuracy}` and the pick among each
    prompt's responses (`within_prompt_pick`: `pick_passing`, `pick_random`,
    `pick_prompts`), the same under `responses_position/`, `responses/rows` and
    `responses/passing_share`; {} when no prompt is held out.
  """
  labeled = [r for r in all_rows if r.get("line_labels") is not None]
  train_rows, eval_rows = split_by_prompt(labeled, config.eval_fraction, seed)
  if not eval_rows:
    return {}
  prm_scores = line_scores(params, model_cfg, tokenizer, eval_rows, config.max_len,
                           config.batch_size, pad_id, config.loss, score_fn)
  by_position = position_scores(train_rows, eval_rows)
  out = {}
  for prefix, scores, threshold in (("responses/", prm_scores, config.threshold),
                                    ("responses_position/", by_position, 0.0)):
    quality = prm_metrics(eval_rows, scores, threshold)
    out.update({f"{prefix}{k}": quality[k] for k in QUALITY})
    out.update({f"{prefix}{k}": v for k, v in within_prompt_pick(eval_rows, scores).items()})
  out["responses/rows"] = len(eval_rows)
  out["responses/passing_share"] = float(np.mean([bool(r.get("passed")) for r in eval_rows]))
  return out


def _write_json(path: str, value: Any) -> None:
  write_json(path, value, sort_keys=True)
