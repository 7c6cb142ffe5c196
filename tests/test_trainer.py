"""The RL trainer: data order, rollout packing, resume bit-for-bit, non-finite handling."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from experiments.common import load_config
from psgpo_jax import pipeline, sharding, stages
from psgpo_jax.models import CausalLM, ScalarModel, logical_axes
from psgpo_jax.prm import train as prm_train
from psgpo_jax.rl import trainer as trainer_lib
from psgpo_jax.rl.trainer_config import TrainerConfig
from psgpo_jax.rl.batch import rollout_batch
from psgpo_jax.rollout import Rollouts
from psgpo_jax.sandbox import Result
from oracle_rows import oracle_rows
from tolerances import ADAM_EPS, adam_param_atol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_problem_order_is_deterministic_and_covers_every_problem_each_epoch():
  steps = [trainer_lib.problem_order(10, s, 5, seed=3) for s in range(4)]
  assert sorted(np.concatenate(steps[:2]).tolist()) == list(range(10))
  assert sorted(np.concatenate(steps[2:]).tolist()) == list(range(10))
  np.testing.assert_array_equal(steps[1], trainer_lib.problem_order(10, 1, 5, seed=3))
  assert not np.array_equal(np.concatenate(steps[:2]), np.concatenate(steps[2:]))
  # A step may straddle two epochs: the end of one permutation, then the next one's start.
  straddle = trainer_lib.problem_order(10, 1, 7, seed=0)
  epoch0, epoch1 = (np.random.default_rng([0, e]).permutation(10) for e in (0, 1))
  np.testing.assert_array_equal(straddle, np.concatenate([epoch0[7:], epoch1[:4]]))


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
  config = load_config(os.path.join(ROOT, "configs", "quickstart.py:tiny"))
  config.workdir = str(tmp_path_factory.mktemp("run"))
  config.rl.adam_eps = ADAM_EPS      # bounds rounding's effect on params (tests/tolerances.py)
  context = pipeline.RunContext(config)
  yield context
  context.close()


def test_rollout_batch_marks_line_ends_on_newline_tokens(ctx):
  tok = ctx.tokenizer
  problem = ctx.problems["train"][0]
  prompt = tok.encode(problem.prompt, add_special_tokens=False)
  text = problem.reference + "    # done\n"
  response = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
  rollouts = Rollouts(np.array([0]), [prompt], [response], [np.zeros(len(response))], [text],
                      ["eos"], [Result(True, "passed", 6, 6)])
  batch = rollout_batch(rollouts, tok, tok.pad_token_id, (256,))
  ends = np.flatnonzero(batch["line_end_mask"][0])
  assert len(ends) == text.count("\n")
  assert all("\n" in tok.decode([batch["tokens"][0, e]]) for e in ends)
  assert np.all(batch["response_mask"][0, ends] == 1)
  trivial = np.flatnonzero(batch["trivial_line_mask"][0])
  assert trivial.tolist() == [ends[-1]]               # the comment-only line
  assert batch["passed"][0] == 1.0
  assert batch["hacked"][0] == 0.0 and "prm_scores" not in batch

  # Oracle dense rewards: the synthetic oracle's label of each line at its end token.
  from psgpo_jax.data import synthetic_oracle
  lines = text.split("\n")
  lines[1] = "    " + lines[1].strip().split("=")[0] + "= 12345"        # a wrong line 2
  wrong = "\n".join(lines)
  wrong_ids = tok.encode(wrong, add_special_tokens=False) + [tok.eos_token_id]
  rollouts = Rollouts(np.array([0]), [prompt], [wrong_ids], [np.zeros(len(wrong_ids))],
                      [wrong], ["eos"], [Result(False, "failed", 0, 6)])
  batch = rollout_batch(
      rollouts, tok, tok.pad_token_id, (256,),
      lambda row, row_lines: synthetic_oracle.oracle_line_labels(problem, row_lines))
  ends = np.flatnonzero(batch["line_end_mask"][0])
  want = synthetic_oracle.oracle_line_labels(problem, wrong.split("\n")[:-1])
  assert want[:2] == [1, -1] and want[-1] == 0          # right, wrong, ..., the comment
  np.testing.assert_array_equal(batch["prm_scores"][0, ends], want)
  assert np.count_nonzero(batch["prm_scores"][0]) == np.count_nonzero(want)


@pytest.fixture(scope="module")
def trained_prm(ctx, tmp_path_factory):
  """(params, held-out metrics) of a PRM trained on the oracle's labels of corrupted
  training references: the PRM every trainer test here runs with, so that its dense
  rewards and value initialisation carry a learned signal, not a random head's."""
  config = prm_train.PRMTrainConfig(steps=60, batch_size=8, learning_rate=2e-3, max_len=256,
                                    eval_fraction=0.25, warmup_steps=5)
  return prm_train.train_prm(stages.initial_policy(ctx), ctx.model_cfg, ctx.tokenizer,
                             oracle_rows(ctx.problems["train"], 3), config,
                             str(tmp_path_factory.mktemp("prm")),
                             pad_id=ctx.tokenizer.pad_token_id, show_progress=False)


