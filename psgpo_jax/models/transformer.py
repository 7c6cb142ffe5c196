"""Decoder-only transformer of the Qwen2 / Llama family, in flax.linen.

RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU MLP. Every
parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`,
`mlp`, `norm`) that `psgpo_jax.sharding` maps onto a device mesh.

One code path serves the full-sequence forward and incremental decoding: attention reads
keys/values from a cache of `S` slots (`S = T` without a cache). Which slots a query may
see is given by `kv_mask` [B, S] (slots that hold real tokens) and causality in slot
order; positions are explicit, so left padding gives the same logits as no padding.
"""
from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from psgpo_jax.models.config import ModelConfig

Array = jax.Array
LayerCache = Tuple[Array, Array]           # keys, values: [B, KV, S, Dh] each
KVCache = Tuple[LayerCache, ...]           # one per layer

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Logical axes of the hidden states between layers: rows split as the `batch` rule says,
# features whole (each layer's matmuls gather their FSDP-sharded kernels instead).
HIDDEN_AXES = ("batch", "length", None)


def _param(module: nn.Module, name: str, init, shape, axes, dtype) -> Array:
  """Creates a parameter annotated with logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _normal(cfg: ModelConfig):
  return nn.initializers.normal(stddev=cfg.initializer_range)


class RMSNorm(nn.Module):
  """Root-mean-square layer norm, statistics in float32 (as Hugging Face)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [..., D] -> [..., D] in the compute dtype."""
    scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",),
                   self.cfg.storage_dtype)
    return rms_norm(x, scale, self.cfg)


def rms_norm(x: Array, scale: Array, cfg: ModelConfig, axis: int = -1) -> Array:
  """x / rms(x) * scale over the features `axis` of x (statistics in float32), in the
  compute dtype; `scale` broadcasts against x."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + cfg.rms_norm_eps)
  return scale.astype(cfg.compute_dtype) * x32.astype(cfg.compute_dtype)


def write_cache(cache: Array, new: Array, cache_index: Array) -> Array:
  """Writes new keys or values [B, KV, T, Dh] into a cache [B, KV, S, Dh] at slot
  `cache_index`."""
  return jax.lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype), cache_index, 2)


def rotary_embedding(x: Array, positions: Array, theta: float) -> Array:
  """Applies rotary position embeddings (Hugging Face's rotate-half layout).

  Args:
    x: [B, T, N, Dh] queries or keys.
    positions: [B, T] integer positions.
    theta: the RoPE base (`rope_theta`).
  Returns:
    [B, T, N, Dh], same dtype as `x`.
  """
  dh = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]   # [B,T,Dh/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]             # [B,T,1,Dh]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def attention_mask(kv_mask: Array, cache_index: Array, num_queries: int) -> Array:
  """Which cache slots each query may attend to.

  Args:
    kv_mask: [B, S] 1 where the slot holds a real token (including the new ones).
    cache_index: scalar, the slot of the first query.
    num_queries: T.
  Returns:
    [B, T, S] bool: slot s is visible from query t iff s <= cache_index + t and
    kv_mask[b, s].
  """
  query_slot = cache_index + jnp.arange(num_queries)[:, None]
  key_slot = jnp.arange(kv_mask.shape[1])[None, :]
  causal = key_slot <= query_slot                                      # [T, S]
  return causal[None] & kv_mask[:, None, :].astype(bool)


def shared_prompt_attention_mask(segment: Array, branch: Array) -> Array:
  """Causal attention for rows of prompt groups `prompt, response_1, ..., response_k`.

  Args:
    segment: [B, T] int: the group a slot belongs to, -1 on padding.
    branch: [B, T] int: 0 on a prompt, j >= 1 on its response j, -1 on padding
      (`batching.pack_prompt_groups`).
  Returns:
    [B, T, T] bool: slot s is visible from query t iff s <= t, both are in one group and
    s holds the prompt or the same response as t. Padding queries see only themselves
    (any output there is masked out downstream), so no softmax row is empty.
  """
  t = branch.shape[1]
  causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]            # [T, S]
  query, key = branch[:, :, None], branch[:, None, :]
  same = ((key == 0) | (key == query)) & (segment[:, :, None] == segment[:, None, :])
  same = same & (key >= 0) & (query >= 0)
  return (causal[None] & same) | jnp.eye(t, dtype=bool)[None]


