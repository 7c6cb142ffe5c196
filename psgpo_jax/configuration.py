"""Checks on pipeline configs: unknown override fields and malformed values.

`ml_collections` already rejects ill-typed overrides (`--config.rl.steps=abc`). This
module adds what it lacks: a clear message for a field that does not exist (with the
closest known names), and value checks (choices, ranges) that name every bad field.
"""
from __future__ import annotations

import difflib
from typing import Iterable, List, Sequence

import ml_collections

CHOICES = {
    "model.architecture": ("qwen2", "llama"),
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "data.source": ("synthetic", "humaneval", "mbpp", "livecodebench", "apps", "tfds"),
    "data.on_bad_row": ("skip", "error"),
    "data.prompt_format": ("plain", "chat"),
    "collect.selection": ("revised", "failed", "all"),
    "collect.labeler": ("search", "oracle"),
    "prm.loss": ("mse", "bce"),
    "rl.value_init": ("prm", "policy", "random"),
    "rl.advantage": ("gae", "rloo", "grpo", "reinforce"),
    "rl.dense_source": ("prm", "oracle"),
    "rl.reward.outcome": ("binary", "fraction"),
    "rl.reward.credit": ("sum", "min", "first_error"),
    "rl.reward.shaping": ("none", "potential", "progress"),
    "rl.reward.kl_estimator": ("k1", "k3"),
    "eval.split": ("heldout", "train", "all"),
}
STAGES = ("sft", "baseline", "collect", "prm", "rl", "eval")
POSITIVE = ("sft.batch_size", "prm.batch_size", "rl.prompts_per_step", "rl.samples_per_prompt",
            "rl.ppo_epochs", "rl.num_minibatches", "collect.completions",
            "collect.responses_per_prompt", "sampling.max_new_tokens", "eval.num_samples",
            "sandbox.timeout_s", "data.max_horizon", "data.min_horizon")
NON_NEGATIVE = ("sft.steps", "baseline.steps", "prm.steps", "rl.steps", "sampling.temperature",
                "rl.reward.kl_coef", "rl.ent_coef", "sampling.top_k", "sandbox.num_workers")
UNIT_INTERVAL = ("sampling.top_p", "rl.lam", "rl.gamma", "data.eval_fraction",
                 "prm.eval_fraction", "sft.noise")


class ConfigError(ValueError):
  """A config field is unknown or has a bad value; the message names it."""


def _get(config: ml_collections.ConfigDict, path: str):
  node = config
  for part in path.split("."):
    node = node[part]
  return node


def field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> List[str]:
  """Every leaf field of a config as a dotted path, e.g. 'rl.reward.kl_coef'."""
  paths = []
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      paths.extend(field_paths(value, path + "."))
    else:
      paths.append(path)
  return paths


def check_override_flags(config: ml_collections.ConfigDict, argv: Sequence[str],
                         flag: str = "config") -> None:
  """Raises ConfigError for a `--config.<path>=...` flag whose path is not a field.

  Args:
    config: the config the flags will override.
    argv: command-line arguments (e.g. sys.argv).
    flag: the config flag's name.
  """
  known = field_paths(config)
  known_set = set(known) | {p.rsplit(".", i)[0] for p in known for i in range(1, p.count(".") + 1)}
  for arg in argv:
    if not arg.startswith(f"--{flag}."):
      continue
    path = arg[len(flag) + 3:].split("=", 1)[0]
    if path not in known_set:
      close = difflib.get_close_matches(path, known, n=3, cutoff=0.5)
      hint = f" Did you mean {', '.join(close)}?" if close else ""
      raise ConfigError(
          f"Unknown config field '{path}' (from {arg!r}).{hint} "
          f"Top-level fields: {', '.join(sorted(config.keys()))}.")


def _problems(config: ml_collections.ConfigDict) -> Iterable[str]:
  for path, choices in CHOICES.items():
    value = _get(config, path)
    if value not in choices:
      yield f"{path}={value!r}: choose one of {choices}"
  for path in POSITIVE:
    if not _get(config, path) > 0:
      yield f"{path}={_get(config, path)!r}: must be > 0"
  for path in NON_NEGATIVE:
    if _get(config, path) < 0:
      yield f"{path}={_get(config, path)!r}: must be >= 0"
  for path in UNIT_INTERVAL:
    if not 0.0 <= _get(config, path) <= 1.0:
      yield f"{path}={_get(config, path)!r}: must be within [0, 1]"
  unknown = [s for s in stage_list(config) if s not in STAGES]
  if unknown:
    yield f"stages={config.stages!r}: unknown stage(s) {unknown}; stages are {STAGES}"
  if config.data.min_horizon > config.data.max_horizon:
    yield (f"data.min_horizon={config.data.min_horizon} > data.max_horizon="
           f"{config.data.max_horizon}")
  rollouts = config.rl.prompts_per_step * config.rl.samples_per_prompt
  if rollouts % config.rl.num_minibatches:
    yield (f"rl.prompts_per_step * rl.samples_per_prompt = {rollouts} is not divisible by "
           f"rl.num_minibatches={config.rl.num_minibatches}")
  from psgpo_jax.evaluation import parse_ks  # pylint: disable=import-outside-toplevel
  try:
    parse_ks(config.eval.ks, config.eval.num_samples)
  except ValueError as exc:
    yield str(exc)
  shape = tuple(config.mesh.shape)
  if len(shape) != 3 or list(shape).count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    yield f"mesh.shape={shape}: three sizes (data, fsdp, tensor), at most one -1"
  if config.data.source == "tfds":
    if not config.data.train_path or not config.data.tfds_name:
      yield ("data.source='tfds' needs data.train_path (the TFDS data_dir) and "
             "data.tfds_name (the set's name; write one with experiments/prepare_tfds.py)")
  elif config.data.source != "synthetic" and not config.data.train_path and \
      config.data.source != "humaneval":
    yield f"data.source={config.data.source!r} needs data.train_path (a local file)"


def stage_list(config: ml_collections.ConfigDict) -> List[str]:
  """The stages to run, in order: 'sft,prm' -> ['sft', 'prm']."""
  return [s.strip() for s in str(config.stages).split(",") if s.strip()]


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Returns `config` unchanged, or raises ConfigError listing every bad field."""
  problems = list(_problems(config))
  if problems:
    raise ConfigError("Invalid config:\n  " + "\n  ".join(problems))
  return config


def model_config(model_section: ml_collections.ConfigDict, vocab_size: int = 0):
  """The `ModelConfig` of a config's `model` section (for random init).

  `vocab_size=0` and `head_dim=0` in the section mean "from the tokenizer" and
  "hidden_size // heads"; `path` is not a model field (a checkpoint dir is read by
  `load_hf_checkpoint` instead).
  """
  from psgpo_jax.models.config import ModelConfig  # pylint: disable=import-outside-toplevel
  values = {k: v for k, v in model_section.items() if k != "path"}
  if not values.get("vocab_size"):
    if not vocab_size:
      raise ConfigError("model.vocab_size=0 means 'from the tokenizer', but no tokenizer "
                        "vocabulary size was given.")
    values["vocab_size"] = vocab_size
  values["head_dim"] = values.get("head_dim") or None
  try:
    return ModelConfig.from_dict(values)
  except ValueError as e:
    raise ConfigError(str(e)) from e
