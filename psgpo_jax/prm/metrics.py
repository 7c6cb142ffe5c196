"""PRM quality on held-out labeled rows, and its calibration plot.

Metrics (`evaluate_prm`), on lines with a +-1 label:
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

import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psgpo_jax.models import ModelConfig
from psgpo_jax.prm.batches import Row, batches_with_examples
from psgpo_jax.prm.scoring import make_score_fn


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
  for batch, examples in batches_with_examples(rows, tokenizer, max_len, batch_size, pad_id):
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


def within_prompt_pick(rows: Sequence[Row], scores: Sequence[Sequence[float]]
                       ) -> Dict[str, Any]:
  """How often a PRM's pick among one prompt's responses passes, on the prompts whose
  responses both pass and fail (on the others every pick is the same).

  A response scores its weakest line, as in Best-of-K reranking
  (`prm.scoring.response_scores`; no line scores: -1); the prompt's highest-scored
  response is the pick, ties broken uniformly at random (`evaluation.best_of_k`).

  Args:
    rows: labeled rows (`problem_id`, `passed`).
    scores: per row, its line scores.
  Returns:
    `pick_passing` (share of the mixed prompts where the pick passes), `pick_random`
    (the expected share for a random pick), `pick_prompts` (how many mixed prompts).
  """
  from psgpo_jax.evaluation import best_of_k  # pylint: disable=import-outside-toplevel
  groups: Dict[str, List[tuple]] = {}
  for row, s in zip(rows, scores):
    groups.setdefault(str(row["problem_id"]), []).append(
        (bool(row.get("passed")), min(s) if len(s) else -1.0))
  mixed = [g for g in groups.values() if 0 < sum(ok for ok, _ in g) < len(g)]
  if not mixed:
    return {"pick_prompts": 0}
  picked = [best_of_k([np.array([ok for ok, _ in g])], len(g),
                      [np.array([score for _, score in g])])[0] for g in mixed]
  return {"pick_passing": float(np.mean(picked)),
          "pick_random": float(np.mean([np.mean([ok for ok, _ in g]) for g in mixed])),
          "pick_prompts": len(mixed)}


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
