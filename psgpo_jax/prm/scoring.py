"""PRM scores at line ends: what RL's dense rewards and the held-out metrics read.

`score` reports the PRM's output on the [-1, 1] label scale whatever the training loss
(raw output for MSE, 2 * sigmoid - 1 for BCE logits), at line-end tokens only;
`response_scores` reduces them to one score per response (its weakest line), which
evaluation uses to pick among K samples.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psgpo_jax.models import ModelConfig, ScalarModel

Array = jax.Array


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


def response_scores(params: Any, model_cfg: ModelConfig, tokenizer: Any,
                    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                    loss: str = "mse", rows_per_call: int = 256) -> np.ndarray:
  """One PRM score per response: the lowest of its line scores (its weakest line).

  How a PRM picks among K samples (Best-of-K by PRM reranking). A response with no line
  scores -1 (nothing to vouch for it).

  Args:
    params: ScalarModel params; model_cfg: their config.
    tokenizer: as at sampling time (line ends are found in its tokens).
    prompts, responses: N token-id lists each.
    loss: the PRM's training loss (`score`).
    rows_per_call: rows per forward pass.
  Returns:
    [N] float32 on the [-1, 1] label scale.
  """
  from psgpo_jax import batching, tokenization  # pylint: disable=import-outside-toplevel
  score_fn = make_score_fn(model_cfg, loss)
  longest = max((len(p) + len(r) for p, r in zip(prompts, responses)), default=1)
  buckets = batching.default_buckets(longest)
  out = np.full(len(prompts), -1.0, np.float32)
  for start in range(0, len(prompts), rows_per_call):
    part_p, part_r = prompts[start:start + rows_per_call], responses[start:start + rows_per_call]
    rows = batching.pack_sequences(part_p, part_r, int(tokenizer.pad_token_id or 0), buckets,
                                   batch_size=rows_per_call)
    spans = [tokenization.line_spans(tokenizer, p, r) for p, r in zip(part_p, part_r)]
    spans += [tokenization.line_spans(tokenizer, [], [])] * (rows_per_call - len(part_p))
    line_end = tokenization.batch_line_arrays(spans, rows["response_mask"])["line_end_mask"]
    batch = {"tokens": rows["tokens"], "attention_mask": rows["attention_mask"],
             "line_end_mask": line_end}
    scores = np.asarray(jax.device_get(score_fn(params, batch)))
    for i in range(len(part_p)):
      at = line_end[i] > 0
      if at.any():
        out[start + i] = float(scores[i, at].min())
  return out
