"""What the benchmarks share: the 25M-parameter Qwen2 config and the matmul peak."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from psgpo_jax.models import ModelConfig

# The tiny Qwen2 architecture the benchmarks measure (about 25M parameters).
MODEL_25M = ModelConfig(architecture="qwen2", vocab_size=4096, hidden_size=512,
                        intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True,
                        max_position_embeddings=1024, initializer_range=0.02)


def matmul_flops_per_s(size: int = 1024, repeats: int = 20) -> float:
  """FLOP/s of a jitted float32 [size, size] @ [size, size] matmul (best of repeats).

  The machine's practical peak, against which model FLOP/s are reported.
  """
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
  f = jax.jit(jnp.matmul)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best


def best_of(fn, repeats: int) -> float:
  """Best wall time in seconds of `fn()` over `repeats` runs (after the caller's warm-up)."""
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best