def test_the_trainer_reads_the_trained_prm_at_line_ends_as_prm_evaluation_does(ctx,
                                                                               trained_prm):
  """The PRM the trainer tests run with learned the oracle's labels (held out: better than
  line position and than its untrained self), and the trainer's scorer reads it exactly
  where and as the PRM's own evaluation does: at each line's end token, on held-out
  corrupted responses."""
  from psgpo_jax.prm import metrics as prm_metrics  # pylint: disable=import-outside-toplevel
  from psgpo_jax.rl import learn  # pylint: disable=import-outside-toplevel
  params, metrics = trained_prm
  assert metrics["auroc"] > metrics["position/auroc"], metrics
  assert metrics["auroc"] > metrics["init/auroc"] + 0.1, metrics
  tok, rows = ctx.tokenizer, oracle_rows(ctx.problems["eval"], 4, seed=1)
  prompts = [tok.encode(r["prompt"], add_special_tokens=False) for r in rows]
  responses = [tok.encode(r["response"], add_special_tokens=False) + [tok.eos_token_id]
               for r in rows]
  rollouts = Rollouts(np.arange(len(rows)), prompts, responses,
                      [np.zeros(len(r)) for r in responses], [r["response"] for r in rows],
                      ["eos"] * len(rows), [Result(False, "failed", 0, 1)] * len(rows))
  batch = rollout_batch(rollouts, tok, tok.pad_token_id, (256,))
  score = learn.make_score(ctx.model_cfg, 1.0, with_prm=True, with_value=False,
                           with_policy=False)
  out = jax.device_get(score({"ref": stages.initial_policy(ctx), "prm": params},
                             {k: jnp.asarray(v) for k, v in batch.items()}))
  want = prm_metrics.line_scores(params, ctx.model_cfg, tok, rows, max_len=256, batch_size=8,
                                 pad_id=tok.pad_token_id)
  for i, row in enumerate(rows):
    ends = np.flatnonzero(batch["line_end_mask"][i])
    assert len(ends) == len(row["line_labels"]) == len(want[i])
    np.testing.assert_allclose(out["prm_scores"][i, ends], want[i], rtol=1e-5, atol=1e-5)
    assert np.count_nonzero(out["prm_scores"][i]) <= len(ends)      # nothing between lines


