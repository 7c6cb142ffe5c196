"""Output heads: `CausalLM` (token logits) and `ScalarModel` (one scalar per token).

The value model and the process reward model are the same class, `ScalarModel`, so that
`value_params = prm_params` is a valid initialisation. Both heads share the backbone
parameter subtree `params['model']`, so a scalar model starts from a causal LM's backbone
with `scalar_params_from_causal`.

Also the outputs read per token: `token_logprobs`, `token_entropy` (token t read where
it is predicted), and `row_inputs`, the model inputs of a batch in either row layout
(one sequence per row, or rows of prompt groups from `batching.pack_prompt_groups`).
"""
from __future__ import annotations

from typing import Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from psgpo_jax.models.config import ModelConfig
from psgpo_jax.models.transformer import (Dense, KVCache, Transformer, _param,
                                          default_positions, shared_prompt_attention_mask)

Array = jax.Array


def _full_sequence_inputs(tokens: Array, attention_mask: Optional[Array],
                          positions: Optional[Array]) -> Tuple[Array, Array]:
  """Defaults for a full-sequence forward: all-ones mask, positions skipping padding."""
  if attention_mask is None:
    attention_mask = jnp.ones(tokens.shape, jnp.int32)
  if positions is None:
    if attention_mask.ndim == 3:
      raise ValueError("A [B, T, T] attention mask needs explicit positions: its rows hold "
                       "several sequences, so positions cannot be counted from the mask.")
    positions = default_positions(attention_mask)
  return attention_mask, positions


def _longest_sequence(tokens: Array, attention_mask: Optional[Array]) -> int:
  """The length `check_length` bounds: the row length T; 0 for a [B, T, T] mask, whose
  rows hold several sequences, each as long as its positions (bounded where the
  sequences were made: the sampler checks prompt + max_new_tokens)."""
  if attention_mask is not None and attention_mask.ndim == 3:
    return 0
  return tokens.shape[-1]


class CausalLM(nn.Module):
  """Decoder + language-model head: tokens [B,T] -> logits [B,T,V] (float32)."""
  cfg: ModelConfig

  def setup(self):
    self.model = Transformer(self.cfg)
    if not self.cfg.tie_word_embeddings:
      self.lm_head = Dense(self.cfg, self.cfg.vocab_size, ("embed", "vocab"))

  def logits(self, hidden: Array) -> Array:
    """hidden [B,T,D] -> logits [B,T,V] float32."""
    out = self.model.attend(hidden) if self.cfg.tie_word_embeddings else self.lm_head(hidden)
    return out.astype(jnp.float32)

  def __call__(self, tokens: Array, attention_mask: Optional[Array] = None,
               positions: Optional[Array] = None) -> Array:
    """Full-sequence forward.

    Args:
      tokens: [B, T] int.
      attention_mask: [B, T], 1 for real tokens, 0 for padding (left or right); or a
        [B, T, T] bool mask (query t sees slot s) with explicit `positions`, for rows
        that hold several sequences (`transformer.shared_prompt_attention_mask`).
      positions: [B, T]; defaults to `cumsum(mask) - 1`, so padding shifts nothing.
    Returns:
      logits [B, T, V] float32.
    """
    check_length(_longest_sequence(tokens, attention_mask), self.cfg)
    attention_mask, positions = _full_sequence_inputs(tokens, attention_mask, positions)
    hidden, _ = self.model(tokens, attention_mask, positions)
    return self.logits(hidden)

  def decode(self, tokens: Array, positions: Array, kv_mask: Array, cache: KVCache,
             cache_index: Array) -> Tuple[Array, KVCache]:
    """Incremental forward over a KV cache.

    Args:
      tokens: [B, T] new tokens (T = prompt length at prefill, 1 per decode step).
      positions: [B, T] their positions.
      kv_mask: [B, S] 1 for cache slots holding real tokens, new ones included.
      cache: per-layer (keys, values), each [B, KV, S, Dh] (`init_cache`).
      cache_index: scalar slot where the new tokens go.
    Returns:
      (logits [B, T, V] float32, updated cache).
    """
    hidden, cache = self.model(tokens, kv_mask, positions, cache, cache_index)
    return self.logits(hidden), cache


class ScalarModel(nn.Module):
  """Decoder + scalar head: tokens [B,T] -> one float32 per token [B,T].

  The value model and the PRM. Its head `score` matches Hugging Face's
  `*ForTokenClassification` with `num_labels=1`.
  """
  cfg: ModelConfig

  def setup(self):
    self.model = Transformer(self.cfg)
    self.score = ScoreHead(self.cfg)

  def __call__(self, tokens: Array, attention_mask: Optional[Array] = None,
               positions: Optional[Array] = None) -> Array:
    """tokens [B,T], mask [B,T] -> scalars [B,T] float32 (same conventions as CausalLM)."""
    check_length(_longest_sequence(tokens, attention_mask), self.cfg)
    attention_mask, positions = _full_sequence_inputs(tokens, attention_mask, positions)
    hidden, _ = self.model(tokens, attention_mask, positions)
    return self.score(hidden)


