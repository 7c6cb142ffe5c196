"""PRM training on binary-search line labels, its metrics, and line scoring for RL.

The PRM is a `ScalarModel` (one float per token, the same class as the value model)
initialised from the policy's backbone with a fresh head. It is trained only at line-end
tokens: the output at the token that completes line m has seen y<=m and regresses to that
line's label (+1 recoverable prefix, -1 not, 0 for blank/comment-only lines), with MSE
(paper default) or BCE on (label + 1) / 2. Either way `score` reports values on the
[-1, 1] label scale (raw output for MSE, 2 * sigmoid - 1 for BCE), so thresholds and
calibration do not depend on the loss.

Held-out metrics (`evaluate_prm`), on lines with a +-1 label:
  * line accuracy: sign(score - threshold) against the label;
  * AUROC of the score for "label = +1" (rank statistic, ties counted half);
  * first-error localisation: the first step line scored below the threshold (None if
    none) equals the first -1 line of the labels (None if none);
  * calibration: p = clip((score + 1) / 2, 0, 1) in equal-width bins against the share of
    +1 labels, with the expected calibration error (ECE);
  * on the synthetic suite, the same first-error and line accuracy against the oracle's
    first wrong line (`oracle_first_bad` of the rows).
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

from psgpo_jax import batching, train_step
from psgpo_jax.jsonio import write_json
from psgpo_jax.models import ModelConfig, ScalarModel, scalar_params_from_causal
from psgpo_jax.prm.baselines import position_scores
from psgpo_jax.rollout import encode

Array = jax.Array
Row = Dict[str, Any]
LOSSES = ("mse", "bce")
BATCH_KEYS = ("tokens", "attention_mask", "line_end_mask", "targets", "loss_mask")


# ----------------------------------------------------------------------------- batches


def line_end_indices(tokenizer: Any, prompt_ids: Sequence[int], response_ids: Sequence[int]
                     ) -> List[int]:
  """Per response line, the index (within `response_ids`) of its end token."""
  from psgpo_jax.tokenization import line_spans  # pylint: disable=import-outside-toplevel
  return [int(e) for e in line_spans(tokenizer, prompt_ids, response_ids).end_token]


@dataclasses.dataclass(frozen=True)
class PRMExample:
  """One labeled response in token space.

  Attributes:
    prompt_ids, response_ids: token ids.
    line_ends: per kept line, the index of its line-end token within `response_ids`.
    labels: per kept line, its label (+1 / -1 / 0).
    used: per kept line, 1 if it trains the PRM (0 = switched off by balancing).
    row: index of the source row.
  """
  prompt_ids: Tuple[int, ...]
  response_ids: Tuple[int, ...]
  line_ends: Tuple[int, ...]
  labels: Tuple[int, ...]
  used: Tuple[int, ...]
  row: int


def make_examples(rows: Sequence[Row], tokenizer: Any, max_len: int) -> List[PRMExample]:
  """Tokenises labeled rows; truncates responses to `max_len` tokens in all.

  Rows need `prompt`, `response`, `line_labels` and optionally `line_end_token_indices`
  (indices into the response's own token ids, one per line; computed with
  `tokenization.line_spans` when absent). Lines whose end token falls past
  `max_len` are dropped; rows whose prompt alone does not fit are dropped.
  """
  out = []
  for r, row in enumerate(rows):
    labels = row.get("line_labels")
    if labels is None:
      continue
    prompt_ids = encode(tokenizer, row["prompt"])
    response_ids = encode(tokenizer, row["response"])
    ends = row.get("line_end_token_indices")
    if ends is None:
      ends = line_end_indices(tokenizer, prompt_ids, response_ids)
    if len(labels) != len(ends):
      raise ValueError(f"Row {r}: {len(labels)} line labels but {len(ends)} line ends.")
    room = max_len - len(prompt_ids)
    if room <= 0:
      continue
    response_ids = response_ids[:room]
    used = row.get("line_used") or [1] * len(labels)
    keep = [i for i, e in enumerate(ends) if e < len(response_ids)]
    if not keep:
      continue
    out.append(PRMExample(tuple(prompt_ids), tuple(response_ids),
                          tuple(int(ends[i]) for i in keep), tuple(int(labels[i]) for i in keep),
                          tuple(int(used[i]) for i in keep), r))
  return out


def pack_examples(examples: Sequence[PRMExample], pad_id: int, buckets: Sequence[int],
                  batch_size: Optional[int] = None) -> Dict[str, np.ndarray]:
  """One fixed-shape batch of examples.

  Lines that share an end token (a blank line inside a multi-newline token) share one
  position: its target is the label of the last line with a +-1 label there (the
  longest prefix the token completes), else 0.

  Args:
    examples: up to `batch_size` examples.
    pad_id: padding token id.
    buckets: allowed sequence lengths T.
    batch_size: rows B (extra rows are padding with all masks 0).
  Returns:
    tokens [B,T] int32, attention_mask [B,T] int32, line_end_mask [B,T] int32 (1 at every
    kept line end), targets [B,T] float32 (the label at line ends, else 0), loss_mask
    [B,T] float32 (line ends that train), row_index [B] int32 (source row, -1 = padding).
  """
  packed = batching.pack_sequences([e.prompt_ids for e in examples],
                                   [e.response_ids for e in examples], pad_id, buckets,
                                   batch_size)
  b, t = packed["tokens"].shape
  line_end = np.zeros((b, t), np.int32)
  targets = np.zeros((b, t), np.float32)
  loss_mask = np.zeros((b, t), np.float32)
  row_index = np.full((b,), -1, np.int32)
  for i, e in enumerate(examples):
    signed = set()
    for end, label, used in zip(e.line_ends, e.labels, e.used):
      pos = len(e.prompt_ids) + end
      line_end[i, pos] = 1
      if label != 0 or pos not in signed:
        targets[i, pos], loss_mask[i, pos] = label, used
      if label != 0:
        signed.add(pos)
    row_index[i] = e.row
  return {"tokens": packed["tokens"], "attention_mask": packed["attention_mask"],
          "line_end_mask": line_end, "targets": targets, "loss_mask": loss_mask,
          "row_index": row_index}


def _grouped(rows: Sequence[Row], tokenizer: Any, max_len: int, batch_size: int, pad_id: int,
             buckets: Optional[Sequence[int]] = None
             ) -> List[Tuple[Dict[str, np.ndarray], List[PRMExample]]]:
  """(batch, its examples) pairs over all rows, examples sorted by length."""
  buckets = buckets or batching.default_buckets(max_len)
  examples = make_examples(rows, tokenizer, max_len)
  examples.sort(key=lambda e: len(e.prompt_ids) + len(e.response_ids))
  out = []
  for s in range(0, len(examples), batch_size):
    chunk = examples[s:s + batch_size]
    out.append((pack_examples(chunk, pad_id, buckets, batch_size), chunk))
  return out


def make_prm_batches(rows: Sequence[Row], tokenizer: Any, max_len: int, batch_size: int,
                     pad_id: int, buckets: Optional[Sequence[int]] = None
                     ) -> List[Dict[str, np.ndarray]]:
  """All rows as fixed-shape batches, grouped by length (few distinct T).

  Examples are sorted by length so each batch pads to the smallest bucket that fits
  (`buckets`, default powers of two up to `max_len`); the last batch is padded to
  `batch_size` rows. See `pack_examples` for the arrays.
  """
  return [batch for batch, _ in _grouped(rows, tokenizer, max_len, batch_size, pad_id,
                                         buckets)]


def train_batches(examples: Sequence[PRMExample], batch_size: int, pad_id: int,
                  buckets: Sequence[int], rng: np.random.Generator):
  """Endless shuffled batches, epoch after epoch.

  Each epoch yields only full batches (the remainder waits for a later epoch's shuffle),
  so no step averages over a handful of lines; with fewer examples than `batch_size`,
  every batch holds all of them, padded to `batch_size` rows.
  """
  if not examples:
    raise ValueError("No PRM training examples (no labeled line fits max_len?).")
  while True:
    order = rng.permutation(len(examples))
    for s in range(0, max(len(order) - batch_size + 1, 1), batch_size):
      chosen = [examples[i] for i in order[s:s + batch_size]]
      yield pack_examples(chosen, pad_id, buckets, batch_size)


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


def score(params: Any, model_cfg: ModelConfig, batch: Mapping[str, Array],
          loss: str = "mse") -> Array:
  """PRM scores at line ends, for the RL rewards.

  Args:
    params: ScalarModel params.
    model_cfg: its config (static under jit: `jax.jit(score, static_argnums=(1, 3))`).
    batch: tokens [B,T], attention_mask [B,T], line_end_mask [B,T].
    loss: the loss the PRM was trained with (BCE outputs are mapped to 2*sigmoid - 1).
  Returns:
    [B, T] float32: at a line-end token t, the PRM's output at t (it has seen the prefix
    up to and including that line), on the [-1, 1] label scale; 0 elsewhere.
  """
  outputs = ScalarModel(model_cfg).apply({"params": params}, batch["tokens"],
                                         attention_mask=batch["attention_mask"])
  return line_end_scores(outputs, batch["line_end_mask"], loss)


def line_end_scores(outputs: Array, line_end_mask: Array, loss: str = "mse") -> Array:
  """The PRM's raw outputs [B, T] -> `score`'s [B, T]: the [-1, 1] label scale (BCE logits
  through 2 * sigmoid - 1) at line-end tokens, 0 elsewhere."""
  if loss == "bce":
    outputs = 2.0 * jax.nn.sigmoid(outputs) - 1.0
  return jnp.where(line_end_mask > 0, outputs, 0.0).astype(jnp.float32)


def make_score_fn(model_cfg: ModelConfig, loss: str = "mse") -> Callable:
  """A jitted `score_fn(params, batch) -> [B, T]` (see `score`)."""
  return jax.jit(lambda params, batch: score(params, model_cfg, batch, loss))


# ----------------------------------------------------------------------------- metrics


def auroc(positive: Sequence[bool], scores: Sequence[float]) -> float:
  """Area under the ROC curve: P(score of a positive > score of a negative), ties 1/2.

  Mann-Whitney U from average ranks, O(n log n). NaN when a class is empty.
  """
  positive = np.asarray(positive, bool)
  scores = np.asarray(scores, np.float64)
  n_pos, n_neg = int(positive.sum()), int((~positive).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  sorted_scores = scores[order]
  ranks = np.empty(len(scores), np.float64)
  # Average 1-based rank over each run of equal scores.
  starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
  ends = np.r_[starts[1:], len(scores)]
  for s, e in zip(starts, ends):
    ranks[order[s:e]] = (s + 1 + e) / 2.0
  u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def first_below(scores: Sequence[float], labels: Sequence[int], threshold: float
                ) -> Optional[int]:
  """Index of the first step line (label != 0) scored below `threshold`, or None."""
  for i, (s, y) in enumerate(zip(scores, labels)):
    if y != 0 and s < threshold:
      return i
  return None


def first_negative(labels: Sequence[int]) -> Optional[int]:
  """Index of the first -1 label, or None."""
  return next((i for i, y in enumerate(labels) if y < 0), None)


def calibration(probs: Sequence[float], outcomes: Sequence[bool], num_bins: int = 10
                ) -> Dict[str, Any]:
  """Reliability of probabilities `probs` for binary `outcomes` in equal-width bins.

  Returns:
    {"bins": [{"lo", "hi", "count", "mean_prob", "positive_rate"}...], "ece"}: ECE =
    sum over bins of count/N * |mean_prob - positive_rate|.
  """
  probs = np.clip(np.asarray(probs, np.float64), 0.0, 1.0)
  outcomes = np.asarray(outcomes, np.float64)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  which = np.clip(np.searchsorted(edges, probs, side="right") - 1, 0, num_bins - 1)
  bins, ece = [], 0.0
  for b in range(num_bins):
    sel = which == b
    count = int(sel.sum())
    mean_prob = float(probs[sel].mean()) if count else float("nan")
    rate = float(outcomes[sel].mean()) if count else float("nan")
    if count:
      ece += count / len(probs) * abs(mean_prob - rate)
    bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count,
                 "mean_prob": mean_prob, "positive_rate": rate})
  return {"bins": bins, "ece": float(ece)}


def line_scores(params: Any, model_cfg: ModelConfig, tokenizer: Any, rows: Sequence[Row],
                max_len: int, batch_size: int, pad_id: int, loss: str = "mse",
                score_fn: Optional[Callable] = None) -> List[List[float]]:
  """Per row, the PRM score at the end token of each of its lines that fit `max_len`.

  Rows without labels or lines get []; a truncated row scores its first lines only.
  """
  score_fn = score_fn or make_score_fn(model_cfg, loss)
  out: List[List[float]] = [[] for _ in rows]
  for batch, examples in _grouped(rows, tokenizer, max_len, batch_size, pad_id):
    inputs = {k: jnp.asarray(batch[k]) for k in ("tokens", "attention_mask", "line_end_mask")}
    scores = np.asarray(jax.device_get(score_fn(params, inputs)))
    for i, e in enumerate(examples):
      out[e.row] = scores[i, len(e.prompt_ids) + np.asarray(e.line_ends, np.int64)].tolist()
  return out


def prm_metrics(rows: Sequence[Row], scores: Sequence[Sequence[float]],
                threshold: float = 0.0, num_bins: int = 10) -> Dict[str, Any]:
  """Held-out metrics from per-row line scores (see the module docstring).

  Args:
    rows: labeled rows (`line_labels`; optional `trivial`, `oracle_first_bad`).
    scores: per row, the scores of its first len(scores[r]) lines (truncated rows score
      fewer lines than they have).
    threshold: a line is predicted wrong below it.
  """
  labels, flat = [], []
  first_hits, first_total = 0, 0
  oracle_first_hits, oracle_total, oracle_line_hits, oracle_lines = 0, 0, 0, 0
  for row, s in zip(rows, scores):
    y = list(row["line_labels"] or [])[:len(s)]
    if not y:
      continue
    for yi, si in zip(y, s):
      if yi != 0:
        labels.append(yi > 0)
        flat.append(si)
    predicted = first_below(s, y, threshold)
    first_hits += int(predicted == first_negative(y))
    first_total += 1
    if "oracle_first_bad" in row:
      oracle = row["oracle_first_bad"]
      oracle = None if oracle is None or oracle >= len(s) else oracle
      oracle_first_hits += int(predicted == oracle)
      oracle_total += 1
      for i, (yi, si) in enumerate(zip(y, s)):
        if yi != 0:
          oracle_lines += 1
          oracle_line_hits += int((si >= threshold) == (oracle is None or i < oracle))
  flat_arr, pos = np.asarray(flat, np.float64), np.asarray(labels, bool)
  out: Dict[str, Any] = {
      "lines": int(len(flat)), "responses": first_total,
      "positive_share": float(pos.mean()) if len(pos) else float("nan"),
      "line_accuracy": float(((flat_arr >= threshold) == pos).mean()) if len(pos)
                       else float("nan"),
      "auroc": auroc(pos, flat_arr),
      "first_error_accuracy": first_hits / max(first_total, 1),
  }
  cal = calibration(np.clip((flat_arr + 1.0) / 2.0, 0.0, 1.0), pos, num_bins)
  out["ece"] = cal["ece"]
  out["calibration"] = cal["bins"]
  if oracle_total:
    out["oracle_first_error_accuracy"] = oracle_first_hits / oracle_total
    out["oracle_line_accuracy"] = oracle_line_hits / max(oracle_lines, 1)
  return out


def plot_calibration(bins: Sequence[Mapping[str, Any]], path: str, title: str = "PRM") -> str:
  """Writes a reliability diagram (mean predicted probability vs share of +1 lines)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  used = [b for b in bins if b["count"]]
  fig, ax = plt.subplots(figsize=(4, 4))
  ax.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="ideal")
  ax.plot([b["mean_prob"] for b in used], [b["positive_rate"] for b in used], "o-",
          label="PRM")
  for b in used:
    ax.annotate(str(b["count"]), (b["mean_prob"], b["positive_rate"]), fontsize=6,
                textcoords="offset points", xytext=(3, -8))
  ax.set_xlabel("predicted P(line recoverable) = (score + 1) / 2")
  ax.set_ylabel("share of +1 labels")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_title(title)
  ax.legend(loc="upper left", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def evaluate_prm(params: Any, model_cfg: ModelConfig, tokenizer: Any, rows: Sequence[Row],
                 max_len: int, batch_size: int, pad_id: int, threshold: float = 0.0,
                 loss: str = "mse", score_fn: Optional[Callable] = None) -> Dict[str, Any]:
  """Scores held-out rows and returns `prm_metrics` (plus `seconds`)."""
  start = time.time()
  scores = line_scores(params, model_cfg, tokenizer, rows, max_len, batch_size, pad_id, loss,
                       score_fn)
  out = prm_metrics(rows, scores, threshold)
  out["seconds"] = time.time() - start
  return out


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
    balance: balance positive and negative training lines (`labeling.balance_lines`).
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


def train_prm(policy_params: Any, model_cfg: ModelConfig, tokenizer: Any,
              rows: Sequence[Row], config: PRMTrainConfig, out_dir: str, pad_id: int,
              seed: int = 0, mesh: Any = None, writer: Any = None,
              show_progress: bool = True, rules: Optional[Mapping[str, Any]] = None
              ) -> Tuple[Any, Dict[str, Any]]:
  """Trains a PRM on labeled rows; writes `metrics.json` and `calibration.png`.

  Args:
    policy_params: CausalLM params whose backbone initialises the PRM.
    model_cfg: the model config (policy and PRM share it).
    tokenizer: encodes prompts and responses (as at collection time).
    rows: selected labeled rows (`labeling.load_labels`).
    config: training knobs.
    out_dir: where metrics.json and calibration.png go.
    pad_id: padding token id.
    seed: split, init, shuffling.
    mesh: optional device mesh; the step is then sharded (`train_step.state_shardings`),
      batch rows split over the mesh's `batch` axes (`config.batch_size` must divide
      evenly: checked before anything runs) and activations constrained by the rules.
    writer: optional MetricWriter (metrics under `prm/`).
    rules: logical-axis rules for `mesh` (default `sharding.make_rules()`).
  Returns:
    (PRM params, metrics): held-out metrics before (`init/...`) and after training,
    those of the position-only predictor on the same rows (`position/...`),
    the last training metrics (`train/...`), counts and seconds.
  """
  from psgpo_jax.logging import progress  # pylint: disable=import-outside-toplevel
  from psgpo_jax.prm.labeling import balance_lines  # pylint: disable=import-outside-toplevel
  start = time.time()
  if mesh is not None:
    from psgpo_jax import sharding  # pylint: disable=import-outside-toplevel
    sharding.check_batch_rows(config.batch_size, mesh, rules, "prm.batch_size")
  os.makedirs(out_dir, exist_ok=True)
  train_rows, eval_rows = split_by_prompt(rows, config.eval_fraction, seed)
  if config.balance:
    train_rows = balance_lines(train_rows, seed)
  buckets = batching.default_buckets(config.max_len)
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
  state = train_step.TrainState.create(params, optimizer)
  update = train_step.gradient_update(make_prm_loss(model_cfg, config.loss), optimizer)
  state, step_fn = train_step.single_model_step(update, state, ScalarModel(model_cfg), optimizer,
                                                mesh, rules)
  batches = train_batches(examples, config.batch_size, pad_id, buckets,
                          np.random.default_rng(seed))
  train_metrics: Dict[str, float] = {}
  bar = progress(range(config.steps), desc="prm", enabled=show_progress)
  for step in bar:
    batch = {k: v for k, v in next(batches).items() if k in BATCH_KEYS}
    state, metrics = step_fn(state, batch, jax.random.fold_in(step_rng, step))
    if step % max(config.log_every, 1) == 0 or step == config.steps - 1:
      train_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      bar.set_postfix(loss=f"{train_metrics['loss']:.3f}")
      if writer is not None:
        writer.write(step, train_metrics, prefix="prm/train/")
  params = state.params
  after = held_out(params)
  train_eval = {}
  if train_rows and config.eval_train_rows:
    train_eval = evaluate_prm(params, model_cfg, tokenizer,
                              train_rows[:config.eval_train_rows], config.max_len,
                              config.batch_size, pad_id, config.threshold, config.loss,
                              score_fn)
  result: Dict[str, Any] = {k: v for k, v in after.items() if k != "calibration"}
  result.update({f"init/{k}": v for k, v in before.items()
                 if k in ("auroc", "line_accuracy", "first_error_accuracy", "ece")})
  if eval_rows:        # the trivial predictor: line position alone (prm/baselines.py)
    position = prm_metrics(eval_rows, position_scores(train_rows, eval_rows), threshold=0.0)
    result.update({f"position/{k}": v for k, v in position.items()
                   if k in ("auroc", "line_accuracy", "first_error_accuracy")})
  result.update({f"train/{k}": v for k, v in train_metrics.items()})
  result.update({f"train_eval/{k}": v for k, v in train_eval.items()
                 if k in ("auroc", "line_accuracy", "first_error_accuracy")})
  result.update(train_rows=len(train_rows), eval_rows=len(eval_rows),
                train_examples=len(examples), steps=config.steps, loss_type=config.loss,
                seconds=time.time() - start)
  if writer is not None:
    writer.write(config.steps, {k: v for k, v in result.items()
                                if isinstance(v, (int, float))}, prefix="prm/")
  if after.get("calibration"):
    plot_calibration(after["calibration"], os.path.join(out_dir, "calibration.png"),
                     title=f"PRM held-out calibration (ECE {after['ece']:.3f})")
  _write_json(os.path.join(out_dir, "metrics.json"),
              {**result, "calibration": after.get("calibration", [])})
  return params, result


def _write_json(path: str, value: Any) -> None:
  write_json(path, value, sort_keys=True)