def test_trainer_config_reads_the_rl_section_once_and_checks_it(ctx):
  """The stage's ConfigDict becomes one typed record; the trainer reads nothing else."""
  import json  # pylint: disable=import-outside-toplevel
  config = ctx.config.copy_and_resolve_references()
  config.rl.seed, config.seed, config.logging.every_steps = -1, 7, 0
  record = TrainerConfig.from_config(config, ctx.model_cfg, ctx.tokenizer, steps=5,
                                     dense_reward=True, value_init="policy")
  assert (record.steps, record.seed, record.log_every, record.value_init) == (5, 7, 1, "policy")
  assert record.samples_per_prompt == record.sampling.num_samples == config.rl.samples_per_prompt
  assert record.prm_dense and record.learner.prm_dense
  assert record.checkpoint_every == config.checkpoint.every_steps
  assert json.loads(json.dumps(record.to_json(), allow_nan=False))["learner"]["group_size"] == (
      config.rl.samples_per_prompt)
  config.rl.dense_source = "oracle"
  oracle = TrainerConfig.from_config(config, ctx.model_cfg, ctx.tokenizer, steps=5,
                                     dense_reward=True, value_init="policy")
  assert not oracle.prm_dense and not oracle.learner.prm_dense
  with pytest.raises(ValueError, match="rl.dense_source='x'"):
    dataclasses.replace(record, dense_source="x")
  with pytest.raises(ValueError, match="must divide rl.prompts_per_step"):
    dataclasses.replace(record, prompts_per_step=4, prompts_per_row=3)


def _trainer(ctx, workdir, steps, prm, value_params_nan=False, mesh=None, config=None,
             snapshot_every=0):
  config = config or ctx.config
  cfg = ctx.model_cfg
  policy = stages.initial_policy(ctx)
  setup = trainer_lib.RLSetup(cfg, ctx.tokenizer, ctx.problems["train"], ctx.problems["eval"],
                              ctx.sandbox)
  trainer_cfg = TrainerConfig.from_config(config, cfg, ctx.tokenizer, steps=steps,
                                          dense_reward=True, value_init="prm",
                                          snapshot_every=snapshot_every)
  t = trainer_lib.RLTrainer(trainer_cfg, setup, str(workdir), policy, prm, mesh=mesh)
  if value_params_nan:
    value = t.state["ppo"]["value"]
    t.state["ppo"]["value"] = value.replace(
        params=jax.tree_util.tree_map(lambda x: x * jnp.nan, value.params))
  return t


