"""Model configuration: one frozen dataclass for the Qwen2 and Llama families."""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

from psgpo_jax.fields import checked_fields

ARCHITECTURES = ("qwen2", "llama")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of a decoder-only transformer (names follow Hugging Face).

  `dtype` is the compute dtype, `param_dtype` the storage dtype of the parameters.
  `EXECUTION_FIELDS` change how the model runs, not what it computes (up to float
  rounding), and are not part of a checkpoint's config.json.
  """
  EXECUTION_FIELDS = ("remat", "attention_query_block")

  architecture: str = "qwen2"
  vocab_size: int = 1024
  hidden_size: int = 128
  intermediate_size: int = 352
  num_hidden_layers: int = 2
  num_attention_heads: int = 4
  num_key_value_heads: int = 2
  head_dim: Optional[int] = None          # defaults to hidden_size // num_attention_heads
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = True
  attention_bias: bool = True             # q/k/v projection bias (Qwen2: True, Llama: False)
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False                     # rematerialise each decoder layer in backprop
  attention_query_block: int = 128        # full-sequence causal attention in query blocks of
                                          # this many rows (skips masked-out keys); 0 = one
  initializer_range: float = 0.02
  bos_token_id: Optional[int] = None
  eos_token_id: Optional[int] = None

  def __post_init__(self):
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f"model.architecture={self.architecture!r} is not supported; "
                       f"choose one of {ARCHITECTURES}.")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"model.{name}={getattr(self, name)!r}; choose one of {tuple(DTYPES)}.")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads={self.num_attention_heads} must be a multiple of "
          f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention).")
    if self.head_dim is None and self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                       f"num_attention_heads={self.num_attention_heads}; set head_dim.")

  @property
  def kv_head_dim(self) -> int:
    """Per-head dimension Dh."""
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def storage_dtype(self):
    return DTYPES[self.param_dtype]

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def with_execution_fields(self, values) -> "ModelConfig":
    """This config with the `EXECUTION_FIELDS` that `values` (a config's `model` section,
    or any mapping) sets: how a loaded checkpoint's architecture is to run."""
    return self.replace(**{f: values[f] for f in self.EXECUTION_FIELDS if f in values})

  @classmethod
  def from_dict(cls, values) -> "ModelConfig":
    """Builds a config from a mapping (e.g. a ConfigDict), naming unknown keys."""
    return cls(**checked_fields(cls, values, "model config"))

  def num_params(self, with_head: bool = True) -> int:
    """Parameter count of the causal LM (embeddings counted once when tied)."""
    d, f, v, dh = self.hidden_size, self.intermediate_size, self.vocab_size, self.kv_head_dim
    h, kv = self.num_attention_heads, self.num_key_value_heads
    attn = d * h * dh * 2 + d * kv * dh * 2
    if self.attention_bias:
      attn += (h + 2 * kv) * dh
    layer = attn + 3 * d * f + 2 * d
    head = 0 if (self.tie_word_embeddings or not with_head) else d * v
    return v * d + self.num_hidden_layers * layer + d + head
