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


def bucket_length(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= length; past the largest bucket, the next multiple of it."""
  for b in sorted(buckets):
    if length <= b:
      return b
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
