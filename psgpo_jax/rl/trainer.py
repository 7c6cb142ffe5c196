"""The PSGPO loop: rollout -> sandbox -> PRM scores -> rewards -> GAE -> one PPO update.

Per step: `prompts_per_step` training problems (a deterministic, per-epoch shuffled
order) are sampled `samples_per_prompt` times by the policy, the responses are tested in
the sandbox, and ONE jitted, sharded device call (`rl.learn`) scores them (reference
log-probs, values, PRM line scores), computes token rewards and advantages, runs every PPO
epoch and minibatch for policy and value, and updates the KL coefficient. Everything needed
to continue bit-for-bit (policy, value, reference and PRM params, optimizer states, KL
controller, step, config) is checkpointed every `checkpoint_every` steps and at the end; a
run restarted in the same workdir resumes from the last complete checkpoint. The trainer
reads its settings from one typed record, `rl.trainer_config.TrainerConfig`, which the
stage builds from the pipeline config.

The trainer also serves the paper's "no PRM" arm and the `baseline` stage:
`dense_reward=False` uses no PRM rewards, `value_init="policy"` starts the value model
from the policy's backbone. The learner's estimator picks GAE (with the value model) or a
critic-free one (RLOO / GRPO, `rl.advantages`: no value model is built or trained);
`dense_source = "oracle"` takes the dense line rewards from the synthetic suite's
exact first-error oracle instead of the PRM (the upper bound of the method). Each step
logs its phases' seconds (`time/sample_s`, `sandbox`, `pack`, `learn`) and the sandbox's
hack monitors (`rollout/hack_flags`).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from psgpo_jax import batching, checkpointing, multihost, sharding
from psgpo_jax.logging import MetricWriter, progress
from psgpo_jax.models import ModelConfig
from psgpo_jax.rl import learn
from psgpo_jax.rl.batch import prompt_group_rows, rollout_batch
from psgpo_jax.rl.trainer_config import TrainerConfig
from psgpo_jax.rl.value_init import init_value_params
from psgpo_jax.rollout import Rollouts, encode, sample_and_test
from psgpo_jax.sampling import Sampler
from psgpo_jax.sandbox import HACK_KINDS, any_hack

Array = jax.Array


class TrainingDiverged(RuntimeError):
  """Too many consecutive updates had non-finite losses or gradients."""


@dataclasses.dataclass
class RLSetup:
  """What the RL loop runs on (built by the pipeline)."""
  model_cfg: ModelConfig
  tokenizer: Any
  train_problems: Sequence[Any]
  eval_problems: Sequence[Any]
  sandbox: Any
  evaluate: Optional[Callable[[Any, int], Dict[str, float]]] = None   # (params, step) -> metrics
  # (problem, lines) -> the exact +-1 / 0 label of each line
  # (`synthetic_oracle.oracle_line_labels`), for `rl.dense_source = "oracle"`; None where
  # the problems have no oracle.
  line_oracle: Optional[Callable[[Any, Sequence[str]], Sequence[int]]] = None


def problem_order(num_problems: int, step: int, per_step: int, seed: int) -> np.ndarray:
  """Problem indices for `step`: epochs of seeded permutations, read `per_step` at a time."""
  start = step * per_step
  epoch, offset = divmod(start, num_problems)
  out: List[int] = []
  while len(out) < per_step:
    perm = np.random.default_rng([seed, epoch]).permutation(num_problems)
    out.extend(perm[offset:offset + per_step - len(out)].tolist())
    epoch, offset = epoch + 1, 0
  return np.asarray(out)


def local_problem_order(num_problems: int, step: int, per_step: int, seed: int,
                        process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """This process's share of `problem_order(...)`: a contiguous block of the step's prompts.

  Process p of n takes prompts [p * per_step / n, (p + 1) * per_step / n) of the step, so
  the processes' shares, concatenated in process order, are the step's prompts (the rows
  of the global batch, as `multihost.global_batch_from_local` assembles it). With one
  process this is `problem_order` itself.

  Raises:
    ValueError: `per_step` is not divisible by `process_count`.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
  if per_step % process_count:
    raise ValueError(f"rl.prompts_per_step={per_step} cannot be split evenly over "
                     f"{process_count} processes; make it a multiple of {process_count}.")
  share = per_step // process_count
  order = problem_order(num_problems, step, per_step, seed)
  return order[process_index * share:(process_index + 1) * share]


