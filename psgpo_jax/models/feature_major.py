"""Feature-major decoding: the one-token step of `CausalLM.decode` with hidden states
stored [D, B] and every kernel [out, in].

A decode step multiplies a few rows by every weight matrix. XLA's CPU kernels run that
skinny product far below the matmul peak when it is written `[B, in] @ [in, out]`, and
near it when it is written `[out, in] @ [in, B]` (measured on 2 cores for the sampler
benchmark's model, eight layers' projections and the head alone: 29 -> 16 ms per step at
B = 16, 87 -> 50 ms at B = 64; the whole sampler, attention and cache included:
305 -> 407 new tokens/s at B = 16, unchanged at 64, see `AUTO_MAX_ROWS`). So the sampler
transposes the kernels once per call
(`feature_major_params`, a copy of the weights) and runs each step here; the prefill,
training and scoring keep the model's [B, T, D] layout. The attention core is the
model's own (`rotary_embedding`, `dot_product_attention`) on the step's small [B, H, Dh]
queries, reading and writing the same [B, KV, S, Dh] cache. Same math as `CausalLM.decode`
with T = 1, to float rounding (tests/test_feature_major.py compares the logits).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp

from psgpo_jax.models.config import ModelConfig
from psgpo_jax.models.heads import CausalLM
from psgpo_jax.models.transformer import (KVCache, attention_mask, dot_product_attention,
                                          rms_norm, rotary_embedding, write_cache)

Array = jax.Array


def _out_in(kernel: Array, num_in_axes: int) -> Array:
  """A kernel [in..., out...] as a matrix [prod(out), prod(in)]."""
  return kernel.reshape(math.prod(kernel.shape[:num_in_axes]), -1).T


def feature_major_params(params: Dict[str, Any], cfg: ModelConfig) -> Dict[str, Any]:
  """CausalLM params -> the kernels of `decode_step`, each [out, in] in the storage dtype.

  Returns:
    {"embedding": [V, D], "head": [V, D] (the embedding when tied), "norm": [D],
     "layers": [per layer {"q": [H*Dh, D], "k", "v": [KV*Dh, D], "q_bias": [H*Dh, 1],
     "k_bias", "v_bias": [KV*Dh, 1] (zeros without attention bias), "o": [D, H*Dh],
     "gate", "up": [F, D], "down": [D, F], "input_norm", "post_norm": [D, 1]}]}.
  """
  model = params["model"]
  embedding = model["embed_tokens"]["embedding"]
  layers = []
  for i in range(cfg.num_hidden_layers):
    layer = model[f"layers_{i}"]
    attn, mlp = layer["self_attn"], layer["mlp"]
    out = {"o": _out_in(attn["o_proj"]["kernel"], 2),
           "gate": _out_in(mlp["gate_proj"]["kernel"], 1),
           "up": _out_in(mlp["up_proj"]["kernel"], 1),
           "down": _out_in(mlp["down_proj"]["kernel"], 1),
           "input_norm": layer["input_layernorm"]["scale"][:, None],
           "post_norm": layer["post_attention_layernorm"]["scale"][:, None]}
    for name in ("q", "k", "v"):
      proj = attn[f"{name}_proj"]
      out[name] = _out_in(proj["kernel"], 1)
      bias = proj.get("bias")
      out[f"{name}_bias"] = (jnp.zeros((out[name].shape[0], 1), out[name].dtype)
                             if bias is None else bias.reshape(-1, 1))
    layers.append(out)
  head = embedding if cfg.tie_word_embeddings else _out_in(params["lm_head"]["kernel"], 1)
  return {"embedding": embedding, "head": head, "norm": model["norm"]["scale"][:, None],
          "layers": layers}


def _rms_norm(x: Array, scale: Array, cfg: ModelConfig) -> Array:
  """`transformer.rms_norm` over the features of x [D, B] (scale [D, 1])."""
  return rms_norm(x, scale, cfg, axis=0)


def _project(kernel: Array, x: Array, cfg: ModelConfig) -> Array:
  """[out, in] @ [in, B] -> [out, B] in the compute dtype."""
  return kernel.astype(cfg.compute_dtype) @ x


def _heads(x: Array, num_heads: int, positions: Array, cfg: ModelConfig,
           rotate: bool) -> Array:
  """Projected heads [N*Dh, B] -> [B, 1, N, Dh] (rotated at `positions` [B, 1])."""
  b = x.shape[1]
  x = x.reshape(num_heads, cfg.kv_head_dim, b).transpose(2, 0, 1)[:, None]
  return rotary_embedding(x, positions, cfg.rope_theta) if rotate else x


def _attention(layer: Dict[str, Array], h: Array, positions: Array, mask: Array,
               cache: Tuple[Array, Array], cache_index: Array, cfg: ModelConfig
               ) -> Tuple[Array, Tuple[Array, Array]]:
  """`transformer.Attention` for one token per row: h [D, B] -> ([D, B], layer cache)."""
  h_, kv = cfg.num_attention_heads, cfg.num_key_value_heads
  dt = cfg.compute_dtype
  proj = lambda name: (_project(layer[name], h, cfg)
                       + layer[f"{name}_bias"].astype(dt))
  q = _heads(proj("q"), h_, positions, cfg, rotate=True)              # [B, 1, H, Dh]
  k = _heads(proj("k"), kv, positions, cfg, rotate=True).transpose(0, 2, 1, 3)
  v = _heads(proj("v"), kv, positions, cfg, rotate=False).transpose(0, 2, 1, 3)
  keys = write_cache(cache[0], k, cache_index)                        # [B, KV, S, Dh]
  values = write_cache(cache[1], v, cache_index)
  out = dot_product_attention(q, keys, values, mask, dt)              # [B, 1, H, Dh]
  out = out.reshape(out.shape[0], -1).T                               # [H*Dh, B]
  return _project(layer["o"], out, cfg), (keys, values)


def decode_step(fm_params: Dict[str, Any], cfg: ModelConfig, tokens: Array,
                positions: Array, kv_mask: Array, cache: KVCache, cache_index: Array
                ) -> Tuple[Array, KVCache]:
  """`CausalLM.decode` of one new token per row, in the feature-major layout.

  Args:
    fm_params: `feature_major_params` of the CausalLM params.
    cfg: the model config.
    tokens: [B] the new tokens; positions: [B] their positions.
    kv_mask: [B, S] 1 for cache slots holding real tokens, the new one included.
    cache: per layer (keys, values), each [B, KV, S, Dh].
    cache_index: scalar slot where the new token goes.
  Returns:
    (logits [B, V] float32, the updated cache).
  """
  dt = cfg.compute_dtype
  x = jnp.take(fm_params["embedding"], tokens, axis=0).astype(dt).T   # [D, B]
  mask = attention_mask(kv_mask, cache_index, 1)                      # [B, 1, S]
  positions = positions[:, None]
  new_cache = []
  for layer, layer_cache in zip(fm_params["layers"], cache):
    attn_out, layer_cache = _attention(layer, _rms_norm(x, layer["input_norm"], cfg),
                                       positions, mask, layer_cache, cache_index, cfg)
    x = x + attn_out
    h = _rms_norm(x, layer["post_norm"], cfg)
    h = jax.nn.silu(_project(layer["gate"], h, cfg)) * _project(layer["up"], h, cfg)
    x = x + _project(layer["down"], h, cfg)
    new_cache.append(layer_cache)
  x = _rms_norm(x, fm_params["norm"], cfg)
  logits = _project(fm_params["head"], x, cfg).astype(jnp.float32).T  # [B, V]
  return logits, tuple(new_cache)


# "auto" decodes feature-major up to this many rows: on 2 CPU cores a whole decode step
# (projections, attention over a 192-slot cache, head) of the sampler benchmark's model
# took 0.92x / 0.77x / 0.96x / 1.0x the batch-major time at 8 / 16 / 32 / 64 rows and
# 1.06x at 256, where attention and the cache dominate and the products are no longer
# skinny. That was an AVX2 machine. On 2 AVX-512 cores the whole sampler ran 653 new
# tokens/s feature-major against 793 batch-major at 16 rows, the same at 64: there set
# `sampling.decode_layout=batch_major`.
AUTO_MAX_ROWS = 64


def feature_major_decoding(decode_layout: str, on_mesh: bool, rows: int) -> bool:
  """Whether a decode loop over `rows` rows runs feature-major
  (`SamplingConfig.decode_layout`): "auto" chooses it on a CPU backend without a mesh
  for at most AUTO_MAX_ROWS rows, where it was measured to help."""
  if decode_layout == "auto":
    return not on_mesh and jax.default_backend() == "cpu" and rows <= AUTO_MAX_ROWS
  return decode_layout == "feature_major"


def decode_function(params: Dict[str, Any], cfg: ModelConfig, feature_major: bool
                    ) -> Callable[..., Tuple[Array, KVCache]]:
  """(tokens [B], positions [B], kv_mask [B, S], cache, cache_index) -> (logits [B, V]
  float32, cache): one decode step of the CausalLM `params`, feature-major (the kernels
  transposed here, once per traced call) or through `CausalLM.decode`."""
  if feature_major:
    fm_params = feature_major_params(params, cfg)
    return lambda *args: decode_step(fm_params, cfg, *args)
  model = CausalLM(cfg)

  def batch_major(tokens, positions, kv_mask, cache, cache_index):
    logits, cache = model.apply({"params": params}, tokens[:, None], positions[:, None],
                                kv_mask, cache, cache_index, method="decode")
    return logits[:, 0], cache
  return batch_major
