"""Batched sampling from a causal LM: one jitted prefill + decode loop over a KV cache.

`generate(params, model_cfg, prompts, rng, config, tokenizer=...)` samples
`config.num_samples` responses for each prompt (optionally continuing a partial
response, `prefixes`) and returns tokens, log-probabilities, masks and texts.

How it runs:
- Prompts (prompt + prefix tokens) are left-padded to a length bucket and the batch to a
  batch bucket, so a run compiles a handful of shapes; the jitted function is cached per
  static configuration (`sampling_loop.compiled`) and jit caches it per bucketed shape.
- One jitted call does everything on device: prefill of the whole prompt in one forward
  pass (logits of the last position only), then `jnp.repeat` of its KV cache over the
  `num_samples` rows, then a `jax.lax.while_loop` that samples one token per step and
  exits as soon as every row is done. Rows that have ended are compacted out: once the
  live rows fit in half the batch, they are gathered (cache, keys, state) into a batch
  of half the size and the loop goes on there (`sampling.compact_halvings` times at
  most; the outputs are scattered back, so they do not change).
- Randomness is keyed per row and per step (`fold_in(fold_in(rng, row), step)`), so a row's
  sample does not depend on the batch it shares, on padding, or on the mesh.

Log-probabilities (`SampleOutput.logprobs`) are those of the policy itself:
`log_softmax(logits / temperature)` at the sampled token, *without* the top-k/top-p
renormalisation (what a full-sequence forward of the trainer recomputes). With
`greedy=True` the temperature is 1.

A row ends on (1) an EOS id: the EOS token is kept in the response (mask 1, its
log-prob counts) but not in the text; (2) a stop string: matched in the response text
(prefix + new tokens, never the prompt) by a character automaton lifted to tokens, so the
loop stops the row on device at the token that completes it; on the host the text is cut
at the start of the first completed stop string and the response keeps the fewest tokens
whose text covers what precedes it. A token that straddles the cut is kept whole, so
`texts[i] == decode(kept tokens)` always holds and the kept text may end with the first
characters of the stop string (e.g. the newline of `"\\ndef "` inside a `")\\n"`
token); (3) `max_new_tokens`.
"""
from __future__ import annotations

import collections
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from psgpo_jax import sharding
from psgpo_jax.batching import bucket_length
from psgpo_jax.models.config import ModelConfig
from psgpo_jax.models.heads import check_length
from psgpo_jax.sampling_config import SampleOutput, SamplingConfig
from psgpo_jax.sampling_loop import FINISH_EOS, FINISH_REASONS, FINISH_STOP, Static, compiled
from psgpo_jax.stop_strings import (StopMatcher, common_prefix_len, decode_fn,
                                    fewest_tokens_covering, token_texts)

Array = jax.Array