class HeadProjection(nn.Module):
  """x [B,T,D] -> [B,T,N,Dh]: the q, k or v projection (optionally biased)."""
  cfg: ModelConfig
  num_heads: int
  head_axis: str          # "heads" or "kv_heads"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    shape = (cfg.hidden_size, self.num_heads, cfg.kv_head_dim)
    kernel = _param(self, "kernel", _normal(cfg), shape, ("embed", self.head_axis, "head_dim"),
                    cfg.storage_dtype)
    y = jnp.einsum("btd,dnh->btnh", x, kernel.astype(cfg.compute_dtype))
    if cfg.attention_bias:
      bias = _param(self, "bias", nn.initializers.zeros, shape[1:], (self.head_axis, "head_dim"),
                    cfg.storage_dtype)
      y = y + bias.astype(cfg.compute_dtype)
    return y


class OutProjection(nn.Module):
  """[B,T,H,Dh] -> [B,T,D]: the attention output projection (no bias)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    kernel = _param(self, "kernel", _normal(cfg),
                    (cfg.num_attention_heads, cfg.kv_head_dim, cfg.hidden_size),
                    ("heads", "head_dim", "embed"), cfg.storage_dtype)
    return jnp.einsum("btnh,nhd->btd", x, kernel.astype(cfg.compute_dtype))


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array, dtype) -> Array:
  """Grouped-query softmax attention over heads-first keys and values.

  Each key/value head's query group is folded into the rows of one matmul, so scores,
  softmax and the mixing matmul all run in the layout the matmuls want: no transposes
  of the [rows, S] score matrices, only of the small [T, Dh] operands.

  Args:
    q: [B, T, H, Dh] queries.
    k, v: [B, KV, S, Dh] keys and values (H a multiple of KV).
    mask: [B, T, S] bool, True where query t may see slot s.
    dtype: compute dtype of the mixing matmul (scores and softmax are float32).
  Returns:
    [B, T, H, Dh] in `dtype`.
  """
  if q.shape[1] == 1:
    return _one_query_attention(q, k, v, mask, dtype)
  b, t, h, dh = q.shape
  kv, s = k.shape[1], k.shape[2]
  g = h // kv
  q = q.reshape(b, t, kv, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, dh)
  scores = jnp.einsum("bkqd,bksd->bkqs", q, k.astype(dtype),
                      preferred_element_type=jnp.float32) * (dh ** -0.5)
  group_mask = jnp.broadcast_to(mask[:, None, None], (b, 1, g, t, s)).reshape(b, 1, g * t, s)
  probs = jax.nn.softmax(jnp.where(group_mask, scores, _MASK_VALUE), axis=-1).astype(dtype)
  out = jnp.einsum("bkqs,bksd->bkqd", probs, v.astype(dtype))
  return out.reshape(b, kv, g, t, dh).transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


def _one_query_attention(q: Array, k: Array, v: Array, mask: Array, dtype) -> Array:
  """`dot_product_attention` for one query per row (a decode step), scores [B, KV, S, G].

  With the query group as the minor axis of the scores, both products are one
  [S, Dh] x [Dh, G] matrix per (row, kv head) with the cache as the big operand, which
  XLA's CPU kernels run faster than the [G, Dh] x [Dh, S] form of the general path
  (10-15% of a decode step of the sampler benchmark's model at 64 rows, measured
  beside another job).
  Same math, to float rounding.

  Args:
    q: [B, 1, H, Dh]; k, v: [B, KV, S, Dh]; mask: [B, 1, S] bool.
  Returns:
    [B, 1, H, Dh] in `dtype`.
  """
  b, _, h, dh = q.shape
  kv = k.shape[1]
  q = q.reshape(b, kv, h // kv, dh)
  scores = jnp.einsum("bkgd,bksd->bksg", q, k.astype(dtype),
                      preferred_element_type=jnp.float32) * (dh ** -0.5)
  scores = jnp.where(mask[:, 0, None, :, None], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=2).astype(dtype)
  return jnp.einsum("bksg,bksd->bkgd", probs, v.astype(dtype)).reshape(b, 1, h, dh)


def causal_blockwise_attention(q: Array, k: Array, v: Array, mask: Array, dtype,
                               block: int) -> Array:
  """`dot_product_attention` for a full causal sequence, skipping masked-out blocks.

  Query rows [a, a + block) can only see slots < a + block, so each block of queries
  attends to that prefix of the keys alone: about half the score work and memory of the
  full [T, T] matrix, with the same result (masked slots get exactly zero weight).

  Args:
    q: [B, T, H, Dh]; k, v: [B, KV, T, Dh] (slot s holds token s: no cache offset).
    mask: [B, T, T] causal and padding mask.
    dtype: compute dtype.
    block: query rows per block (<= 0 or >= T: one block).
  Returns:
    [B, T, H, Dh] in `dtype`.
  """
  t = q.shape[1]
  if block <= 0 or block >= t:
    return dot_product_attention(q, k, v, mask, dtype)
  outs = []
  for start in range(0, t, block):
    end = min(start + block, t)
    outs.append(dot_product_attention(q[:, start:end], k[:, :, :end], v[:, :, :end],
                                      mask[:, start:end, :end], dtype))
  return jnp.concatenate(outs, axis=1)


class Attention(nn.Module):
  """Grouped-query self-attention reading and writing a KV cache."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, mask: Array,
               cache: Optional[LayerCache], cache_index: Array
               ) -> Tuple[Array, Optional[LayerCache]]:
    """Attention over the cache slots.

    Args:
      x: [B, T, D] hidden states of the new tokens.
      positions: [B, T] their positions.
      mask: [B, T, S] bool, from `attention_mask`.
      cache: None (then S = T) or (keys, values), each [B, KV, S, Dh]: heads before
        slots, so decoding reads each head's keys as one contiguous [S, Dh] matrix
        instead of transposing the whole cache every step.
      cache_index: scalar slot where the new tokens' keys/values are written.
    Returns:
      ([B, T, D], the updated cache or None).
    """
    cfg = self.cfg
    h, kv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.kv_head_dim
    dt = cfg.compute_dtype
    q = HeadProjection(cfg, h, "heads", name="q_proj")(x)
    k = HeadProjection(cfg, kv, "kv_heads", name="k_proj")(x)
    v = HeadProjection(cfg, kv, "kv_heads", name="v_proj")(x)
    q = rotary_embedding(q, positions, cfg.rope_theta)
    k = rotary_embedding(k, positions, cfg.rope_theta)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)            # [B, KV, T, Dh]
    if cache is None:
      out = causal_blockwise_attention(q, k, v, mask, dt, cfg.attention_query_block)
    else:
      k, v = write_cache(cache[0], k, cache_index), write_cache(cache[1], v, cache_index)
      cache = (k, v)
      out = dot_product_attention(q, k, v, mask, dt)
    return OutProjection(cfg, name="o_proj")(out), cache