@pytest.fixture(scope="module")
def one_device_run(ctx, trained_prm, tmp_path_factory):
  """Two uninterrupted steps on one device, keeping the policy after each step."""
  full = _trainer(ctx, tmp_path_factory.mktemp("full"), steps=2, prm=trained_prm[0],
                  snapshot_every=1)
  full.run(show_progress=False)
  full.close()
  return full


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(ctx, trained_prm,
                                                                  one_device_run,
                                                                  tmp_path):
  full = one_device_run
  first = _trainer(ctx, tmp_path / "resumed", 1, trained_prm[0])        # "killed" after step 1
  first.run(show_progress=False)
  first.close()
  resumed = _trainer(ctx, tmp_path / "resumed", 2, trained_prm[0])
  assert resumed.maybe_restore() == 1
  resumed.run(show_progress=False)
  resumed.close()
  assert len(resumed.history) == 2
  # Resumed on the same machine: the same computations in the same order, so equal (the
  # slack is for nothing but a float printed and parsed on the way).
  for key, value in full.history[1].items():
    if not key.startswith("time/"):
      assert resumed.history[1][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
  for a, b in zip(jax.tree_util.tree_leaves(full.policy_params),
                  jax.tree_util.tree_leaves(resumed.policy_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sampler_log_probs_and_the_adaptive_kl_in_the_learner_step(ctx, trained_prm,
                                                                   one_device_run,
                                                                   tmp_path):
  """rl.old_logprobs=sampler (what `auto` picks in float32, as in `one_device_run`) skips
  the policy forward: on the same rollouts it takes the step a recomputed run takes, up to
  float rounding; the KL controller lives in the learner state and the one jitted step
  moves it as Ziegler et al.'s rule says."""
  from psgpo_jax.rl import kl, learn
  assert one_device_run.learner_cfg.old_logprobs == "sampler"
  bf16 = dataclasses.replace(ctx.model_cfg, dtype="bfloat16")
  assert learn.resolve_old_logprobs("auto", bf16) == "recompute"
  config = ctx.config.copy_and_resolve_references()
  config.rl.old_logprobs = "recompute"
  config.rl.reward.adaptive_kl = True
  config.rl.reward.kl_target = 1e-3
  config.rl.reward.kl_horizon = 100
  t = _trainer(ctx, tmp_path, 1, trained_prm[0], config=config)
  t.run(show_progress=False)
  t.close()
  got, want = t.history[0], one_device_run.history[0]
  for key in ("reward/pass_rate", "reward/response_length", "reward/outcome_reward_mean",
              "ppo/policy_loss", "ppo/value_loss", "ppo/approx_kl", "ppo/ratio_mean",
              "ppo/explained_variance"):
    assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-5), key
  assert abs(got["reward/kl"]) < 1e-5        # the policy is the reference at step 0
  assert got["reward/kl_coef"] == pytest.approx(config.rl.reward.kl_coef)
  rows = config.rl.prompts_per_step * config.rl.samples_per_prompt
  expected = kl.update_kl_coef(config.rl.reward.kl_coef, got["reward/kl"], rows, 1e-3, 100)
  assert isinstance(t.state["kl"], kl.AdaptiveKLController)
  assert float(t.state["kl"].value) == pytest.approx(float(expected), rel=1e-5)
  assert float(t.state["kl"].value) < config.rl.reward.kl_coef     # KL below target: down


def test_non_finite_updates_are_skipped_then_training_stops(ctx, trained_prm, tmp_path):
  config = ctx.config
  config.rl.max_nonfinite_steps = 2
  t = _trainer(ctx, tmp_path / "nan", 2, trained_prm[0], value_params_nan=True)
  before = jax.tree_util.tree_map(np.asarray, t.policy_params)
  with pytest.raises(trainer_lib.TrainingDiverged, match="2 consecutive PPO updates"):
    t.run(show_progress=False)
  t.close()
  for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(t.policy_params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert t.checkpointer.latest_step() is None        # nothing NaN was written
  config.rl.max_nonfinite_steps = 3


def test_local_problem_order_splits_each_step_between_processes():
  for step in range(3):
    whole = trainer_lib.problem_order(10, step, 4, seed=1)
    np.testing.assert_array_equal(trainer_lib.local_problem_order(10, step, 4, 1), whole)
    shares = [trainer_lib.local_problem_order(10, step, 4, 1, p, 2) for p in range(2)]
    assert [len(x) for x in shares] == [2, 2]
    np.testing.assert_array_equal(np.concatenate(shares), whole)      # process order = rows
    quarters = [trainer_lib.local_problem_order(10, step, 4, 1, p, 4) for p in range(4)]
    np.testing.assert_array_equal(np.concatenate(quarters), whole)
  with pytest.raises(ValueError, match="rl.prompts_per_step=4 cannot be split evenly over 3"):
    trainer_lib.local_problem_order(10, 0, 4, 1, 0, 3)
  with pytest.raises(ValueError, match="process_index=2"):
    trainer_lib.local_problem_order(10, 0, 4, 1, 2, 2)


def test_trainer_rejects_a_batch_the_mesh_cannot_split(ctx, trained_prm, tmp_path):
  config = ctx.config.copy_and_resolve_references()
  config.rl.prompts_per_step, config.rl.num_minibatches = 3, 1     # 6 rows on data=8
  config.rl.prompts_per_row = 1
  with pytest.raises(ValueError, match=r"rl.prompts_per_step \* rl.samples_per_prompt = 6 "
                                       r"rows .* change rl.prompts_per_step or "
                                       r"rl.samples_per_prompt, or mesh.shape"):
    _trainer(ctx, tmp_path, 1, trained_prm[0], mesh=sharding.make_mesh((8, 1, 1)),
             config=config)


def _assert_sharded_by_the_rules(params, module, mesh):
  specs = jax.tree_util.tree_leaves(logical_axes(module), is_leaf=lambda x: isinstance(x, P))
  leaves = jax.tree_util.tree_leaves(params)
  assert len(specs) == len(leaves)
  for leaf, spec in zip(leaves, specs):
    assert leaf.sharding.mesh.shape == mesh.shape
    assert leaf.sharding.spec == sharding.logical_to_mesh_spec(spec, leaf.shape, mesh)


# `value_clip_frac` counts a comparison that is a tie in exact arithmetic wherever the value
# is not clipped, decided by float rounding (see tests/test_mesh_parity.py).
LOOSE_METRICS = {"ppo/value_clip_frac": 0.05}


@pytest.mark.parametrize("steps", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_rl_steps_on_an_8_device_mesh_match_one_device(ctx, trained_prm, one_device_run,
                                                      tmp_path, steps):
  """PSGPO steps (sample, test, score, GAE, PPO) on a (2, 2, 2) mesh vs one device.

  What is compared: the sampler keys every row by (row, step), so step 0 draws the same
  responses from the same initial policy on any mesh; step 1 samples from the updated
  policy, which differs only by reduction-order rounding (~1e-6), so the same tokens are
  drawn unless a draw sits on a probability boundary (none does for this seed). Hence the
  pass rates, line counts and finish reasons must be equal, and the float metrics
  (rewards, KL, PPO losses, gradient norms, ...) close: rtol 1e-3, since whitened
  advantages and the PPO ratios compound the scorer's ~1e-6 rounding over the update's
  minibatches, and some metrics are means near 0 (atol 1e-5). The trained policy is within
  the Adam bound of tests/tolerances.py (eps = ADAM_EPS, gradients agreeing to 1e-6): its
  params moved by at most lr per step, and rounding can change that by the bound only.
  The one-step version runs by default; two steps (a second compile for the new row
  length) is marked slow.
  """
  mesh = sharding.make_mesh((2, 2, 2))
  meshed = _trainer(ctx, tmp_path, steps, trained_prm[0], mesh=mesh)
  cfg = ctx.model_cfg
  _assert_sharded_by_the_rules(meshed.state["ref"], CausalLM(cfg), mesh)
  meshed.run(show_progress=False)
  meshed.close()
  state = meshed.state
  _assert_sharded_by_the_rules(state["ppo"]["policy"].params, CausalLM(cfg), mesh)
  _assert_sharded_by_the_rules(state["ppo"]["value"].params, ScalarModel(cfg), mesh)
  _assert_sharded_by_the_rules(state["prm"], ScalarModel(cfg), mesh)
  kernel = state["ppo"]["policy"].params["model"]["layers_0"]["mlp"]["gate_proj"]["kernel"]
  assert kernel.sharding.spec == P("fsdp", "tensor")                # really split 4 ways
  assert kernel.addressable_shards[0].data.size == kernel.size // 4
  exact = ("reward/pass_rate", "reward/lines_per_response", "rollout/finished_by_eos")
  assert len(meshed.history) == steps
  for expected, actual in zip(one_device_run.history, meshed.history):
    assert set(expected) == set(actual)
    for key, value in expected.items():
      if key.startswith("time/"):
        continue
      assert np.isfinite(actual[key]), key
      if key in exact:
        assert actual[key] == value, key
      else:
        np.testing.assert_allclose(actual[key], value, rtol=1e-3,
                                   atol=LOOSE_METRICS.get(key, 1e-5), err_msg=key)
  snapshot = os.path.join(one_device_run.workdir, "snapshots", f"step_{steps:06d}")
  expected_policy = stages.load_model(snapshot)
  rl = ctx.config.rl
  atol = adam_param_atol(rl.policy_lr, rl.ppo_epochs * rl.num_minibatches * steps,
                         grad_atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(expected_policy),
                  jax.tree_util.tree_leaves(meshed.policy_params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=atol)
