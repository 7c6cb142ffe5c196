"""PRM scores at line ends: what RL's dense rewards and the held-out metrics read.

`score` reports the PRM's output on the [-1, 1] label scale whatever the training loss
(raw output for MSE, 2 * sigmoid - 1 for BCE logits), at line-end tokens only.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

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
