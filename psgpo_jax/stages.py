"""The pipeline's stages (what a run is built from is in `run_setup.py`).

Each stage function takes `(config, ctx)` (a `pipeline.RunContext`), does its work in
`ctx.stage_dir(name)` and returns a dict of JSON-able results for `summary.json`.
Models pass between stages as Hugging Face checkpoint directories:
`sft/policy` (CausalLM), `prm/model` (ScalarModel), `rl/policy` (CausalLM).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import ml_collections

from psgpo_jax import evaluation, multihost, plots
from psgpo_jax.sampling_config import from_pipeline_config
from psgpo_jax.jsonio import write_json
from psgpo_jax.logging import MetricWriter

STAGE_FNS: Dict[str, Callable[..., Dict[str, Any]]] = {}


def stage(name: str):
  """Registers a stage function under `name`."""
  def register(fn):
    STAGE_FNS[name] = fn
    return fn
  return register


# ----------------------------------------------------------------------------- shared inputs


def save_model(path: str, cfg, params, kind: str = "causal_lm") -> str:
  """Saves `params` as a Hugging Face checkpoint; on several processes process 0 writes
  and the others wait for it (every process must call this)."""
  from psgpo_jax.models import save_hf_checkpoint  # pylint: disable=import-outside-toplevel
  params = jax.device_get(params)
  if multihost.is_main_process():
    save_hf_checkpoint(path, cfg, params, model=kind)
  multihost.barrier(f"save_model:{path}")
  return path


def load_model(path: str, kind: str = "causal_lm"):
  from psgpo_jax.models import load_hf_checkpoint  # pylint: disable=import-outside-toplevel
  return load_hf_checkpoint(path, model=kind)[1]


def initial_policy(ctx) -> Any:
  """model.path's weights, or a seeded random init of the configured architecture."""
  if ctx.config.model.path:
    return load_model(ctx.config.model.path)
  from psgpo_jax.models import CausalLM, init_params  # pylint: disable=import-outside-toplevel
  return init_params(CausalLM(ctx.model_cfg), jax.random.PRNGKey(ctx.config.seed))


def _policy_dir(ctx, stage_name: str) -> str:
  return os.path.join(ctx.workdir, stage_name, "policy")


def sft_policy(ctx) -> Any:
  """The SFT stage's policy, or the initial one when no SFT was run."""
  path = _policy_dir(ctx, "sft")
  return load_model(path) if os.path.isdir(path) else initial_policy(ctx)


def _require(path: str, what: str, stage_name: str) -> str:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{what} not found at {path}: run the '{stage_name}' stage first "
                            f"(add it to --config.stages).")
  return path


# ----------------------------------------------------------------------------- evaluation


def evaluate_in_run(ctx, params, problems: List[Any], num_samples: int, temperature: float,
                    seed: int, greedy: bool = False, show_progress: bool = True,
                    ks: Optional[Sequence[int]] = None,
                    response_scorer: Optional[Callable] = None) -> Dict[str, Any]:
  """`evaluation.evaluate_policy` with the run's model, tokenizer, sandbox, config and
  mesh (rows split over the sampling mesh's batch axes); `ks` None = `eval.ks`."""
  sampling = from_pipeline_config(ctx.config, ctx.tokenizer, num_samples,
                                  temperature=temperature, greedy=greedy)
  return evaluation.evaluate_policy(multihost.local_copy(params, ctx.mesh), ctx.model_cfg,
                                    ctx.tokenizer, problems, ctx.sandbox, sampling, seed,
                                    show_progress=show_progress,
                                    mesh=multihost.sampling_mesh(ctx.mesh), rules=ctx.rules,
                                    ks=ks if ks is not None else evaluation.parse_ks(
                                        ctx.config.eval.ks, num_samples),
                                    response_scorer=response_scorer,
                                    shard=(jax.process_index(), jax.process_count()),
                                    gather=multihost.allgather_json)


