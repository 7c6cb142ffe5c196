"""What the sampler is asked for (`SamplingConfig`) and what it returns (`SampleOutput`).

`SamplingConfig` is hashable: it keys the sampler's compiled functions (`sampling.py`).
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import numpy as np

from psgpo_jax.fields import checked_fields


DECODE_LAYOUTS = ("auto", "feature_major", "batch_major")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """What to sample and how; hashable, so it keys the compiled functions.

  Attributes:
    max_new_tokens: M, new tokens per row at most (also the output width).
    temperature: logits are divided by it before sampling (> 0).
    top_k: keep the k most likely tokens (0 = off).
    top_p: nucleus: keep the smallest set of most likely tokens whose probability (after
      top-k) reaches top_p (1.0 = off).
    greedy: argmax instead of sampling (temperature, top-k, top-p ignored).
    num_samples: responses per prompt; the prompt's KV cache is computed once.
    eos_ids: token ids that end a row; None = the model config's `eos_token_id`.
    stop_strings: strings that end a row (needs a tokenizer); see the module docstring.
    pad_id: token written after a row ends and used for padding.
    min_prompt_bucket: smallest padded prompt length.
    prompt_buckets: explicit padded prompt lengths (sorted); () = powers of two.
    min_batch_bucket: smallest padded number of prompts; () below = powers of two.
    batch_buckets: explicit padded numbers of prompts (sorted).
    compact_halvings: once the rows still decoding fit in half the batch, the loop goes
      on with those rows only; it halves the batch up to this many times, never below 8
      rows (`row_compaction.compaction_levels`; 0 = never; not under a mesh). Outputs are the
      same; each halving adds one loop body to compile.
    decode_layout: how a decode step lays out its hidden states and kernels:
      "feature_major" ([D, B] states, [out, in] kernels: XLA's CPU matmuls run the
      step's skinny products much faster so; `models/feature_major.py`), "batch_major"
      (the model's own [B, D] forward), or "auto": feature-major on a CPU backend
      without a mesh for at most 64 rows (`feature_major.AUTO_MAX_ROWS`), batch-major
      otherwise (unmeasured on accelerators). Same math.
  """
  max_new_tokens: int = 128
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  num_samples: int = 1
  eos_ids: Optional[Tuple[int, ...]] = None
  stop_strings: Tuple[str, ...] = ()
  pad_id: int = 0
  min_prompt_bucket: int = 16
  prompt_buckets: Tuple[int, ...] = ()
  min_batch_bucket: int = 1
  batch_buckets: Tuple[int, ...] = ()
  compact_halvings: int = 2
  decode_layout: str = "auto"

  def __post_init__(self):
    for name in ("eos_ids", "stop_strings", "prompt_buckets", "batch_buckets"):
      value = getattr(self, name)
      if value is not None and not isinstance(value, tuple):
        object.__setattr__(self, name, tuple(value))
    if self.max_new_tokens < 1:
      raise ValueError(f"sampling.max_new_tokens={self.max_new_tokens} must be >= 1.")
    if not self.greedy and not self.temperature > 0:
      raise ValueError(f"sampling.temperature={self.temperature} must be > 0 (or set greedy).")
    if self.top_k < 0:
      raise ValueError(f"sampling.top_k={self.top_k} must be >= 0 (0 = off).")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"sampling.top_p={self.top_p} must be in (0, 1].")
    if self.compact_halvings < 0:
      raise ValueError(f"sampling.compact_halvings={self.compact_halvings} must be >= 0 "
                       "(0 = off).")
    if self.decode_layout not in DECODE_LAYOUTS:
      raise ValueError(f"sampling.decode_layout={self.decode_layout!r} must be one of "
                       f"{DECODE_LAYOUTS}.")
    if self.num_samples < 1:
      raise ValueError(f"sampling.num_samples={self.num_samples} must be >= 1.")
    if any(not s for s in self.stop_strings):
      raise ValueError("sampling.stop_strings must not contain the empty string.")
    for name in ("prompt_buckets", "batch_buckets"):
      if list(getattr(self, name)) != sorted(getattr(self, name)):
        raise ValueError(f"sampling.{name}={getattr(self, name)} must be sorted.")

  def replace(self, **changes) -> "SamplingConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_dict(cls, values) -> "SamplingConfig":
    """From a mapping such as `config.sampling`; comma-separated strings become tuples.

    stop_strings "auto" not resolved for a data source (`data.prompts.
    resolve_stop_strings`, which the pipeline's RunContext calls) means function stops.
    """
    values = checked_fields(cls, values, "sampling config")
    if values.get("stop_strings") == "auto":   # unresolved (no data source): function stops
      from psgpo_jax.data.prompts import FUNCTION_STOPS  # pylint: disable=import-outside-toplevel
      values["stop_strings"] = FUNCTION_STOPS
    if isinstance(values.get("stop_strings"), str):
      values["stop_strings"] = tuple(s for s in values["stop_strings"].split(",") if s)
    if isinstance(values.get("eos_ids"), str):
      values["eos_ids"] = tuple(int(s) for s in values["eos_ids"].split(",") if s.strip())
    return cls(**values)


def from_pipeline_config(config, tokenizer, num_samples: int,
                         temperature: Optional[float] = None,
                         greedy: bool = False) -> SamplingConfig:
  """The SamplingConfig of a pipeline config's `sampling` section, with the tokenizer's
  EOS (the model config's when the tokenizer has none) and its pad token (EOS when it
  has none). The one conversion: RL rollouts, label collection and evaluation use it.
  """
  section = dict(config.sampling)
  eos = tokenizer.eos_token_id
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
  section.update(num_samples=int(num_samples), greedy=greedy,
                 eos_ids=(int(eos),) if eos is not None else None,
                 pad_id=int(pad) if pad is not None else 0)
  if temperature is not None:
    section["temperature"] = float(temperature)
  return SamplingConfig.from_dict(section)


@dataclasses.dataclass
class SampleOutput:
  """Sampled responses, N = len(prompts) * num_samples rows, prompt-major.

  Attributes:
    tokens: [N, M] int32 new tokens (EOS included), `pad_id` after the end.
    logprobs: [N, M] float32 log-probs under the sampling policy (see module doc), 0 after
      the end.
    mask: [N, M] bool, True for the kept response tokens.
    lengths: [N] int32 kept tokens per row (= mask.sum(1)).
    finish_reason: N strings: "eos", "stop" or "length".
    texts: N decoded responses (new tokens only, EOS excluded), or None without a
      tokenizer. With a prefix, `decode(prefix) + texts[i]` is the whole response.
    prompt_index: [N] int32, the prompt each row answers (row // num_samples).
  """
  tokens: np.ndarray
  logprobs: np.ndarray
  mask: np.ndarray
  lengths: np.ndarray
  finish_reason: List[str]
  texts: Optional[List[str]]
  prompt_index: np.ndarray
