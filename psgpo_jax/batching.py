"""Packing token sequences into fixed-shape, padded training batches.

Training batches are right-padded `[B, T]` rows of `prompt + response (+ pad)`, with `T`
rounded up to a bucket so that jit compiles a handful of shapes, not one per batch.
Convention shared by SFT, PRM and PPO: position `t` of a per-token quantity (log-prob,
value, reward) belongs to token `t`, predicted from tokens `< t`; `response_mask[t]` is 1
when token `t` is part of the response.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np


def bucket_length(length: int, buckets: Sequence[int] = (), minimum: int = 1) -> int:
  """THE padding policy of every padded dimension (training rows, sampler prompts and
  batch rows), so that jit compiles a few shapes: the smallest of `buckets` >= length,
  past the largest the next multiple of it; without buckets, the smallest power of two
  >= length and >= `minimum`."""
  if not buckets:
    return max(int(minimum), 1 << max(0, (int(length) - 1).bit_length()))
  for b in sorted(buckets):
    if length <= b:
      return int(b)
  top = max(buckets)
  return -(-length // top) * top


def default_buckets(max_length: int, smallest: int = 32) -> tuple:
  """Powers of two from `smallest` and their 1.5x midpoints, up to `max_length` rounded up.

  E.g. (32, 48, 64, 96, 128, 192, 256): padding wastes at most a third of a row's
  compute, with two shapes per doubling of length to compile.
  """
  out, b = [], smallest
  while True:
    for size in (b, b * 3 // 2):
      out.append(size)
      if size >= max_length:
        return tuple(out)
    b *= 2


def pack_sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                   pad_id: int, buckets: Sequence[int], batch_size: Optional[int] = None
                   ) -> Dict[str, np.ndarray]:
  """Right-padded rows of prompt + response tokens.

  Args:
    prompts: N lists of prompt token ids.
    responses: N lists of response token ids (EOS included when it was generated).
    pad_id: the padding token id.
    buckets: allowed row lengths T.
    batch_size: rows B >= N; extra rows are all padding (mask 0), so a last partial
      batch keeps the compiled shape.
  Returns:
    tokens [B,T] int32, attention_mask [B,T] int32, response_mask [B,T] int32,
    prompt_lengths [B] int32, response_lengths [B] int32.
  """
  n = len(prompts)
  b = batch_size or n
  if b < n:
    raise ValueError(f"batch_size={b} is smaller than the number of sequences {n}.")
  longest = max((len(p) + len(r) for p, r in zip(prompts, responses)), default=1)
  t = bucket_length(longest, buckets)
  tokens = np.full((b, t), pad_id, np.int32)
  attention = np.zeros((b, t), np.int32)
  response_mask = np.zeros((b, t), np.int32)
  prompt_lengths = np.zeros((b,), np.int32)
  response_lengths = np.zeros((b,), np.int32)
  for i, (p, r) in enumerate(zip(prompts, responses)):
    lp, lr = len(p), len(r)
    tokens[i, :lp + lr] = list(p) + list(r)
    attention[i, :lp + lr] = 1
    response_mask[i, lp:lp + lr] = 1
    prompt_lengths[i], response_lengths[i] = lp, lr
  return {"tokens": tokens, "attention_mask": attention, "response_mask": response_mask,
          "prompt_lengths": prompt_lengths, "response_lengths": response_lengths}


def pack_prompt_groups(tokens: np.ndarray, prompt_lengths: np.ndarray, lengths: np.ndarray,
                       group_ids: Sequence[int], buckets: Sequence[int], num_rows: int = 0,
                       row_offset: int = 0, slot_offset: int = 0) -> Dict[str, np.ndarray]:
  """Rows of prompt groups: each prompt once, then each of its responses.

  Rollouts sample several responses per prompt; in the right-padded `[N, T]` layout of
  `pack_sequences` every row repeats its prompt. Here the groups of consecutive rows with
  the same `group_ids` become segments `prompt, response_1, ..., response_k` of R rows
  (+ pad); response j attends to its segment's prompt and to itself (causally), never to
  another response or segment, and its positions continue from the prompt's end, so
  every token sees exactly the context (tokens and positions) of its own `[N, T]` row.
  Groups go to rows longest first, each to the row with the fewest tokens so far.

  Args:
    tokens: [N, T] int, right-padded rows `prompt + response` (`pack_sequences`).
    prompt_lengths, lengths: [N] prompt and total (prompt + response) lengths.
    group_ids: [N]; runs of equal consecutive ids share one prompt (checked).
    buckets: allowed packed row lengths Tp.
    num_rows: R (0: one row per group); the groups must fill every row.
    row_offset, slot_offset: added to the flat indices into [N * T] and [R * Tp] (a
      process's first global row and first global packed slot / Tp, i.e. its first global
      packed row), so that the maps index the global batch on many processes.
  Returns:
    tokens, positions [R, Tp] int32;
    segment [R, Tp] int32: the group's index within its row, -1 on padding;
    branch [R, Tp] int32: 0 on a prompt, j on its response j (1-based), -1 on padding;
    parents [R, Tp] int32: the slot of the token before this one in its own sequence
      (the slot whose output predicts it; -1 for a prompt's first token and padding);
    to_packed [R, Tp] int32: flat index into [N * T] of each slot's token (prompt slots:
      the group's first row), to gather per-token fields into this layout;
    to_rows [N, T] int32: flat index into [R * Tp] of each token of each row (padding:
      its group's first slot), to gather per-token outputs back.
  Raises:
    ValueError: rows of one group whose prompts differ, an empty prompt, or fewer
      groups than rows.
  """
  tokens = np.asarray(tokens)
  n, t = tokens.shape
  group_ids = np.asarray(group_ids)
  starts = [0] + [i for i in range(1, n) if group_ids[i] != group_ids[i - 1]] + [n]
  groups = [range(a, b) for a, b in zip(starts[:-1], starts[1:])]
  for rows in groups:
    p = int(prompt_lengths[rows[0]])
    if p < 1:
      raise ValueError(f"Row {rows[0]} has an empty prompt: its first response token would "
                       f"have no slot to be predicted from; give every row a prompt.")
    for i in rows:
      if int(prompt_lengths[i]) != p or not np.array_equal(tokens[i, :p], tokens[rows[0], :p]):
        raise ValueError(f"Rows {rows[0]} and {i} share group id {group_ids[i]} but not their "
                         f"prompt; group ids must mark rows sampled from one prompt.")
  num_rows = num_rows or len(groups)
  if len(groups) < num_rows:
    raise ValueError(f"{len(groups)} prompt groups cannot fill {num_rows} rows.")
  sizes = [int(prompt_lengths[r[0]]) + sum(int(lengths[i] - prompt_lengths[i]) for i in r)
           for r in groups]
  row_of, fill = np.zeros(len(groups), np.int64), np.zeros(num_rows, np.int64)
  for gi in sorted(range(len(groups)), key=lambda i: -sizes[i]):
    row_of[gi] = int(np.argmin(fill))
    fill[row_of[gi]] += sizes[gi]
  tp = bucket_length(int(fill.max()), buckets)
  out = {"tokens": np.zeros((num_rows, tp), np.int32),
         "positions": np.zeros((num_rows, tp), np.int32),
         "segment": np.full((num_rows, tp), -1, np.int32),
         "branch": np.full((num_rows, tp), -1, np.int32),
         "parents": np.full((num_rows, tp), -1, np.int32),
         "to_packed": np.zeros((num_rows, tp), np.int32)}
  to_rows = np.zeros((n, t), np.int32)
  used, segments = np.zeros(num_rows, np.int64), np.zeros(num_rows, np.int32)
  for gi, rows in enumerate(groups):
    row, first, p = int(row_of[gi]), rows[0], int(prompt_lengths[rows[0]])
    start, base = int(used[row]), (row + slot_offset) * tp
    prompt = np.arange(start, start + p)
    out["tokens"][row, prompt] = tokens[first, :p]
    out["positions"][row, prompt] = np.arange(p)
    out["segment"][row, start:start + sizes[gi]] = segments[row]
    out["branch"][row, prompt] = 0
    out["parents"][row, prompt[1:]] = prompt[:-1]
    out["to_packed"][row, prompt] = (first + row_offset) * t + np.arange(p)
    slot = start + p
    for j, i in enumerate(rows):
      r = int(lengths[i]) - p
      span = np.arange(slot, slot + r)
      out["tokens"][row, span] = tokens[i, p:p + r]
      out["positions"][row, span] = np.arange(p, p + r)
      out["branch"][row, span] = j + 1
      out["parents"][row, span] = np.concatenate([[start + p - 1], span[:-1]])[:r]
      out["to_packed"][row, span] = (i + row_offset) * t + np.arange(p, p + r)
      to_rows[i, :] = base + start
      to_rows[i, :p] = base + prompt
      to_rows[i, p:p + r] = base + span
      slot += r
    used[row], segments[row] = slot, segments[row] + 1
  out["to_rows"] = to_rows
  return out
