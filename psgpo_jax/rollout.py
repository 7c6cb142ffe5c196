"""Sampling responses for problems and testing them: THE sample-and-test path.

`sample_and_test` serves the RL trainer (PPO batches), the label collector (the responses
to search, and the K completions of each probed prefix, `prefixes`) and evaluation
(pass@k). Sampling runs on the device, testing in the host sandbox.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import numpy as np

from psgpo_jax.sandbox import Result, hack_report


def encode(tokenizer: Any, text: str) -> List[int]:
  """Token ids of `text` without special tokens (transformers or `tokenizers` objects)."""
  try:
    return list(tokenizer.encode(text, add_special_tokens=False))
  except TypeError:
    out = tokenizer.encode(text)
    return list(getattr(out, "ids", out))


@dataclasses.dataclass
class Rollouts:
  """N sampled responses (prompt-major: `num_samples` rows per problem) and their tests.

  Attributes:
    problem_index: [N] int, index into the problems sampled from.
    prompt_ids: N prompt token lists.
    response_ids: N response token lists (EOS included when generated).
    logprobs: N float32 arrays, the sampler's log-probs of `response_ids`.
    texts: N decoded responses (cut at stop strings, EOS excluded).
    finish_reason: N strings: "eos" | "stop" | "length".
    results: N sandbox `Result`s of `problem.program(text)`.
    hack_flags: N `{kind: bool}` reward-hack monitors (`sandbox.hack_report`).
    seconds: wall time of the phases, {"sample": ..., "test": ...}.
  """
  problem_index: np.ndarray
  prompt_ids: List[List[int]]
  response_ids: List[List[int]]
  logprobs: List[np.ndarray]
  texts: List[str]
  finish_reason: List[str]
  results: List[Result]
  hack_flags: List[Dict[str, bool]] = dataclasses.field(default_factory=list)
  seconds: Dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def passed(self) -> np.ndarray:
    """[N] bool: every test passed."""
    return np.array([r.passed for r in self.results], bool)

  @property
  def pass_fraction(self) -> np.ndarray:
    """[N] float32: share of tests passed."""
    return np.array([r.pass_fraction for r in self.results], np.float32)

  def __len__(self) -> int:
    return len(self.texts)


def sample_and_test(params: Any, sampler, problems: Sequence[Any],
                    prompt_ids: Sequence[Sequence[int]], run_many: Callable, rng: jax.Array,
                    prefixes: Optional[Sequence[str]] = None,
                    monitor_hacks: bool = True, first_row: int = 0) -> Rollouts:
  """Samples `sampler.config.num_samples` responses per problem and runs their tests.

  Args:
    params: CausalLM params.
    sampler: a `psgpo_jax.sampling.Sampler` (with a tokenizer, for texts).
    problems: P problems (`.program(completion)`, `.tests`).
    prompt_ids: P prompt token lists (`encode(tokenizer, problem.prompt)`).
    run_many: `(jobs) -> results`, e.g. a `psgpo_jax.sandbox.Sandbox`'s `run_many`.
    rng: PRNG key; the responses are a deterministic function of it.
    prefixes: None, or P partial responses (texts) to continue: each sample then
      completes its prefix, and the program tested is `problem.program(prefix + text)`.
    monitor_hacks: compute the reward-hack flags (`hack_flags`; label probes skip them).
    first_row: these rows' offset in a larger batch (`Sampler.generate`): a process's
      share of a multi-process batch draws what one process would.
  Returns:
    Rollouts with P * num_samples rows; `texts` and `response_ids` are the sampled
    continuations (without the prefix).
  """
  start = time.time()
  tokenizer = sampler.tokenizer
  prefix_ids = (None if prefixes is None else
                [encode(tokenizer, text) if text else None for text in prefixes])
  out = sampler.generate(params, prompt_ids, rng, prefix_ids, first_row)
  sampled = time.time()
  index = np.asarray(out.prompt_index)
  lead = [""] * len(problems) if prefixes is None else list(prefixes)
  jobs = [(problems[i].program(lead[i] + text), problems[i].tests)
          for i, text in zip(index, out.texts)]
  results = run_many(jobs)
  hack_flags = ([hack_report(program, result, tests)
                 for (program, tests), result in zip(jobs, results)] if monitor_hacks else [])
  return Rollouts(
      problem_index=index,
      prompt_ids=[list(prompt_ids[i]) for i in index],
      response_ids=[out.tokens[r, :out.lengths[r]].tolist() for r in range(len(index))],
      logprobs=[out.logprobs[r, :out.lengths[r]] for r in range(len(index))],
      texts=list(out.texts), finish_reason=list(out.finish_reason), results=list(results),
      hack_flags=hack_flags,
      seconds={"sample": sampled - start, "test": time.time() - sampled})
