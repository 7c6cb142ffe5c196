"""Row compaction for the sampler's decode loop: ended rows stop costing work.

A batched decoder computes every row until the batch's longest row ends. The sampler's
loop (`sampling.py`) instead runs at a few batch sizes (`compaction_levels`): once the
rows still decoding fit in the next size, it gathers them (`gather_rows`: the KV cache,
the PRNG keys and every per-row field of `DecodeRows`) into a batch of that size and goes
on there; each row's outputs are scattered back to its index in the full batch, so they
do not change.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array


class DecodeRows(NamedTuple):
  """The decode loop's per-row state; row i of every field is the batch row index[i]."""
  index: Array        # [R] int32, the row's index in the full batch
  keys: Array         # [R] PRNG keys
  kv_mask: Array      # [R, L+M]
  cache: Any          # per layer ([R, KV, L+M, Dh], [R, KV, L+M, Dh])
  tok: Array          # [R] the last token
  pos: Array          # [R] its position
  lengths: Array      # [R] tokens made
  done: Array         # [R] bool
  stop_state: Array   # [R]
  out_tok: Array      # [R, M]
  out_logp: Array     # [R, M]
  reasons: Array      # [R] FINISH_*


def gather_rows(state: DecodeRows, order: Array) -> DecodeRows:
  """The rows `order` [R'] of every field (the cache along its batch axis)."""
  return jax.tree.map(lambda x: jnp.take(x, order, axis=0), state)


def compaction_levels(rows: int, halvings: int, min_rows: int = 8) -> Tuple[int, ...]:
  """The batch sizes the decode loop runs at: rows, then up to `halvings` halves of at
  least `min_rows` rows.

  The loop moves to the next size as soon as the rows still decoding fit in it, so ended
  rows stop costing work. Each size is one more loop body to compile, so a few halvings
  (where most of the waste is) pay best. E.g. (512, 2) -> (512, 256, 128).
  """
  levels = [rows]
  while (len(levels) <= halvings and levels[-1] % 2 == 0
         and levels[-1] // 2 >= min_rows):
    levels.append(levels[-1] // 2)
  return tuple(levels)
