"""The PSGPO pipeline: stages sft -> baseline -> collect -> prm -> rl -> eval.

Each stage writes into `<workdir>/<stage>/` and finishes by writing `result.json`; a stage
whose `result.json` exists is skipped, so re-running a command continues a run. The
summary of all stages (seconds and key metrics) goes to `<workdir>/summary.json`.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict

import ml_collections

from psgpo_jax import multihost, run_setup, stages
from psgpo_jax.configuration import stage_list, validate_config
from psgpo_jax.jsonio import write_json

STAGE_FNS = stages.STAGE_FNS


def use_compilation_cache(directory: str, min_compile_seconds: float = 1.0) -> None:
  """Keeps XLA's compiled programs in `directory` ("" = off), so that a later run with the
  same shapes (a rerun, a resumed run, the ablation's arms) loads them instead of
  compiling again; programs that compile in under `min_compile_seconds` are not kept."""
  if not directory:
    return
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)


class RunContext:
  """What the stages share, built lazily once: tokenizer, problems, models, sandbox, and
  the device mesh (`config.mesh`) with its sharding rules, which SFT, PRM and RL train on.

  Stages hand models to each other through Hugging Face checkpoint directories in the
  run directory (`sft/policy`, `prm/model`, `rl/policy`), so any stage can run alone.
  """

  def __init__(self, config: ml_collections.ConfigDict):
    from psgpo_jax.data.prompts import resolve_stop_strings  # pylint: disable=import-outside-toplevel
    # The problems' source (a tfds set's: read once here); "auto" stop strings are its own.
    self.problem_source = run_setup.problem_source(config)
    resolve_stop_strings(config, self.problem_source)
    use_compilation_cache(config.compilation_cache)
    self.config = config
    self.workdir = os.path.abspath(config.workdir)
    self.results: Dict[str, Dict[str, Any]] = {}
    self._cache: Dict[str, Any] = {}

  def stage_dir(self, name: str) -> str:
    path = os.path.join(self.workdir, name)
    os.makedirs(path, exist_ok=True)
    return path

  def _once(self, key: str, build: Callable[[], Any]) -> Any:
    if key not in self._cache:
      self._cache[key] = build()
    return self._cache[key]

  @property
  def tokenizer(self):
    return self._once("tokenizer", lambda: run_setup.load_run_tokenizer(
        self.config, self.workdir, self.problem_source))

  @property
  def problems(self) -> Dict[str, list]:
    """{"train": [...], "eval": [...]} problems."""
    return self._once("problems",
                      lambda: run_setup.load_run_problems(self.config, self.tokenizer))

  @property
  def model_cfg(self):
    return self._once("model_cfg", lambda: run_setup.run_model_config(self.config, self.tokenizer))

  @property
  def mesh(self):
    """The device mesh of `config.mesh` (after `jax.distributed.initialize()` when
    `mesh.distributed` is set), built once and shared by every stage."""
    def build():
      from psgpo_jax import multihost, sharding  # pylint: disable=import-outside-toplevel
      multihost.initialize_distributed(self.config.mesh)
      return sharding.mesh_from_config(self.config.mesh)
    return self._once("mesh", build)

  @property
  def rules(self) -> Dict[str, Any]:
    """The logical-axis rules: the defaults with `config.mesh.rules` overrides, if any."""
    def build():
      from psgpo_jax import sharding  # pylint: disable=import-outside-toplevel
      return sharding.rules_from_config(self.config.mesh)
    return self._once("rules", build)

  @property
  def sandbox(self):
    return self._once("sandbox", lambda: run_setup.make_sandbox(self.config))

  def close(self) -> None:
    if "sandbox" in self._cache:
      self._cache.pop("sandbox").close()


def result_path(workdir: str, stage: str) -> str:
  """The file a stage writes last: it exists once the stage has finished."""
  return os.path.join(workdir, stage, "result.json")


def stages_done(workdir: str, stages) -> bool:
  """Whether every stage of `stages` has finished in `workdir`."""
  return all(os.path.exists(result_path(workdir, s)) for s in stages)


def _write_json(path: str, value: Any) -> None:
  """`jsonio.write_json` on process 0 (every process holds the same results); keys keep
  their order (stages in run order)."""
  if multihost.is_main_process():
    write_json(path, value)


def run(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """Validates `config`, runs its stages in order, writes and prints the summary."""
  validate_config(config)
  multihost.initialize_distributed(config.mesh)   # before anything touches the backend
  ctx = RunContext(config)
  os.makedirs(ctx.workdir, exist_ok=True)
  if multihost.is_main_process():
    with open(os.path.join(ctx.workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
  summary: Dict[str, Any] = {}
  try:
    _run_stages(config, ctx, summary)
  finally:
    ctx.close()
  _write_json(os.path.join(ctx.workdir, "summary.json"), summary)
  print(format_summary(summary))
  return summary


def _run_stages(config: ml_collections.ConfigDict, ctx: RunContext,
                summary: Dict[str, Any]) -> None:
  for name in stage_list(config):
    if name not in STAGE_FNS:
      raise NotImplementedError(f"Stage '{name}' is not available in this version; "
                                f"available: {sorted(STAGE_FNS)}.")
    path = result_path(ctx.workdir, name)
    multihost.barrier(f"stage_{name}")     # every process decides on the same files
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        ctx.results[name] = json.load(f)
      print(f"[{name}] output exists in {os.path.dirname(path)}: skipped")
    else:
      print(f"[{name}] running")
      start = time.time()
      result = STAGE_FNS[name](config, ctx)
      result["seconds"] = round(time.time() - start, 1)
      ctx.stage_dir(name)
      _write_json(path, result)
      ctx.results[name] = result
    summary[name] = ctx.results[name]


def format_summary(summary: Dict[str, Any]) -> str:
  """A plain-text table: one row per stage, its seconds and scalar metrics."""
  lines = ["stage      seconds  metrics"]
  for name, result in summary.items():
    scalars = {k: v for k, v in result.items()
               if k != "seconds" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in sorted(scalars.items()))
    lines.append(f"{name:<10} {result.get('seconds', 0):>7}  {shown}")
  return "\n".join(lines)
