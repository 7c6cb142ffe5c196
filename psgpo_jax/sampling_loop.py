"""The device side of sampling: one jitted prefill + decode loop over a KV cache.

`compiled(model_cfg, static, mesh, rules)` returns the jitted function `sampling.Sampler`
calls: prefill of the whole prompt in one forward (logits of the last position only), the
KV cache repeated over `num_samples` rows, then `jax.lax.while_loop`s that sample one token
per step, end rows on EOS or a completed stop string (the stop automaton's token table),
and compact ended rows out (`row_compaction`). Shapes: prompts [P, L] left-padded, rows
B = P * num_samples, M = max_new_tokens.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from psgpo_jax import sharding
from psgpo_jax.models.config import ModelConfig
from psgpo_jax.models.feature_major import decode_function, feature_major_decoding
from psgpo_jax.models.heads import CausalLM
from psgpo_jax.models.transformer import CACHE_AXES, default_positions, init_cache
from psgpo_jax.row_compaction import DecodeRows, compaction_levels, gather_rows
from psgpo_jax.token_sampling import sample_tokens

Array = jax.Array

FINISH_LENGTH, FINISH_EOS, FINISH_STOP = 0, 1, 2
FINISH_REASONS = ("length", "eos", "stop")

# How many times each static sampling setup was traced (compiled): tests and monitoring.
TRACE_COUNTS: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class Static:
  """What the compiled function depends on besides shapes."""
  max_new_tokens: int
  temperature: float
  top_k: int
  top_p: float
  greedy: bool
  num_samples: int
  eos_ids: Tuple[int, ...]
  use_stop: bool
  stop_match_state: int
  pad_id: int
  compact_halvings: int
  decode_layout: str


def _prefill_last(module: CausalLM, tokens, positions, kv_mask, cache):
  """Prefill forward that projects only the last position to logits: [B,1,V]."""
  hidden, cache = module.model(tokens, kv_mask, positions, cache, 0)
  return module.logits(hidden[:, -1:]), cache


def _prefill(model: CausalLM, params, tokens: Array, mask: Array, max_new: int,
             num_samples: int):
  """One forward over the prompts, then the cache shared by `num_samples` rows each.

  Args:
    tokens, mask: [P, L] left-padded prompts (the last column is real in every row).
  Returns:
    cache (per layer [P*n, KV, L+M, Dh]), kv_mask [P*n, L+M], logits of the last prompt
    token [P*n, V], positions of the first new token [P*n].
  """
  p, length = tokens.shape
  positions = default_positions(mask)
  kv_mask = jnp.concatenate([mask.astype(jnp.int32), jnp.ones((p, max_new), jnp.int32)], 1)
  cache = init_cache(model.cfg, p, length + max_new)
  logits, cache = model.apply({"params": params}, tokens, positions, kv_mask, cache,
                              method=_prefill_last)
  logits, next_pos = logits[:, 0], positions[:, -1] + 1
  if num_samples > 1:
    rep = functools.partial(jnp.repeat, repeats=num_samples, axis=0)
    cache = jax.tree.map(rep, cache)
    kv_mask, logits, next_pos = rep(kv_mask), rep(logits), rep(next_pos)
  return cache, kv_mask, logits, next_pos


def _next_tokens(static: Static, logits: Array, u: Array, done: Array, stop_state: Array,
                 stop_table: Array):
  """Samples one token per row and updates the end-of-row bookkeeping.

  Args:
    logits: [B, V]; u: [B] uniforms; done: [B] bool rows already ended;
    stop_state: [B] automaton states; stop_table: [num_states, V].
  Returns:
    tokens [B] (pad for ended rows), logprobs [B] (0 for ended rows), live [B] (the row
    made this token), reason [B] (FINISH_*), done [B], stop_state [B].
  """
  tok, logp = sample_tokens(logits, u, temperature=static.temperature, top_k=static.top_k,
                            top_p=static.top_p, greedy=static.greedy)
  live = ~done
  tok = jnp.where(live, tok, static.pad_id)
  logp = jnp.where(live, logp, 0.0)
  eos = np.asarray(static.eos_ids or (-1,), np.int32)
  is_eos = live & jnp.any(tok[:, None] == eos[None, :], axis=-1)
  if static.use_stop:
    stop_state = jnp.where(live, stop_table[stop_state, tok], stop_state)
    is_stop = live & ~is_eos & (stop_state == static.stop_match_state)
  else:
    is_stop = jnp.zeros_like(is_eos)
  reason = jnp.where(is_eos, FINISH_EOS, jnp.where(is_stop, FINISH_STOP, FINISH_LENGTH))
  return tok, logp, live, reason, done | is_eos | is_stop, stop_state


def _uniforms(keys: Array, step) -> Array:
  """One uniform per row for decode step `step`: [B] keys -> [B] float32."""
  return jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step)))(keys)


@functools.lru_cache(maxsize=64)
def compiled(model_cfg: ModelConfig, static: Static, mesh: Optional[Mesh],
              rules: Optional[Tuple[Tuple[str, Any], ...]]):
  """The jitted generate function for one static setup (jit caches shapes).

  With a mesh, rows are split over the `batch` rule's mesh axes and each KV-cache tensor
  is pinned as the `cache_*` rules say; `rules` are in Flax's hashable pair form
  (`sharding.flax_rules`).
  """
  model = CausalLM(model_cfg)
  m = static.max_new_tokens
  table = None if rules is None else dict(rules)

  def constrain(x):
    """Rows [B, ...] over the batch axes."""
    if mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh, table))

  def constrain_cache(cache):
    if mesh is None:
      return cache
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding.logical_to_sharding(
        PartitionSpec(*CACHE_AXES), x.shape, mesh, table)), cache)

  def run(params, tokens, mask, rng, stop_state, stop_table, valid, first_row):
    """Prefill, then a while loop that makes one token per step until all rows end.

    Args:
      params: CausalLM params.
      tokens, mask: [P, L] left-padded prompts.
      rng: a PRNG key.
      stop_state: [P*n] int32 initial stop-automaton states.
      stop_table: [num_states, V] int32 token transitions (dummy when unused).
      valid: [P*n] bool, False for padding rows.
      first_row: int32 scalar, the index of row 0 in the keying (`Sampler.generate`).
    Returns:
      tokens [P*n, M] int32, logprobs [P*n, M] float32, lengths [P*n] int32,
      reasons [P*n] int32 (FINISH_*).
    """
    TRACE_COUNTS[(model_cfg, static)] += 1
    length = tokens.shape[1]
    cache, kv_mask, logits, pos = _prefill(model, params, tokens, mask, m, static.num_samples)
    cache = constrain_cache(cache)
    kv_mask, logits, pos = jax.tree.map(constrain, (kv_mask, logits, pos))
    rows = logits.shape[0]
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, first_row + jnp.arange(rows))
    tok, logp, live, reasons, done, stop_state = _next_tokens(
        static, logits, _uniforms(row_keys, 0), ~valid, stop_state, stop_table)
    out_tok = jnp.full((rows, m), static.pad_id, jnp.int32).at[:, 0].set(tok)
    out_logp = jnp.zeros((rows, m), jnp.float32).at[:, 0].set(logp)
    state = DecodeRows(index=jnp.arange(rows), keys=row_keys, kv_mask=kv_mask, cache=cache,
                        tok=tok, pos=pos, lengths=live.astype(jnp.int32), done=done,
                        stop_state=stop_state, out_tok=out_tok, out_logp=out_logp,
                        reasons=reasons)
    full = (out_tok, out_logp, state.lengths, reasons)
    levels = (rows,) if mesh is not None else compaction_levels(rows, static.compact_halvings)
    step = jnp.int32(1)
    for level, next_rows in zip(levels, levels[1:] + (0,)):
      if level < rows:
        state = gather_rows(state, jnp.argsort(state.done, stable=True)[:level])
      decode = decode_function(params, model_cfg, feature_major_decoding(
          static.decode_layout, mesh is not None, level))

      def cond(carry, next_rows=next_rows):
        step, rows_state = carry
        return ((step < m) & ~jnp.all(rows_state.done)
                & (jnp.sum(~rows_state.done) > next_rows))

      def body(carry):
        step, r = carry
        logits, cache = decode(r.tok, r.pos, r.kv_mask, r.cache, length + step - 1)
        tok, logp, live, reason, done, stop_state = _next_tokens(
            static, logits, _uniforms(r.keys, step), r.done, r.stop_state, stop_table)
        write = lambda out, x: jax.lax.dynamic_update_slice_in_dim(out, x[:, None], step, 1)
        return step + 1, r._replace(
            cache=constrain_cache(cache), tok=tok, pos=r.pos + 1, lengths=r.lengths + live,
            done=done, stop_state=stop_state, out_tok=write(r.out_tok, tok),
            out_logp=write(r.out_logp, logp), reasons=jnp.where(live, reason, r.reasons))

      step, state = jax.lax.while_loop(cond, body, (step, state))
      full = tuple(f.at[state.index].set(x) for f, x in zip(
          full, (state.out_tok, state.out_logp, state.lengths, state.reasons)))
    return full

  return jax.jit(run)