def _greedy_pass_rate(ctx, params, problems, seed: int) -> float:
  out = evaluate_in_run(ctx, params, problems, 1, 1.0, seed, greedy=True, show_progress=False,
                        ks=(1,))
  return out["summary"]["all"].get("pass@1", 0.0)


# ----------------------------------------------------------------------------- stages


def _resumable_stage(ctx, name: str):
  """(checkpoint dir, metrics writer) of a stage whose loop resumes from its checkpoints:
  the writer keeps the rows of the steps before the one it resumes at."""
  from psgpo_jax.checkpointing import resume_step  # pylint: disable=import-outside-toplevel
  checkpoints = os.path.join(ctx.stage_dir(name), "checkpoints")
  return checkpoints, MetricWriter(ctx.stage_dir(name), keep_before=resume_step(checkpoints))


@stage("sft")
def run_sft(config: ml_collections.ConfigDict, ctx) -> Dict[str, Any]:
  """Supervised warm-up on reference solutions (noised on the synthetic suite)."""
  from psgpo_jax.rollout import encode  # pylint: disable=import-outside-toplevel
  from psgpo_jax.sft import train_sft  # pylint: disable=import-outside-toplevel
  train = ctx.problems["train"]
  if ctx.problem_source == "synthetic":
    from psgpo_jax.data import synthetic_corpus  # pylint: disable=import-outside-toplevel
    pairs = synthetic_corpus.sft_corpus(train, noise=config.sft.noise, seed=config.seed)
  else:
    pairs = [(p.prompt, p.reference) for p in train if p.reference]
    if not pairs:
      raise ValueError(f"No training problem of {config.data.source} has a reference "
                       "solution to fine-tune on; drop 'sft' from --config.stages.")
  eos = ctx.tokenizer.eos_token_id
  token_pairs = [(encode(ctx.tokenizer, p), encode(ctx.tokenizer, r) + [eos]) for p, r in pairs]
  checkpoints, writer = _resumable_stage(ctx, "sft")
  with writer:
    params, metrics = train_sft(
        initial_policy(ctx), ctx.model_cfg, token_pairs, steps=config.sft.steps,
        batch_size=config.sft.batch_size, learning_rate=config.sft.learning_rate,
        pad_id=ctx.tokenizer.pad_token_id, seed=config.seed,
        warmup_steps=config.sft.warmup_steps, weight_decay=config.sft.weight_decay,
        group_size=max(1, config.sft.length_grouping),
        schedule=config.sft.schedule, packed_rows=config.sft.packed_rows,
        checkpoint_dir=checkpoints, checkpoint_every=config.sft.checkpoint_every,
        log_every=config.logging.every_steps,
        writer=writer, show_progress=config.logging.progress, mesh=ctx.mesh,
        rules=ctx.rules)
  save_model(_policy_dir(ctx, "sft"), ctx.model_cfg, params)
  greedy = _greedy_pass_rate(ctx, params, ctx.problems["eval"], config.seed)
  return {"loss": metrics["loss"], "token_accuracy": metrics["token_accuracy"],
          "eval_greedy_pass@1": greedy, "pairs": len(token_pairs)}


def _rl_setup(ctx, evaluate: bool):
  from psgpo_jax.rl.trainer import RLSetup  # pylint: disable=import-outside-toplevel
  eval_problems = ctx.problems["eval"]
  if ctx.config.eval.num_problems:
    eval_problems = eval_problems[:ctx.config.eval.num_problems]

  def evaluate_fn(params, step):
    """Held-out greedy pass@1, and sampled pass@1 from rl.eval_samples per problem."""
    out = {"greedy_pass@1": _greedy_pass_rate(ctx, params, eval_problems, ctx.config.seed)}
    samples = int(ctx.config.rl.eval_samples)
    if samples:
      sampled = evaluate_in_run(ctx, params, eval_problems, samples,
                                ctx.config.eval.temperature, ctx.config.seed + 17,
                                show_progress=False, ks=(1,))
      out["pass@1"] = sampled["summary"]["all"].get("pass@1", 0.0)
    return out

  line_oracle = None
  if ctx.problem_source == "synthetic":
    from psgpo_jax.data import synthetic_oracle  # pylint: disable=import-outside-toplevel
    line_oracle = synthetic_oracle.oracle_line_labels
  return RLSetup(ctx.model_cfg, ctx.tokenizer, ctx.problems["train"], eval_problems,
                 ctx.sandbox, evaluate_fn if evaluate else None, line_oracle)