class Sampler:
  """Samples from one model architecture with one `SamplingConfig`.

  Holds the tokenizer's stop-string tables (computed once) and uses the jitted function
  shared by every sampler with the same static setup.
  """

  def __init__(self, model_cfg: ModelConfig, config: SamplingConfig, tokenizer: Any = None,
               mesh: Optional[Mesh] = None, rules: Optional[sharding.Rules] = None):
    self.model_cfg, self.config, self.tokenizer, self.mesh = model_cfg, config, tokenizer, mesh
    self.rules = None if mesh is None else sharding.flax_rules(mesh, sharding.make_rules(rules))
    if mesh is not None and not sharding.batch_axes(mesh, dict(self.rules)):
      raise ValueError(f"The mesh has axes {dict(mesh.shape)}, none of which the `batch` "
                       f"rule ({dict(self.rules)['batch']}) splits rows over: sampling "
                       f"splits rows over the batch axes. Add a `data` or `fsdp` axis, or "
                       f"change mesh.rules' `batch`.")
    if config.stop_strings and tokenizer is None:
      raise ValueError("sampling.stop_strings need a tokenizer.")
    eos = config.eos_ids
    if eos is None:
      eos = () if model_cfg.eos_token_id is None else (int(model_cfg.eos_token_id),)
    self.eos_ids = tuple(int(e) for e in eos)
    self.matcher = StopMatcher(config.stop_strings) if config.stop_strings else None
    if self.matcher is not None:
      table = self.matcher.token_table(token_texts(tokenizer, model_cfg.vocab_size))
      self._stop_table = jnp.asarray(table)
    else:
      self._stop_table = jnp.zeros((1, 1), jnp.int32)
    greedy = bool(config.greedy)                           # greedy ignores the rest
    self._static = Static(
        max_new_tokens=config.max_new_tokens,
        temperature=1.0 if greedy else float(config.temperature),
        top_k=0 if greedy else int(config.top_k), top_p=1.0 if greedy else float(config.top_p),
        greedy=greedy,
        num_samples=config.num_samples, eos_ids=self.eos_ids,
        use_stop=self.matcher is not None,
        stop_match_state=self.matcher.match_state if self.matcher else -1,
        pad_id=int(config.pad_id), compact_halvings=int(config.compact_halvings),
        decode_layout=config.decode_layout)
    self._decode = decode_fn(tokenizer) if tokenizer is not None else None

  @property
  def data_size(self) -> int:
    """How many ways rows are split (the batch axes' size; 1 without a mesh)."""
    return 1 if self.mesh is None else sharding.batch_axis_size(self.mesh, dict(self.rules))

  def _place(self, params, arrays):
    """Batch arrays split over the batch axes; params replicated unless already on the
    mesh."""
    if self.mesh is None:
      return params, arrays
    devices = set(self.mesh.devices.flat)

    def replicate(x):
      sharding = getattr(x, "sharding", None)
      if sharding is not None and set(sharding.device_set) == devices:
        return x
      return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec()))

    params = jax.tree.map(replicate, params)
    rows = sharding.batch_sharding(self.mesh, dict(self.rules))
    arrays = [jax.device_put(a, rows) for a in arrays]
    return params, arrays

  def generate(self, params, prompts: Sequence[Sequence[int]], rng: Array,
               prefixes: Optional[Sequence[Optional[Sequence[int]]]] = None,
               first_row: int = 0) -> SampleOutput:
    """Samples `num_samples` responses per prompt.

    Args:
      params: CausalLM params (a plain pytree).
      prompts: P token-id sequences of any lengths (each non-empty after the prefix).
      rng: a PRNG key; the result is a deterministic function of it.
      prefixes: None, or P partial responses (token ids, or None/[] for a fresh prompt)
        to continue; they are part of the response for stop strings, not of the output.
      first_row: the rows are keyed as rows first_row, first_row + 1, ... of a larger
        batch: each process of a multi-process run samples its share of a batch with the
        same `rng` and its share's first row, and draws what one process would.
    Returns:
      A `SampleOutput` with P * num_samples rows.
    """
    cfg, n = self.config, self.config.num_samples
    prompts = [[int(t) for t in p] for p in prompts]
    if prefixes is None:
      prefixes = [None] * len(prompts)
    if len(prefixes) != len(prompts):
      raise ValueError(f"{len(prefixes)} prefixes for {len(prompts)} prompts.")
    prefixes = [[int(t) for t in (r if r is not None else ())] for r in prefixes]
    seqs = [p + r for p, r in zip(prompts, prefixes)]
    if not seqs:
      raise ValueError("generate() needs at least one prompt.")
    if any(not s for s in seqs):
      raise ValueError("Every prompt (+ prefix) needs at least one token.")
    flat = [t for s in seqs for t in s]
    if min(flat) < 0 or max(flat) >= self.model_cfg.vocab_size:
      raise ValueError(f"Token ids must be in [0, {self.model_cfg.vocab_size}).")

    check_length(max(map(len, seqs)) + cfg.max_new_tokens, self.model_cfg,
                 "The longest prompt (+ prefix) plus sampling.max_new_tokens")
    num_prompts = len(seqs)
    length = bucket_length(max(map(len, seqs)), cfg.prompt_buckets, cfg.min_prompt_bucket)
    batch = bucket_length(num_prompts, cfg.batch_buckets, cfg.min_batch_bucket)
    batch = -(-batch // self.data_size) * self.data_size
    tokens = np.full((batch, length), cfg.pad_id, np.int32)
    mask = np.zeros((batch, length), np.int32)
    for i, s in enumerate(seqs):
      tokens[i, length - len(s):] = s
      mask[i, length - len(s):] = 1
    mask[num_prompts:, -1] = 1                             # padding rows: one dummy token

    prefix_texts = [self._decode(r) if (self._decode and r) else "" for r in prefixes]
    states = np.zeros((batch,), np.int32)
    if self.matcher is not None:
      for i, text in enumerate(prefix_texts):
        states[i] = self.matcher.resume_state(text)
    states = np.repeat(states, n)
    valid = np.repeat(np.arange(batch) < num_prompts, n)

    params, (tokens, mask, states, valid) = self._place(params, [tokens, mask, states, valid])
    fn = compiled(self.model_cfg, self._static, self.mesh, self.rules)
    out = fn(params, tokens, mask, rng, states, self._stop_table, valid,
             np.int32(first_row))
    out_tok, out_logp, lengths, reasons = (np.asarray(x) for x in jax.device_get(out))
    rows = num_prompts * n
    return self._finish(out_tok[:rows], out_logp[:rows], lengths[:rows], reasons[:rows],
                        [r for r in prefixes for _ in range(n)],
                        [t for t in prefix_texts for _ in range(n)])

  def _finish(self, tokens, logprobs, lengths, reasons, prefixes, prefix_texts) -> SampleOutput:
    """Host side: exact stop-string cuts, masks and texts."""
    rows, m = tokens.shape
    tokens, logprobs = tokens.copy(), logprobs.copy()
    lengths, reasons = lengths.astype(np.int32).copy(), reasons.copy()
    texts = [] if self._decode is not None else None
    for i in range(rows):
      kept = tokens[i, :lengths[i]].tolist()
      body = kept[:-1] if reasons[i] == FINISH_EOS else kept
      generated = body                 # every token the policy wrote (EOS excluded)
      if self._decode is not None:
        prefix, prefix_text = prefixes[i], prefix_texts[i]
        full = self._decode(prefix + body)
        base = common_prefix_len(full, prefix_text)
        cut = self.matcher.first_stop(full, base) if self.matcher is not None else None
        if cut is not None:
          target = full[:cut]
          keep = fewest_tokens_covering(self._decode, prefix, body, target)
          kept, body, reasons[i] = body[:keep], body[:keep], FINISH_STOP
          if keep == 0 and not prefix:
            # A fresh response that is only its stop string: its text is empty, but the
            # tokens that wrote the stop stay, so that RL sees (and rewards) the choice
            # to stop at once; a response of no tokens would get no outcome at all.
            kept = generated[:max(1, fewest_tokens_covering(
                self._decode, prefix, generated, full[:self.matcher.stop_end(full, cut)]))]
        texts.append(self._decode(prefix + body)[base:] if body else "")
      lengths[i] = len(kept)
    mask = np.arange(m)[None, :] < lengths[:, None]
    tokens = np.where(mask, tokens, self.config.pad_id).astype(np.int32)
    logprobs = np.where(mask, logprobs, 0.0).astype(np.float32)
    return SampleOutput(
        tokens=tokens, logprobs=logprobs, mask=mask, lengths=lengths,
        finish_reason=[FINISH_REASONS[r] for r in reasons], texts=texts,
        prompt_index=(np.arange(rows) // self.config.num_samples).astype(np.int32))


_SAMPLERS: "collections.OrderedDict[tuple, Sampler]" = collections.OrderedDict()


def cached_sampler(model_cfg: ModelConfig, config: SamplingConfig, tokenizer: Any = None,
                   mesh: Optional[Mesh] = None, rules: Optional[sharding.Rules] = None
                   ) -> Sampler:
  """A sampler from a small cache, so that repeated calls (e.g. one per label batch) reuse
  its stop-string tables, which cost a pass over the vocabulary to build."""
  key = (model_cfg, config, id(tokenizer), mesh,
         None if rules is None else tuple(sorted(sharding.make_rules(rules).items())))
  sampler = _SAMPLERS.get(key)
  if sampler is None or sampler.tokenizer is not tokenizer:
    sampler = Sampler(model_cfg, config, tokenizer, mesh, rules)
    _SAMPLERS[key] = sampler
    while len(_SAMPLERS) > 16:
      _SAMPLERS.popitem(last=False)
  _SAMPLERS.move_to_end(key)
  return sampler


def generate(params, model_cfg: ModelConfig, prompts: Sequence[Sequence[int]], rng: Array,
             config: SamplingConfig, tokenizer: Any = None,
             prefixes: Optional[Sequence[Optional[Sequence[int]]]] = None,
             mesh: Optional[Mesh] = None, rules: Optional[sharding.Rules] = None
             ) -> SampleOutput:
  """Samples `config.num_samples` responses per prompt; see `Sampler.generate`.

  Args:
    params: CausalLM params.
    model_cfg: the model's `ModelConfig`.
    prompts: P token-id sequences of any lengths.
    rng: a PRNG key (the output is a deterministic function of it).
    config: a `SamplingConfig`.
    tokenizer: a Hugging Face tokenizer (or any object with `decode`); needed for texts
      and stop strings.
    prefixes: None or P partial responses to continue (None/[] = fresh prompt).
    mesh: optional `Mesh`: rows are split over the `batch` rule's axes (data, fsdp).
    rules: sharding rules overrides (`sharding.make_rules`); the KV cache follows the
      `cache_*` rules.
  Returns:
    `SampleOutput` with P * num_samples rows, prompt-major.
  """
  return cached_sampler(model_cfg, config, tokenizer, mesh, rules).generate(
      params, prompts, rng, prefixes)