class Dense(nn.Module):
  """A bias-free linear map [..., in] -> [..., features] with logical axis names."""
  cfg: ModelConfig
  features: int
  axes: Tuple[str, str]

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    kernel = _param(self, "kernel", _normal(cfg), (x.shape[-1], self.features), self.axes,
                    cfg.storage_dtype)
    return jnp.dot(x, kernel.astype(cfg.compute_dtype))


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B,T,D] -> [B,T,D]."""
    cfg = self.cfg
    gate = Dense(cfg, cfg.intermediate_size, ("embed", "mlp"), name="gate_proj")(x)
    up = Dense(cfg, cfg.intermediate_size, ("embed", "mlp"), name="up_proj")(x)
    return Dense(cfg, cfg.hidden_size, ("mlp", "embed"), name="down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, mask, cache, cache_index):
    """x: [B,T,D] -> ([B,T,D], updated layer cache or None)."""
    attn_out, cache = Attention(self.cfg, name="self_attn")(
        RMSNorm(self.cfg, name="input_layernorm")(x), positions, mask, cache, cache_index)
    x = x + attn_out
    x = x + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="post_attention_layernorm")(x))
    return x, cache


class Embed(nn.Module):
  """Token embedding table [V, D]; `attend` gives tied output logits."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embedding = _param(self, "embedding", _normal(cfg), (cfg.vocab_size, cfg.hidden_size),
                            ("vocab", "embed"), cfg.storage_dtype)

  def __call__(self, tokens: Array) -> Array:
    """tokens: [B,T] int -> [B,T,D]."""
    # Under sharding rules, gather the table's `embed` (FSDP) shards before the lookup, as
    # for any FSDP weight: a lookup split by features cannot be re-split by rows without
    # the partitioner replicating it. A no-op without rules (see `constrain_hidden`).
    table = nn.with_logical_constraint(self.embedding, ("vocab", None))
    return jnp.take(table, tokens, axis=0).astype(self.cfg.compute_dtype)

  def attend(self, x: Array) -> Array:
    """x: [B,T,D] -> logits [B,T,V]."""
    return jnp.dot(x, self.embedding.astype(self.cfg.compute_dtype).T)


