"""Problems: the Problem record, loaders, TFDS storage and the synthetic suite.

  from psgpo_jax.data import load_problems
  train = load_problems("synthetic", split="train", seed=0, num_problems=512)
  he = load_problems("humaneval")
"""
from psgpo_jax.data.problems import (load_apps, load_humaneval, load_livecodebench, load_mbpp,
                                     load_problems)
from psgpo_jax.data.record import Problem, problem_from_json, problem_to_json
from psgpo_jax.data.rows import BadRow, BadRowsError

__all__ = [
    "BadRow", "BadRowsError", "Problem", "load_apps", "load_humaneval", "load_livecodebench",
    "load_mbpp", "load_problems", "problem_from_json", "problem_to_json",
]