def check_length(length: int, cfg: ModelConfig, what: str = "A model input") -> None:
  """Raises ValueError when `length` tokens exceed `cfg.max_position_embeddings`."""
  if length > cfg.max_position_embeddings:
    raise ValueError(
        f"{what} of {length} tokens exceeds model.max_position_embeddings="
        f"{cfg.max_position_embeddings}: shorten it (data.max_prompt_tokens, "
        f"sampling.max_new_tokens) or use a model with longer positions.")


class ScoreHead(nn.Module):
  """hidden [B,T,D] -> [B,T] float32 through a biased linear map to one output."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    cfg = self.cfg
    kernel = _param(self, "kernel", nn.initializers.normal(cfg.initializer_range),
                    (cfg.hidden_size, 1), ("embed", None), cfg.storage_dtype)
    bias = _param(self, "bias", nn.initializers.zeros, (1,), (None,), cfg.storage_dtype)
    out = jnp.dot(hidden.astype(jnp.float32), kernel.astype(jnp.float32)) + bias.astype(jnp.float32)
    return out[..., 0]


def init_params(module: nn.Module, rng: Array, seq_len: int = 8) -> dict:
  """Random parameters of `module` as a plain pytree (logical-axis boxes removed)."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return nn.unbox(module.init(rng, tokens))["params"]


def logical_axes(module: nn.Module, seq_len: int = 8) -> dict:
  """The logical axis names of every parameter: a pytree of `PartitionSpec`s.

  Shapes only are traced (`jax.eval_shape`): nothing is allocated.
  """
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), tokens)
  return nn.get_partition_spec(boxed)["params"]


def scalar_params_from_causal(causal_params: dict, cfg: ModelConfig, rng: Array) -> dict:
  """A ScalarModel's params that reuse a CausalLM's backbone and add a fresh head.

  The backbone subtree is shared (not copied): callers that donate buffers should copy.
  """
  head = init_params(ScalarModel(cfg), rng)["score"]
  return {"model": causal_params["model"], "score": head}


# ----------------------------------------------------------------------------- outputs


def shift_right(x: Array) -> Array:
  """[B, T-1, ...] -> [B, T, ...] with a zero row in front (time index t-1 -> t)."""
  pad = [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2)
  return jnp.pad(x, pad)


def token_logprobs(logits: Array, tokens: Array, temperature: float = 1.0,
                   parents: Optional[Array] = None) -> Array:
  """Log-probabilities of the given tokens, aligned to the token positions.

    out[:, t] = log_softmax(logits[:, t-1] / temperature)[tokens[:, t]]   (t >= 1)
    out[:, 0] = 0

  Args:
    logits: [B, T, V] the model's logits (position t predicts token t+1).
    tokens: [B, T] int.
    temperature: the sampling temperature.
    parents: optional [B, T] int, the slot whose logits predict token t, -1 where none
      does (rows of prompt groups, `batching.pack_prompt_groups`); None means t - 1.
  Returns:
    [B, T] float32.
  """
  if parents is not None:
    scaled = logits.astype(jnp.float32) / temperature
    rows, at = jnp.arange(tokens.shape[0])[:, None], jnp.maximum(parents, 0)
    chosen = scaled[rows, at, tokens.astype(jnp.int32)]
    lse = jnp.take_along_axis(jax.nn.logsumexp(scaled, axis=-1), at, axis=1)
    return jnp.where(parents >= 0, chosen - lse, 0.0)
  scaled = logits[:, :-1].astype(jnp.float32) / temperature
  chosen = jnp.take_along_axis(scaled, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
  return shift_right(chosen - jax.nn.logsumexp(scaled, axis=-1))


def token_entropy(logits: Array, temperature: float = 1.0,
                  parents: Optional[Array] = None) -> Array:
  """Entropy of the policy at each action position: out[:, t] = H(softmax(logits[:, t-1]/T)).

  Args:
    logits: [B, T, V].
    parents: as in `token_logprobs` (None: t - 1).
  Returns:
    [B, T] float32 (position 0 is 0).
  """
  if parents is not None:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    entropy = jnp.take_along_axis(-jnp.sum(jnp.exp(logp) * logp, axis=-1),
                                  jnp.maximum(parents, 0), axis=1)
    return jnp.where(parents >= 0, entropy, 0.0)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32) / temperature, axis=-1)
  return shift_right(-jnp.sum(jnp.exp(logp) * logp, axis=-1))


# Rows of prompt groups carry these [B, T] fields instead of `attention_mask`.
GROUP_ROW_KEYS = ("segment", "branch", "positions", "parents")


def row_inputs(batch: Mapping[str, Array]) -> Tuple[Array, Optional[Array], Optional[Array]]:
  """(attention_mask, positions, parents) of a batch in either row layout.

  Rows `prompt + response` (`attention_mask` [B, T]) give (mask, None, None): positions
  counted from the mask, token t predicted at t - 1. Rows of prompt groups
  (`batching.pack_prompt_groups`: `segment`, `branch`, `positions`, `parents`) give
  the [B, T, T] shared-prompt mask, their positions and their parents.
  """
  if "branch" in batch:
    return (shared_prompt_attention_mask(batch["segment"], batch["branch"]),
            batch["positions"], batch["parents"])
  return batch["attention_mask"], None, None
