"""The RL trainer's settings as one typed, frozen record (`TrainerConfig`).

A stage builds it once from the pipeline config (`TrainerConfig.from_config`); the trainer
reads nothing else. It holds the learner step's record (`learn.LearnerConfig`), the
rollout sampler's (`SamplingConfig`), and the loop's own settings: steps, prompts and
samples per step, seeds, evaluation, logging and checkpoint cadence.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict

import ml_collections

from psgpo_jax.models.config import ModelConfig
from psgpo_jax.rl import learn
from psgpo_jax.sampling_config import SamplingConfig, from_pipeline_config

DENSE_SOURCES = ("prm", "oracle")


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
  """What an RL run does, besides its models and problems.

  Attributes:
    learner: the learner step (scoring, rewards, advantages, PPO, KL).
    sampling: the rollout sampler (`num_samples` = samples per prompt).
    steps: RL iterations to run.
    prompts_per_step: prompts sampled per iteration (over all processes).
    prompts_per_row: 0 (a row per sample) or the prompts per row of prompt groups.
    seed: the RL stage's seed (rollouts, problem order, value head).
    dense_reward: dense line rewards on; `dense_source` says from what (prm | oracle).
    value_init: how the value model starts (prm | policy | random).
    eval_every: held-out evaluation every this many steps (0 = only at the end).
    max_nonfinite_steps: stop after this many skipped updates in a row.
    log_every: steps between logged metric rows (evaluations and the last always).
    checkpoint_every, max_to_keep: checkpoint cadence and how many are kept.
    snapshot_every: keep the policy every this many steps (0 = never; baseline stage).
  """
  learner: learn.LearnerConfig
  sampling: SamplingConfig
  steps: int
  prompts_per_step: int
  prompts_per_row: int = 0
  seed: int = 0
  dense_reward: bool = True
  dense_source: str = "prm"
  value_init: str = "prm"
  eval_every: int = 0
  max_nonfinite_steps: int = 3
  log_every: int = 1
  checkpoint_every: int = 1
  max_to_keep: int = 1
  snapshot_every: int = 0

  def __post_init__(self):
    if self.dense_source not in DENSE_SOURCES:
      raise ValueError(f"rl.dense_source={self.dense_source!r}; choose one of "
                       f"{DENSE_SOURCES}.")
    if self.prompts_per_row < 0 or (self.prompts_per_row
                                    and self.prompts_per_step % self.prompts_per_row):
      raise ValueError(f"rl.prompts_per_row={self.prompts_per_row} must divide "
                       f"rl.prompts_per_step={self.prompts_per_step} (0 turns it off).")

  @property
  def samples_per_prompt(self) -> int:
    return self.learner.group_size

  @property
  def prm_dense(self) -> bool:
    """Dense rewards from the PRM (which the run then needs)."""
    return self.dense_reward and self.dense_source == "prm"

  @property
  def oracle_dense(self) -> bool:
    """Dense rewards from the synthetic suite's first-error oracle."""
    return self.dense_reward and self.dense_source == "oracle"

  def to_json(self) -> Dict[str, Any]:
    """The record as plain JSON values (kept in each checkpoint's metadata)."""
    return _plain(dataclasses.asdict(self))

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, model: ModelConfig, tokenizer: Any,
                  *, steps: int, dense_reward: bool, value_init: str,
                  snapshot_every: int = 0) -> "TrainerConfig":
    """The record of a pipeline config's `rl` section (and the sampling, logging and
    checkpoint fields an RL run reads). `steps`, `dense_reward` and `value_init` are the
    stage's: the baseline stage trains with its own."""
    rl = config.rl
    dense_source = str(rl.dense_source)
    return cls(
        learner=learn.LearnerConfig.from_config(
            config, model, prm_dense=dense_reward and dense_source == "prm"),
        sampling=from_pipeline_config(config, tokenizer, int(rl.samples_per_prompt)),
        steps=int(steps), prompts_per_step=int(rl.prompts_per_step),
        prompts_per_row=int(rl.prompts_per_row),
        seed=int(rl.seed) if rl.seed >= 0 else int(config.seed),
        dense_reward=bool(dense_reward), dense_source=dense_source,
        value_init=str(value_init), eval_every=int(rl.eval_every),
        max_nonfinite_steps=int(rl.max_nonfinite_steps),
        log_every=max(1, int(config.logging.every_steps)),
        checkpoint_every=int(config.checkpoint.every_steps),
        max_to_keep=int(config.checkpoint.max_to_keep), snapshot_every=int(snapshot_every))


def _plain(value: Any) -> Any:
  """JSON-able copy of nested dataclass dicts (tuples as lists, other objects as str)."""
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, (bool, int, float, str)) or value is None:
    return value
  return str(value)
