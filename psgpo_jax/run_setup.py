"""What a run is built from: its tokenizer, problems, model config and sandbox.

`pipeline.RunContext` builds each once, lazily, from the config; the stages read them
from the context.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

import ml_collections

from psgpo_jax.configuration import ConfigError, model_config


def problem_source(config: ml_collections.ConfigDict) -> str:
  """The source whose conventions the run follows (stop strings, SFT corpus, oracle,
  tokenizer): `data.source`, or for `tfds` the one source of the set's problems."""
  if config.data.source != "tfds":
    return config.data.source
  from psgpo_jax.data import tfds_builders  # pylint: disable=import-outside-toplevel
  sources = tfds_builders.set_sources(config.data.train_path, config.data.tfds_name)
  if len(sources) != 1:
    raise ConfigError(f"The tfds set {config.data.tfds_name!r} mixes the sources {sources}: "
                      "set sampling.stop_strings and tokenizer.path explicitly, or write one "
                      "set per source.")
  return sources[0]


def load_run_tokenizer(config: ml_collections.ConfigDict, workdir: str, source: str = ""):
  """The configured tokenizer, or the synthetic suite's BPE (built once in workdir) when
  the problems' `source` (default: `problem_source(config)`) is synthetic."""
  from psgpo_jax.tokenization import load_tokenizer  # pylint: disable=import-outside-toplevel
  path = config.tokenizer.path or config.model.path
  if not path:
    if (source or problem_source(config)) != "synthetic":
      raise ConfigError("Set tokenizer.path (or model.path) to a local tokenizer directory: "
                        "only the synthetic suite builds its own tokenizer.")
    from psgpo_jax.data import synthetic_corpus  # pylint: disable=import-outside-toplevel
    path = synthetic_corpus.build_tokenizer(os.path.join(workdir, "tokenizer"), seed=config.seed,
                                            vocab_size=config.tokenizer.vocab_size)
  return load_tokenizer(path)


def load_run_problems(config: ml_collections.ConfigDict, tokenizer=None) -> Dict[str, list]:
  """{"train", "eval"} problems of the configured source, in `data.prompt_format`.

  With a tokenizer, prompts longer than `data.max_prompt_tokens` tokens are dropped
  (counted in the log); the chat format needs it (its chat template).
  """
  splits = _load_splits(config)
  if tokenizer is None:
    if config.data.get("prompt_format", "plain") != "plain":
      raise ConfigError("data.prompt_format=chat needs the run's tokenizer (its chat "
                        "template): pass tokenizer= to load_run_problems.")
    return splits
  from psgpo_jax.data import prompts  # pylint: disable=import-outside-toplevel
  out = {}
  for name, split in splits.items():
    split = prompts.format_problems(split, tokenizer, config.data.prompt_format)
    out[name] = drop_long_prompts(split, tokenizer, config.data.max_prompt_tokens, name)
  return out


def drop_long_prompts(problems: List[Any], tokenizer, max_tokens: int, name: str) -> List[Any]:
  """The problems whose prompt has at most `max_tokens` tokens; prints how many were not."""
  from psgpo_jax.rollout import encode  # pylint: disable=import-outside-toplevel
  kept = [p for p in problems if len(encode(tokenizer, p.prompt)) <= max_tokens]
  if len(kept) < len(problems):
    print(f"[data] {name}: dropped {len(problems) - len(kept)} of {len(problems)} problems "
          f"whose prompt is longer than data.max_prompt_tokens={max_tokens} tokens")
  return kept


def _load_splits(config: ml_collections.ConfigDict) -> Dict[str, list]:
  """{"train", "eval"} problems of the configured source, as loaded."""
  from psgpo_jax.data import problems as problems_lib  # pylint: disable=import-outside-toplevel
  from psgpo_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  from psgpo_jax.data import record  # pylint: disable=import-outside-toplevel
  data = config.data
  if data.source == "synthetic":
    horizons = range(data.min_horizon, data.max_horizon + 1)
    return {"train": synthetic.make_split(config.seed, data.num_train, horizons, "train"),
            "eval": synthetic.make_split(config.seed + 1, data.num_eval, horizons, "test")}
  if data.source == "tfds":     # random-access array_record files, no TensorFlow
    from psgpo_jax.data import tfds_builders  # pylint: disable=import-outside-toplevel
    train = list(tfds_builders.read_problems(data.train_path, data.tfds_name, "train"))
    if data.tfds_eval_split:
      return {"train": train, "eval": list(tfds_builders.read_problems(
          data.train_path, data.tfds_name, data.tfds_eval_split))}
    train, held_out = record.split_by_hash(train, data.eval_fraction, salt=str(config.seed))
    return {"train": train, "eval": held_out}
  kwargs = {"on_bad_row": data.on_bad_row}
  train = problems_lib.load_problems(data.source, data.train_path or None, **kwargs)
  if data.eval_path:
    return {"train": train,
            "eval": problems_lib.load_problems(data.source, data.eval_path, **kwargs)}
  train, held_out = record.split_by_hash(train, data.eval_fraction, salt=str(config.seed))
  return {"train": train, "eval": held_out}


def write_tfds_set(config: ml_collections.ConfigDict, data_dir: str, name: str,
                   overwrite: bool = False) -> str:
  """Writes `config`'s train and eval problems, as loaded (prompts are formatted when a
  run reads them), as the TFDS set `name` for `data.source=tfds`; returns its directory."""
  from psgpo_jax.data import tfds_builders  # pylint: disable=import-outside-toplevel
  return tfds_builders.write_problems(data_dir, name, _load_splits(config), overwrite=overwrite)


def run_model_config(config: ml_collections.ConfigDict, tokenizer):
  """The policy's ModelConfig: from model.path's config.json, or the config's fields.

  With model.path, config.json gives the architecture and the config's execution-only
  fields (`ModelConfig.EXECUTION_FIELDS`: remat, attention blocking) still apply.
  """
  if config.model.path:
    from psgpo_jax.models.hf_config import load_hf_config  # pylint: disable=import-outside-toplevel
    return load_hf_config(config.model.path).with_execution_fields(config.model)
  cfg = model_config(config.model, vocab_size=len(tokenizer))
  return cfg.replace(eos_token_id=int(tokenizer.eos_token_id))


def make_sandbox(config: ml_collections.ConfigDict):
  """A warm sandbox pool with the configured limits."""
  from psgpo_jax.sandbox import Limits, Sandbox  # pylint: disable=import-outside-toplevel
  limits = Limits(timeout_s=config.sandbox.timeout_s, cpu_s=config.sandbox.timeout_s,
                  memory_mb=config.sandbox.memory_mb)
  return Sandbox(num_workers=config.sandbox.num_workers or None, limits=limits,
                 cache_size=config.sandbox.cache_size)
