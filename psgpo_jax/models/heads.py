"""Output heads: `CausalLM` (token logits) and `ScalarModel` (one scalar per token).

The value model and the process reward model are the same class, `ScalarModel`, so that
`value_params = prm_params` is a valid initialisation. Both heads share the backbone
parameter subtree `params['model']`, so a scalar model starts from a causal LM's backbone
with `scalar_params_from_causal`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from psgpo_jax.models.config import ModelConfig
from psgpo_jax.models.transformer import (Dense, KVCache, Transformer, _param,
                                          default_positions)

Array = jax.Array


def _full_sequence_inputs(tokens: Array, attention_mask: Optional[Array],
                          positions: Optional[Array]) -> Tuple[Array, Array]:
  """Defaults for a full-sequence forward: all-ones mask, positions skipping padding."""
  if attention_mask is None:
    attention_mask = jnp.ones(tokens.shape, jnp.int32)
  if positions is None:
    positions = default_positions(attention_mask)
  return attention_mask, positions


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
      attention_mask: [B, T], 1 for real tokens, 0 for padding (left or right).
      positions: [B, T]; defaults to `cumsum(mask) - 1`, so padding shifts nothing.
    Returns:
      logits [B, T, V] float32.
    """
    check_length(tokens.shape[-1], self.cfg)
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
    check_length(tokens.shape[-1], self.cfg)
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
