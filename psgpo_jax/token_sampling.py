"""Drawing one token per row from logits: temperature, top-k and top-p (nucleus)
filtering by inverse-CDF sampling from given uniforms, and the policy's own log-prob of
the drawn token (before the filtering's renormalisation)."""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

Array = jax.Array


def _inverse_cdf(weights: Array, u: Array) -> Array:
  """Index drawn with probability proportional to `weights` by inverting the CDF.

  Args:
    weights: [B, K] non-negative, unnormalised, at least one positive per row.
    u: [B] uniform in [0, 1).
  Returns:
    [B] int32 indices; never one of zero weight.
  """
  cdf = jnp.cumsum(weights, axis=-1)
  threshold = u * cdf[:, -1]
  index = jnp.sum(cdf <= threshold[:, None], axis=-1).astype(jnp.int32)
  index = jnp.minimum(index, weights.shape[-1] - 1)
  # Rounding in the cumulative sum can only land on a zero weight in measure-zero cases;
  # fall back to the most likely entry then rather than emit an impossible token.
  picked = jnp.take_along_axis(weights, index[:, None], axis=-1)[:, 0]
  return jnp.where(picked > 0, index, jnp.argmax(weights, axis=-1).astype(jnp.int32))


def _nucleus_threshold(probs: Array, top_p: float) -> Array:
  """Smallest kept probability of the top-p nucleus, found by bisection, no sort.

  The nucleus is {i: probs_i >= tau} with tau the largest value such that the tokens at
  or above it hold at least `top_p` of the mass. Bisection runs over the int32 bit
  patterns of non-negative float32 (ordered like the floats), so 32 steps are exact.

  Args:
    probs: [B, V] normalised probabilities.
    top_p: in (0, 1).
  Returns:
    [B] float32 thresholds.
  """
  bits = jax.lax.bitcast_convert_type(probs, jnp.int32)
  lo = jnp.zeros(probs.shape[:1], jnp.int32)               # mass(>= 0) = 1 >= top_p
  hi = jnp.max(bits, axis=-1) + 1                          # mass(> max) = 0 < top_p

  def step(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    mass = jnp.sum(jnp.where(bits >= mid[:, None], probs, 0.0), axis=-1)
    ok = mass >= top_p
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = jax.lax.fori_loop(0, 32, step, (lo, hi))
  return jax.lax.bitcast_convert_type(lo, jnp.float32)


def sample_tokens(logits: Array, u: Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, greedy: bool = False) -> Tuple[Array, Array]:
  """Draws one token per row and returns its log-prob under the unfiltered policy.

  Args:
    logits: [B, V] float32.
    u: [B] uniform in [0, 1), the only randomness (inverse-CDF sampling).
    temperature, top_k, top_p, greedy: as in `SamplingConfig` (static).
  Returns:
    tokens [B] int32 and logprobs [B] float32 = log_softmax(logits / temperature)[token]
    (temperature 1 when greedy), without top-k/top-p renormalisation.
  """
  logits = logits.astype(jnp.float32)
  if greedy:
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits
  else:
    scaled = logits / temperature
  peak = jnp.max(scaled, axis=-1, keepdims=True)
  shifted = scaled - peak
  weights = jnp.exp(shifted)                               # unnormalised probabilities
  log_total = jnp.log(jnp.sum(weights, axis=-1))           # [B]
  if not greedy:
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
      top_vals, top_idx = jax.lax.top_k(shifted, top_k)    # sorted, descending
      top_w = jnp.exp(top_vals)
      if top_p < 1.0:
        probs = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        top_w = jnp.where(mass_before < top_p, top_w, 0.0)
      tokens = jnp.take_along_axis(top_idx, _inverse_cdf(top_w, u)[:, None], axis=-1)[:, 0]
    else:
      if top_p < 1.0:
        probs = weights / jnp.exp(log_total)[:, None]
        tau = _nucleus_threshold(probs, top_p)
        weights = jnp.where(probs >= tau[:, None], weights, 0.0)
      tokens = _inverse_cdf(weights, u)
  token_shift = jnp.take_along_axis(shifted, tokens[:, None], axis=-1)[:, 0]
  return tokens.astype(jnp.int32), token_shift - log_total