def _run_trainer(config, ctx, name: str, prm_params, steps: int, dense_reward: bool,
                 value_init: str, snapshot_every: int = 0) -> Dict[str, Any]:
  from psgpo_jax.rl.trainer import RLTrainer  # pylint: disable=import-outside-toplevel
  from psgpo_jax.rl.trainer_config import TrainerConfig  # pylint: disable=import-outside-toplevel
  workdir = ctx.stage_dir(name)
  trainer_cfg = TrainerConfig.from_config(config, ctx.model_cfg, ctx.tokenizer, steps=steps,
                                          dense_reward=dense_reward, value_init=value_init,
                                          snapshot_every=snapshot_every)
  trainer = RLTrainer(trainer_cfg, _rl_setup(ctx, evaluate=True), workdir, sft_policy(ctx),
                      prm_params, mesh=ctx.mesh, rules=ctx.rules)
  try:
    start = trainer.maybe_restore()
    # Steps from `start` on are redone; a fresh run (start 0) logs its initial eval at -1.
    with MetricWriter(workdir, keep_before=start if start else -1) as writer:
      result = trainer.run(writer, show_progress=config.logging.progress)
    save_model(_policy_dir(ctx, name), ctx.model_cfg, trainer.policy_params)
    if trainer.value_params is not None:
      save_model(os.path.join(workdir, "value"), ctx.model_cfg, trainer.value_params, "scalar")
  finally:
    trainer.close()
  if multihost.is_main_process():
    _plot_training(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "training.png"))
  return result


