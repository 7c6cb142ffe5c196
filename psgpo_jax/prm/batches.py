"""PRM examples and batches: labeled responses in token space, packed for training.

A labeled row (`shards.load_labels`) becomes a `PRMExample`: its prompt + response
tokens and, at each line-end token, the line's label (+1 recoverable prefix, -1 not, 0
for a blank or comment-only line), the target the PRM regresses to there.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from psgpo_jax import batching
from psgpo_jax.rollout import encode

Row = Dict[str, Any]
BATCH_KEYS = ("tokens", "attention_mask", "line_end_mask", "targets", "loss_mask")


def line_end_indices(tokenizer: Any, prompt_ids: Sequence[int], response_ids: Sequence[int]
                     ) -> List[int]:
  """Per response line, the index (within `response_ids`) of its end token."""
  from psgpo_jax.tokenization import line_spans  # pylint: disable=import-outside-toplevel
  return [int(e) for e in line_spans(tokenizer, prompt_ids, response_ids).end_token]


@dataclasses.dataclass(frozen=True)
class PRMExample:
  """One labeled response in token space.

  Attributes:
    prompt_ids, response_ids: token ids.
    line_ends: per kept line, the index of its line-end token within `response_ids`.
    labels: per kept line, its label (+1 / -1 / 0).
    used: per kept line, 1 if it trains the PRM (0 = switched off by balancing).
    row: index of the source row.
  """
  prompt_ids: Tuple[int, ...]
  response_ids: Tuple[int, ...]
  line_ends: Tuple[int, ...]
  labels: Tuple[int, ...]
  used: Tuple[int, ...]
  row: int


def make_examples(rows: Sequence[Row], tokenizer: Any, max_len: int) -> List[PRMExample]:
  """Tokenises labeled rows; truncates responses to `max_len` tokens in all.

  Rows need `prompt`, `response`, `line_labels` and optionally `line_end_token_indices`
  (indices into the response's own token ids, one per line; computed with
  `tokenization.line_spans` when absent). Lines whose end token falls past
  `max_len` are dropped; rows whose prompt alone does not fit are dropped.
  """
  out = []
  for r, row in enumerate(rows):
    labels = row.get("line_labels")
    if labels is None:
      continue
    prompt_ids = encode(tokenizer, row["prompt"])
    response_ids = encode(tokenizer, row["response"])
    ends = row.get("line_end_token_indices")
    if ends is None:
      ends = line_end_indices(tokenizer, prompt_ids, response_ids)
    if len(labels) != len(ends):
      raise ValueError(f"Row {r}: {len(labels)} line labels but {len(ends)} line ends.")
    room = max_len - len(prompt_ids)
    if room <= 0:
      continue
    response_ids = response_ids[:room]
    used = row.get("line_used") or [1] * len(labels)
    keep = [i for i, e in enumerate(ends) if e < len(response_ids)]
    if not keep:
      continue
    out.append(PRMExample(tuple(prompt_ids), tuple(response_ids),
                          tuple(int(ends[i]) for i in keep), tuple(int(labels[i]) for i in keep),
                          tuple(int(used[i]) for i in keep), r))
  return out


def pack_examples(examples: Sequence[PRMExample], pad_id: int, buckets: Sequence[int],
                  batch_size: Optional[int] = None) -> Dict[str, np.ndarray]:
  """One fixed-shape batch of examples.

  Lines that share an end token (a blank line inside a multi-newline token) share one
  position: its target is the label of the last line with a +-1 label there (the
  longest prefix the token completes), else 0.

  Args:
    examples: up to `batch_size` examples.
    pad_id: padding token id.
    buckets: allowed sequence lengths T.
    batch_size: rows B (extra rows are padding with all masks 0).
  Returns:
    tokens [B,T] int32, attention_mask [B,T] int32, line_end_mask [B,T] int32 (1 at every
    kept line end), targets [B,T] float32 (the label at line ends, else 0), loss_mask
    [B,T] float32 (line ends that train), row_index [B] int32 (source row, -1 = padding).
  """
  packed = batching.pack_sequences([e.prompt_ids for e in examples],
                                   [e.response_ids for e in examples], pad_id, buckets,
                                   batch_size)
  b, t = packed["tokens"].shape
  line_end = np.zeros((b, t), np.int32)
  targets = np.zeros((b, t), np.float32)
  loss_mask = np.zeros((b, t), np.float32)
  row_index = np.full((b,), -1, np.int32)
  for i, e in enumerate(examples):
    signed = set()
    for end, label, used in zip(e.line_ends, e.labels, e.used):
      pos = len(e.prompt_ids) + end
      line_end[i, pos] = 1
      if label != 0 or pos not in signed:
        targets[i, pos], loss_mask[i, pos] = label, used
      if label != 0:
        signed.add(pos)
    row_index[i] = e.row
  return {"tokens": packed["tokens"], "attention_mask": packed["attention_mask"],
          "line_end_mask": line_end, "targets": targets, "loss_mask": loss_mask,
          "row_index": row_index}


def batches_with_examples(rows: Sequence[Row], tokenizer: Any, max_len: int, batch_size: int,
                          pad_id: int, buckets: Optional[Sequence[int]] = None
                          ) -> List[Tuple[Dict[str, np.ndarray], List[PRMExample]]]:
  """(batch, its examples) pairs over all rows, examples sorted by length."""
  buckets = buckets or batching.default_buckets(max_len)
  examples = make_examples(rows, tokenizer, max_len)
  examples.sort(key=lambda e: len(e.prompt_ids) + len(e.response_ids))
  out = []
  for s in range(0, len(examples), batch_size):
    chunk = examples[s:s + batch_size]
    out.append((pack_examples(chunk, pad_id, buckets, batch_size), chunk))
  return out


def make_prm_batches(rows: Sequence[Row], tokenizer: Any, max_len: int, batch_size: int,
                     pad_id: int, buckets: Optional[Sequence[int]] = None
                     ) -> List[Dict[str, np.ndarray]]:
  """All rows as fixed-shape batches, grouped by length (few distinct T).

  Examples are sorted by length so each batch pads to the smallest bucket that fits
  (`buckets`, default powers of two up to `max_len`); the last batch is padded to
  `batch_size` rows. See `pack_examples` for the arrays.
  """
  return [batch for batch, _ in batches_with_examples(rows, tokenizer, max_len, batch_size, pad_id,
                                         buckets)]


def train_batches(examples: Sequence[PRMExample], batch_size: int, pad_id: int,
                  buckets: Sequence[int], rng: np.random.Generator):
  """Endless shuffled batches, epoch after epoch.

  Each epoch yields only full batches (the remainder waits for a later epoch's shuffle),
  so no step averages over a handful of lines; with fewer examples than `batch_size`,
  every batch holds all of them, padded to `batch_size` rows.
  """
  if not examples:
    raise ValueError("No PRM training examples (no labeled line fits max_len?).")
  while True:
    order = rng.permutation(len(examples))
    for s in range(0, max(len(order) - batch_size + 1, 1), batch_size):
      chosen = [examples[i] for i in order[s:s + batch_size]]
      yield pack_examples(chosen, pad_id, buckets, batch_size)
