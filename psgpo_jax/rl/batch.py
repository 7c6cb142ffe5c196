"""Rollouts as the host arrays the scorer and the PPO update read.

`rollout_batch` gives one right-padded `prompt + response` row per sample (`[N, T]`, the
layout rewards and advantages are computed in); `prompt_group_rows` adds the same tokens
as rows of prompt groups (`batching.pack_prompt_groups`: each prompt once, then its
samples), which the scorer and the update run on when `rl.prompts_per_row > 0`.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np

from psgpo_jax import batching, tokenization
from psgpo_jax.rl.learn import GROUP_FIELDS
from psgpo_jax.rollout import Rollouts
from psgpo_jax.sandbox import any_hack

LineLabeler = Callable[[int, Sequence[str]], Sequence[int]]   # (row, lines) -> +-1 / 0 each


def rollout_batch(rollouts: Rollouts, tokenizer: Any, pad_id: int, buckets: Sequence[int],
                  line_labels: Optional[LineLabeler] = None) -> Dict[str, np.ndarray]:
  """Packs rollouts into the fixed-shape arrays the scorer and PPO read.

  Returns [N, T] int32 `tokens`, `attention_mask`, `response_mask`, `line_end_mask`,
  `trivial_line_mask` (right-padded), [N, T] float32 `sampler_logprobs` (the sampler's
  log-prob of each response token at its position, 0 elsewhere: aligned as the learner's
  `old_logprobs`), and [N] float32 `passed`, `pass_fraction`, `hacked`. With
  `line_labels` (the oracle dense-reward source) also [N, T] float32 `prm_scores`: at each
  line-end token the label of the last line ending there (the PRM's label scale), 0
  elsewhere, exactly where a PRM's scores would sit.
  """
  packed = batching.pack_sequences(rollouts.prompt_ids, rollouts.response_ids, pad_id, buckets)
  spans = [tokenization.line_spans(tokenizer, p, r)
           for p, r in zip(rollouts.prompt_ids, rollouts.response_ids)]
  lines = tokenization.batch_line_arrays(spans, packed["response_mask"])
  batch = {k: packed[k] for k in ("tokens", "attention_mask", "response_mask")}
  batch["line_end_mask"] = lines["line_end_mask"]
  batch["trivial_line_mask"] = lines["trivial_line_mask"]
  logprobs = np.zeros(packed["tokens"].shape, np.float32)
  for row, (p, r) in enumerate(zip(rollouts.prompt_ids, rollouts.response_ids)):
    logprobs[row, len(p):len(p) + len(r)] = rollouts.logprobs[row][:len(r)]
  batch["sampler_logprobs"] = logprobs
  batch["passed"] = rollouts.passed.astype(np.float32)
  batch["pass_fraction"] = rollouts.pass_fraction
  flags = rollouts.hack_flags or [{}] * len(rollouts)     # none recorded: nothing flagged
  batch["hacked"] = np.asarray([any_hack(f) for f in flags], np.float32)
  if line_labels is not None:
    scores = np.zeros(lines["line_index"].shape, np.float32)
    for row, row_spans in enumerate(spans):
      labels = np.asarray(line_labels(row, row_spans.lines), np.float32)
      at = lines["line_index"][row] >= 0
      scores[row, at] = labels[lines["line_index"][row, at]]
    batch["prm_scores"] = scores
  return batch


def prompt_group_rows(rollouts: Rollouts, tokens: np.ndarray, samples_per_prompt: int,
                      prompts_per_row: int, buckets: Sequence[int], process_index: int = 0,
                      agree: Optional[Callable[[Sequence[int], int], Sequence[int]]] = None
                      ) -> Dict[str, np.ndarray]:
  """One process's rollouts as rows of prompt groups, fields prefixed `group_`.

  Args:
    rollouts: N = P * samples_per_prompt rows, each prompt's samples consecutive.
    tokens: [N, T] the `rollout_batch` rows.
    samples_per_prompt, prompts_per_row: the group size; groups per packed row (R = P /
      prompts_per_row rows).
    buckets: allowed packed row lengths.
    process_index: the maps index the global batch (every process has N rows).
    agree: `(buckets, local length) -> buckets` whose smallest fits every process's
      rows (None: one process), so that every process packs to the same length.
  Returns:
    `learn.GROUP_FIELDS`, each prefixed `group_`: [R, Tp] arrays and [N, T] `to_rows`.
  """
  prompt_lengths = np.asarray([len(p) for p in rollouts.prompt_ids])
  lengths = prompt_lengths + np.asarray([len(r) for r in rollouts.response_ids])
  n = len(lengths)
  rows = n // samples_per_prompt // prompts_per_row
  pack = lambda allowed: batching.pack_prompt_groups(                   # noqa: E731
      tokens, prompt_lengths, lengths, np.arange(n) // samples_per_prompt, allowed,
      num_rows=rows, row_offset=process_index * n, slot_offset=process_index * rows)
  groups = pack(buckets)
  if agree is not None:
    common = agree(buckets, groups["tokens"].shape[1])
    if min(common) != groups["tokens"].shape[1]:
      groups = pack((min(common),))
  return {f"group_{name}": groups[name] for name in GROUP_FIELDS}