@stage("baseline")
def run_baseline(config: ml_collections.ConfigDict, ctx) -> Dict[str, Any]:
  """PPO without a PRM; its evenly spaced snapshots sample the responses to label."""
  steps = config.baseline.steps
  if steps == 0:
    return {"skipped": "baseline.steps=0: responses are labeled with the SFT policy"}
  every = max(1, steps // max(1, config.baseline.num_checkpoints))
  return _run_trainer(config, ctx, "baseline", None, steps, dense_reward=False,
                      value_init="policy", snapshot_every=every)


def labeling_policies(ctx) -> List[Any]:
  """The policies whose responses are labeled: baseline snapshots, else the SFT policy."""
  snapshots = os.path.join(ctx.workdir, "baseline", "snapshots")
  if os.path.isdir(snapshots):
    paths = sorted(os.path.join(snapshots, d) for d in os.listdir(snapshots))
    if paths:
      return [load_model(p) for p in paths]
  return [sft_policy(ctx)]


@stage("collect")
def run_collect(config: ml_collections.ConfigDict, ctx) -> Dict[str, Any]:
  """PRM labels by binary search over line prefixes (K completions per probed prefix).

  With several labeling policies (baseline snapshots), the prompts are split evenly
  between them; the completer is the policy that wrote the response. On several
  processes each labels its share of the batches (`prm.collect.run_collection`) on its
  own devices and sandbox, into the shared stage directory.
  """
  from psgpo_jax.prm.collect import collect_labels  # pylint: disable=import-outside-toplevel
  from psgpo_jax.prm.labeler import LabelingConfig  # pylint: disable=import-outside-toplevel
  from psgpo_jax.prm.select import label_counts  # pylint: disable=import-outside-toplevel
  from psgpo_jax.sampling_config import from_pipeline_config  # pylint: disable=import-outside-toplevel
  labeling = LabelingConfig.from_config(config)
  sampling = from_pipeline_config(config, ctx.tokenizer, labeling.responses_per_prompt)
  out_dir = ctx.stage_dir("collect")
  policies = labeling_policies(ctx)
  problems = ctx.problems["train"][:config.collect.num_prompts]
  share = -(-len(problems) // len(policies))
  stats: Dict[str, Any] = {}
  with MetricWriter(out_dir) as writer:
    for i, params in enumerate(policies):
      part_dir = out_dir if len(policies) == 1 else os.path.join(out_dir, f"policy_{i}")
      part = problems[i * share:(i + 1) * share]
      stats = collect_labels(
          params, ctx.model_cfg, ctx.tokenizer, part, labeling, sampling, part_dir,
          jax.random.PRNGKey(config.seed + 1000 + i), run_many_fn=ctx.sandbox.run_many,
          writer=writer, agreement_ks=_agreement_ks(config) if i == 0 else (),
          mesh=multihost.sampling_mesh(ctx.mesh),
          metrics_prefix="collect/" if len(policies) == 1 else f"collect/policy_{i}/")
  rows = run_labels(ctx)
  counts = label_counts(rows)
  result = {k: v for k, v in stats.items() if isinstance(v, (int, float, str))}
  result.update({f"selected_{k}": v for k, v in counts.items()})
  return result


def _agreement_ks(config) -> tuple:
  k = int(config.collect.completions)
  return tuple(sorted({1, 2, 4, k} & set(range(1, k + 1))))


def run_labels(ctx, selected_only: bool = True) -> List[Dict[str, Any]]:
  """Labeled rows of every labeling policy (only the selected ones by default)."""
  from psgpo_jax.prm import shards  # pylint: disable=import-outside-toplevel
  out_dir = os.path.join(ctx.workdir, "collect")
  dirs = sorted(os.path.join(out_dir, d) for d in os.listdir(out_dir)
                if d.startswith("policy_")) or [out_dir]
  return [row for d in dirs for row in shards.load_labels(d, selected_only)]


@stage("prm")
def run_prm(config: ml_collections.ConfigDict, ctx) -> Dict[str, Any]:
  """Trains the PRM (ScalarModel from the SFT backbone) on the collected line labels."""
  from psgpo_jax.prm import train as prm_train  # pylint: disable=import-outside-toplevel
  rows = run_labels(ctx)
  if not rows:
    raise ValueError("The collect stage selected no labeled responses (see "
                     "collect/collect_stats.json): a PRM needs failed responses with a "
                     "recoverable prefix. Collect from more prompts, or set "
                     "collect.selection=failed|all.")
  out_dir = ctx.stage_dir("prm")
  max_len = config.data.max_prompt_tokens + config.sampling.max_new_tokens + 1
  checkpoints, writer = _resumable_stage(ctx, "prm")
  with writer:
    params, metrics = prm_train.train_prm(
        sft_policy(ctx), ctx.model_cfg, ctx.tokenizer, rows,
        prm_train.PRMTrainConfig.from_config(config, max_len=max_len), out_dir,
        ctx.tokenizer.pad_token_id, seed=config.seed, mesh=ctx.mesh, rules=ctx.rules,
        writer=writer, show_progress=config.logging.progress, checkpoint_dir=checkpoints,
        checkpoint_every=config.prm.checkpoint_every,
        all_rows=run_labels(ctx, selected_only=False))
  save_model(os.path.join(out_dir, "model"), ctx.model_cfg, params, "scalar")
  return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def load_prm(ctx) -> Optional[Any]:
  path = os.path.join(ctx.workdir, "prm", "model")
  return load_model(path, "scalar") if os.path.isdir(path) else None


@stage("rl")
def run_rl(config: ml_collections.ConfigDict, ctx) -> Dict[str, Any]:
  """PSGPO: PPO from the SFT policy with PRM dense rewards and/or PRM value init."""
  from psgpo_jax.rl.advantages import rl_models  # pylint: disable=import-outside-toplevel
  prm_params = load_prm(ctx)
  if "prm" in rl_models(config.rl) and prm_params is None:
    _require(os.path.join(ctx.workdir, "prm", "model"), "The PRM", "prm")
  return _run_trainer(config, ctx, "rl", prm_params, config.rl.steps,
                      dense_reward=config.rl.dense_reward, value_init=config.rl.value_init)


@stage("eval")
def run_eval(config: ml_collections.ConfigDict, ctx) -> Dict[str, Any]:
  """pass@k, Best-of-K (the oracle's pick, and with a PRM its pick) and pass@1 by horizon
  of the policy before and after RL."""
  from psgpo_jax.prm.scoring import response_scores  # pylint: disable=import-outside-toplevel
  out_dir = ctx.stage_dir("eval")
  main = multihost.is_main_process()    # every process samples its share; process 0 writes
  problems = ctx.problems["eval"]
  if config.eval.num_problems:
    problems = problems[:config.eval.num_problems]
  policies = {"before": sft_policy(ctx)}
  for name in ("rl", "baseline"):
    if os.path.isdir(_policy_dir(ctx, name)):
      policies["after" if name == "rl" else "baseline"] = load_model(_policy_dir(ctx, name))
      if name == "rl":
        break
  report: Dict[str, Any] = {}
  samples: Dict[str, Any] = {}
  prm = load_prm(ctx)
  scorer = None if prm is None else functools.partial(   # Best-of-K by the PRM's pick
      response_scores, prm, ctx.model_cfg, ctx.tokenizer, loss=config.prm.loss)
  for label, params in policies.items():
    out = evaluate_in_run(ctx, params, problems, config.eval.num_samples,
                          config.eval.temperature, config.seed + 17,
                          show_progress=config.logging.progress, response_scorer=scorer)
    samples[label] = out.pop("samples")
    if main:
      evaluation.write_samples_jsonl(os.path.join(out_dir, f"samples_{label}.jsonl"),
                                     samples[label])
    out["greedy_pass@1"] = _greedy_pass_rate(ctx, params, problems, config.seed)
    report[label] = out
  if main:
    _write_eval_outputs(out_dir, report, with_prm=prm is not None)
  result: Dict[str, Any] = {}
  for label, out in report.items():
    for key, value in out["summary"]["all"].items():
      if key.startswith("pass@"):
        result[f"{label}.{key}"] = value
    result[f"{label}.greedy_pass@1"] = out["greedy_pass@1"]
    if "best_of_k_scored" in out:     # the PRM's pick among the most samples
      k, share = max(out["best_of_k_scored"].items())
      result[f"{label}.prm_best_of_{k}"] = share
  if "after" in samples:      # RL's gain on the same problems, with a paired standard error
    gain = evaluation.paired_pass_gain(samples["before"], samples["after"])
    result["gain.pass@1"], result["gain.pass@1_se"] = gain["gain"], gain["se"]
  return result


def _write_eval_outputs(out_dir: str, report: Dict[str, Any], with_prm: bool) -> None:
  """report.json, and the Best-of-K (oracle and PRM picks) and pass-by-horizon plots."""
  write_json(os.path.join(out_dir, "report.json"), report)
  curves = {f"{k} (oracle pick)" if with_prm else k: v["best_of_k"] for k, v in report.items()}
  curves.update({f"{k} (PRM pick)": v["best_of_k_scored"] for k, v in report.items()
                 if "best_of_k_scored" in v})
  plots.plot_best_of_k(curves, os.path.join(out_dir, "best_of_k.png"))
  plots.plot_pass_by_length({k: v["by_horizon"] for k, v in report.items()},
                                 os.path.join(out_dir, "pass_by_horizon.png"),
                                 xlabel="horizon (solution lines)", title="pass@1 by horizon")


def _plot_training(metrics_path: str, out_path: str) -> Optional[str]:
  """training.png of an RL stage from its metrics.jsonl (None when there is none)."""
  if not os.path.exists(metrics_path):
    return None
  from psgpo_jax.logging import read_metrics  # pylint: disable=import-outside-toplevel
  return plots.plot_training(list(read_metrics(metrics_path)), out_path)