def constrain_hidden(x: Array) -> Array:
  """Pins hidden states [B,T,D] to `HIDDEN_AXES` under active logical-axis rules.

  A no-op unless traced inside `nn.logical_axis_rules(...)` with a mesh context
  (`jax.sharding.use_abstract_mesh` or `jax.set_mesh`), so single-device code is unchanged.
  """
  return nn.with_logical_constraint(x, HIDDEN_AXES)


def default_positions(attention_mask: Array) -> Array:
  """Positions that make left padding invisible: [B,T] mask -> [B,T] int32 positions."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class Transformer(nn.Module):
  """The decoder stack, without an output head.

  `__call__` returns the final normed hidden states; the heads (`heads.py`) map them
  to token logits or to one scalar per token.
  """
  cfg: ModelConfig

  def setup(self):
    layer_cls = nn.remat(DecoderLayer) if self.cfg.remat else DecoderLayer
    self.embed_tokens = Embed(self.cfg)
    self.layers = [layer_cls(self.cfg) for _ in range(self.cfg.num_hidden_layers)]
    self.norm = RMSNorm(self.cfg)

  def __call__(self, tokens: Array, kv_mask: Array, positions: Array,
               cache: Optional[KVCache] = None, cache_index: Array | int = 0
               ) -> Tuple[Array, Optional[KVCache]]:
    """Runs the stack over new tokens.

    Args:
      tokens: [B, T] int token ids.
      kv_mask: [B, S] 1 where a slot holds a real token; S = T without a cache. Without a
        cache it may instead be the whole [B, T, T] bool mask (query t sees slot s), e.g.
        `shared_prompt_attention_mask`; it must then be causal.
      positions: [B, T] int positions of the new tokens.
      cache: None, or the per-layer (keys, values) of `init_cache`.
      cache_index: scalar slot of the first new token in the cache.
    Returns:
      hidden: [B, T, D] in the compute dtype; the updated cache (None without one).
    """
    x = constrain_hidden(self.embed_tokens(tokens))
    if kv_mask.ndim == 3:
      if cache is not None:
        raise ValueError("A [B, T, T] attention mask is for full-sequence forwards; decoding "
                         "with a cache takes the [B, S] slot mask.")
      mask = kv_mask.astype(bool)
    else:
      mask = attention_mask(kv_mask, cache_index, tokens.shape[1])
    new_cache = []
    for i, layer in enumerate(self.layers):
      x, layer_cache = layer(x, positions, mask, None if cache is None else cache[i], cache_index)
      x = constrain_hidden(x)
      new_cache.append(layer_cache)
    return self.norm(x), (None if cache is None else tuple(new_cache))

  def attend(self, x: Array) -> Array:
    """Tied output logits: [B,T,D] -> [B,T,V]."""
    return self.embed_tokens.attend(x)


# Logical axis names of each cache tensor [B, KV, S, Dh] (the sharding rules map them).
CACHE_AXES = ("cache_batch", "cache_kv_heads", "cache_length", "cache_head_dim")


def init_cache(cfg: ModelConfig, batch_size: int, max_length: int, dtype=None) -> KVCache:
  """Zeros for every layer's keys and values: each [B, KV, S, Dh] (`CACHE_AXES`)."""
  shape = (batch_size, cfg.num_key_value_heads, max_length, cfg.kv_head_dim)
  dtype = dtype or cfg.compute_dtype
  return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
               for _ in range(cfg.num_hidden_layers))