def hack_monitors(rollouts: Rollouts) -> Dict[str, float]:
  """Share of this step's responses flagged by each hack monitor, and by any of them."""
  flags = rollouts.hack_flags
  out = {"rollout/hack_flags": float(np.mean([any_hack(f) for f in flags])) if flags else 0.0}
  for kind in HACK_KINDS:
    out[f"rollout/hack_flags/{kind}"] = (float(np.mean([bool(f.get(kind)) for f in flags]))
                                         if flags else 0.0)
  return out


class RLTrainer:
  """Runs `steps` PSGPO iterations, logging, evaluating and checkpointing as it goes.

  With a `mesh`, every model (policy, value, reference, PRM) and optimizer state lives
  sharded as the rules say, the learner step (`rl.learn`) runs as one sharded jit, and the
  sampler splits prompts over the `data` axis. With several processes (multi-host), each
  one samples and tests its share of the step's prompts (`local_problem_order`) on its own
  devices, and the global batch is assembled with `multihost.global_batch_from_local`.
  """

  def __init__(self, config: TrainerConfig, setup: RLSetup, workdir: str,
               policy_params: Any, prm_params: Optional[Any], *,
               mesh: Optional[Mesh] = None, rules: Optional[Mapping[str, Any]] = None):
    self.config, self.setup, self.workdir = config, setup, workdir
    self.mesh, self.rules = mesh, rules
    cfg = setup.model_cfg
    if config.prm_dense and prm_params is None:
      raise ValueError("rl.dense_reward=True needs a trained PRM: run the 'prm' stage first "
                       "or set rl.dense_reward=False (or rl.dense_source=oracle).")
    if config.oracle_dense and setup.line_oracle is None:
      raise ValueError("rl.dense_source='oracle' needs problems with a first-error oracle "
                       "(data.source=synthetic); use rl.dense_source=prm.")
    self.learner_cfg = config.learner
    self.reward_cfg, self.ppo_cfg = self.learner_cfg.reward, self.learner_cfg.ppo
    per_step, samples = config.prompts_per_step, config.samples_per_prompt
    rows = per_step * samples
    self.ppo_cfg.minibatch_size(rows)
    # Rows of prompt groups: the update's rows are then prompts_per_step / prompts_per_row.
    if config.prompts_per_row:
      self.ppo_cfg.minibatch_size(per_step // config.prompts_per_row)
    self.process_index, self.process_count = jax.process_index(), jax.process_count()
    local_problem_order(len(setup.train_problems), 0, per_step, config.seed,
                        self.process_index, self.process_count)     # fails early if uneven
    if mesh is not None:
      sharding.check_batch_rows(
          rows, mesh, rules, "rl.prompts_per_step * rl.samples_per_prompt",
          "rl.prompts_per_step or rl.samples_per_prompt")
      if config.prompts_per_row:
        sharding.check_batch_rows(per_step // config.prompts_per_row, mesh, rules,
                                  "rl.prompts_per_step / rl.prompts_per_row",
                                  "rl.prompts_per_step or rl.prompts_per_row")
    self.critic = self.learner_cfg.critic      # RLOO / GRPO train no value model
    self.learner = learn.make_learner(self.learner_cfg, mesh, rules)
    rng = jax.random.PRNGKey(config.seed)
    value_params = (init_value_params(config.value_init, cfg, policy_params, prm_params,
                                      jax.random.fold_in(rng, 1), self.reward_cfg,
                                      self.learner_cfg.prm_loss) if self.critic else None)
    self.state = learn.init_state(self.learner_cfg, self.learner.optimizers, policy_params,
                                  value_params, prm_params, jax.random.fold_in(rng, 2))
    if mesh is not None:
      self.state = jax.device_put(self.state, self.learner.state_shardings)
    self.sampler = Sampler(cfg, config.sampling, setup.tokenizer,
                           mesh=multihost.sampling_mesh(self.mesh), rules=rules)
    self.prompt_ids = [encode(setup.tokenizer, p.prompt) for p in setup.train_problems]
    new_tokens = config.sampling.max_new_tokens
    self.buckets = batching.default_buckets(max(map(len, self.prompt_ids)) + new_tokens + 1)
    # Group rows are long and their length varies little: multiples of 64 slots.
    longest_group_row = max(1, config.prompts_per_row) * (
        max(map(len, self.prompt_ids)) + samples * new_tokens)
    self.group_buckets = tuple(range(64, longest_group_row + 64, 64))
    self.checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.max_to_keep)
    self.history: List[Dict[str, float]] = []
    self.start_step = 0

  # ------------------------------------------------------------------------ batches

  def _buckets(self, buckets: Sequence[int], longest: int) -> Sequence[int]:
    """Row-length buckets; on many processes, only those that fit every process's
    `longest` row, so that every process packs its rows to the same length."""
    if self.process_count == 1:
      return buckets
    longest = multihost.max_over_processes(longest)
    return tuple(b for b in buckets if b >= longest)

  def _group_rows(self, rollouts: Rollouts, tokens: np.ndarray) -> Dict[str, np.ndarray]:
    """This process's rows as rows of prompt groups (`rl.batch.prompt_group_rows`)."""
    return prompt_group_rows(rollouts, tokens, self.config.samples_per_prompt,
                             self.config.prompts_per_row, self.group_buckets, self.process_index,
                             self._buckets if self.process_count > 1 else None)

  def _device_batch(self, host: Dict[str, np.ndarray]) -> Dict[str, Array]:
    """This process's rows as the step's global batch (split by rows over the mesh)."""
    if self.mesh is None:
      return {k: jnp.asarray(v) for k, v in host.items()}
    return multihost.global_batch_from_local(host, self.mesh, self.rules)

  # ------------------------------------------------------------------------ resume

  def maybe_restore(self) -> int:
    """Continues from the latest complete checkpoint in workdir; returns the next step."""
    step = self.checkpointer.latest_step()
    if step is None:
      return 0
    target = checkpointing.abstract_target(self.state)
    self.state, meta = self.checkpointer.restore(step, target=target)
    self.history = list(meta.get("history", []))
    self.start_step = int(meta["next_step"])
    print(f"[rl] resumed from the checkpoint of step {step} in {self.checkpointer.directory}")
    return self.start_step

  def _save(self, next_step: int, force: bool = False) -> None:
    meta = {"next_step": next_step, "data_position": next_step * self.config.prompts_per_step,
            "history": self.history, "config": self.config.to_json()}
    self.checkpointer.save(next_step, self.state, meta, force=force)

  # ------------------------------------------------------------------------ one step

  def step_indices(self, step: int) -> np.ndarray:
    """Indices (into `setup.train_problems`) of this process's share of the step's
    problems (all of them on one process)."""
    return local_problem_order(len(self.setup.train_problems), step,
                               self.config.prompts_per_step, self.config.seed,
                               self.process_index, self.process_count)

  def step_problems(self, step: int) -> List[Any]:
    """This process's share of the step's problems (all of them on one process)."""
    return [self.setup.train_problems[i] for i in self.step_indices(step)]

  def rollout(self, step: int) -> Rollouts:
    """Samples and tests this process's share of the step's responses (all of them on one
    process) with the current policy; `problem_index` indexes `step_problems(step)`."""
    index = self.step_indices(step)
    problems = [self.setup.train_problems[i] for i in index]
    prompt_ids = [self.prompt_ids[i] for i in index]
    # This process's copy of the (replicated) key: the sampler runs on local devices. Its
    # rows are keyed as its share of the step's rows, so it draws what one process would.
    key = jax.random.fold_in(multihost.local_copy(self.state["rng"], self.mesh), step)
    params = multihost.local_copy(self.state["ppo"]["policy"].params, self.mesh)
    first_row = self.process_index * len(index) * self.config.samples_per_prompt
    return sample_and_test(params, self.sampler, problems, prompt_ids,
                           self.setup.sandbox.run_many, key, first_row=first_row)

  def iteration(self, step: int) -> Dict[str, float]:
    """One PSGPO iteration; returns its metrics (host floats)."""
    t0 = time.time()
    rollouts = self.rollout(step)
    t1 = time.time()
    labeler = None
    if self.config.oracle_dense:
      problems = self.step_problems(step)
      labeler = lambda row, lines: self.setup.line_oracle(                # noqa: E731
          problems[rollouts.problem_index[row]], lines)
    longest = max(len(p) + len(r) for p, r in zip(rollouts.prompt_ids, rollouts.response_ids))
    host = rollout_batch(rollouts, self.setup.tokenizer, self.setup.tokenizer.pad_token_id,
                         self._buckets(self.buckets, longest), labeler)
    if self.config.prompts_per_row:
      host.update(self._group_rows(rollouts, host["tokens"]))
    batch = self._device_batch(host)
    t_pack = time.time()
    key = jax.random.fold_in(jax.random.fold_in(self.state["rng"], step), 1)
    self.state, metrics = self.learner.step(self.state, batch, key)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    t_learn = time.time()
    metrics.update({"time/rollout_s": t1 - t0, "time/step_s": time.time() - t0,
                    "time/sample_s": rollouts.seconds.get("sample", 0.0),
                    "time/sandbox_s": rollouts.seconds.get("test", 0.0),
                    "time/pack_s": t_pack - t1, "time/learn_s": t_learn - t_pack,
                    "rollout/finished_by_eos": float(np.mean(
                        [r == "eos" for r in rollouts.finish_reason])),
                    "rollout/timeouts": float(np.mean(
                        [r.status == "timeout" for r in rollouts.results])),
                    **hack_monitors(rollouts)})
    return metrics

  # ------------------------------------------------------------------------ the loop

  def run(self, writer: Optional[MetricWriter] = None, show_progress: bool = True
          ) -> Dict[str, Any]:
    """Trains from the current (possibly restored) step to `steps`; returns a summary."""
    config = self.config
    nonfinite_in_a_row = 0
    step = self.start_step
    bar = progress(range(self.start_step, config.steps), desc="rl", enabled=show_progress,
                   initial=self.start_step, total=config.steps)
    if self.setup.evaluate is not None and config.eval_every and self.start_step == 0:
      # The learning curve's first point: the initial policy, logged as step -1 (no update).
      initial = {"eval/updates": 0.0, **{f"eval/{k}": v for k, v in self.setup.evaluate(
          self.state["ppo"]["policy"].params, 0).items()}}
      self.history.append({"step": -1, **initial})
      if writer is not None:
        writer.write(-1, initial)
    for step in bar:
      metrics = self.iteration(step)
      nonfinite_in_a_row = nonfinite_in_a_row + 1 if metrics["ppo/nonfinite"] > 0 else 0
      if nonfinite_in_a_row >= config.max_nonfinite_steps:
        raise TrainingDiverged(
            f"{nonfinite_in_a_row} consecutive PPO updates had non-finite losses or gradients "
            f"(last at step {step}); those updates were skipped and no checkpoint was written "
            f"after them. Lower rl.policy_lr / rl.value_lr or raise rl.grad_clip's strictness, "
            f"then re-run: training resumes from the last good checkpoint.")
      if self.setup.evaluate is not None and config.eval_every and (
          (step + 1) % config.eval_every == 0 or step + 1 == config.steps):
        metrics["eval/updates"] = float(step + 1)
        metrics.update({f"eval/{k}": v for k, v in self.setup.evaluate(
            self.state["ppo"]["policy"].params, step + 1).items()})
      self.history.append({"step": step, **metrics})
      if writer is not None and (step % config.log_every == 0
                                 or "eval/updates" in metrics or step + 1 == config.steps):
        writer.write(step, metrics)
      bar.set_postfix(pass_rate=f"{metrics['reward/pass_rate']:.2f}",
                      kl=f"{metrics['reward/kl']:.3f}")
      if config.snapshot_every and (step + 1) % config.snapshot_every == 0:
        self._save_snapshot(step + 1)
      last_update_skipped = nonfinite_in_a_row > 0
      if not last_update_skipped and ((step + 1) % config.checkpoint_every == 0
                                      or step + 1 == config.steps):
        self._save(step + 1)
    self.checkpointer.wait()
    return self.summary()

  def _save_snapshot(self, step: int) -> None:
    """Keeps the policy of `step` (the baseline stage's labeling policies); process 0
    writes it, the others wait."""
    from psgpo_jax.models import save_hf_checkpoint  # pylint: disable=import-outside-toplevel
    params = jax.device_get(self.state["ppo"]["policy"].params)
    if multihost.is_main_process():
      save_hf_checkpoint(os.path.join(self.workdir, "snapshots", f"step_{step:06d}"),
                         self.setup.model_cfg, params)
    multihost.barrier(f"snapshot:{step}")

  def summary(self) -> Dict[str, Any]:
    """Averages of the last steps' key metrics."""
    steps = [h for h in self.history if h["step"] >= 0]
    tail = steps[-max(1, len(steps) // 4):] if steps else []
    keys = ("reward/pass_rate", "reward/kl", "reward/lines_per_response",
            "reward/trivial_line_share", "reward/prm_score_mean", "reward/dense_reward_mean")
    out = {"steps": self.config.steps}
    for k in keys:
      values = [h[k] for h in tail if k in h]
      if values:
        out[f"final_{k.split('/')[-1]}"] = float(np.mean(values))
    return out

  def close(self) -> None:
    self.checkpointer.close()

  @property
  def policy_params(self) -> Any:
    return self.state["ppo"]["policy"].params

  @property
  def value_params(self) -> Optional[Any]:
    """The value model's params; None for critic-free advantages (RLOO / GRPO)."""
    return self.state["ppo"]["value"].params if self.critic else None
