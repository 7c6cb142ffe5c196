"""The RL trainer: data order, rollout packing, resume bit-for-bit, non-finite handling."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.common import load_config
from psgpo_jax import pipeline, stages
from psgpo_jax.rl import trainer as trainer_lib
from psgpo_jax.rollout import Rollouts
from psgpo_jax.sandbox import Result

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
  batch = trainer_lib.rollout_batch(rollouts, tok, tok.pad_token_id, (256,))
  ends = np.flatnonzero(batch["line_end_mask"][0])
  assert len(ends) == text.count("\n")
  assert all("\n" in tok.decode([batch["tokens"][0, e]]) for e in ends)
  assert np.all(batch["response_mask"][0, ends] == 1)
  trivial = np.flatnonzero(batch["trivial_line_mask"][0])
  assert trivial.tolist() == [ends[-1]]               # the comment-only line
  assert batch["passed"][0] == 1.0


def _trainer(ctx, workdir, steps, value_params_nan=False):
  config = ctx.config
  cfg = ctx.model_cfg
  policy = stages.initial_policy(ctx)
  prm = trainer_lib.init_value_params("policy", cfg, policy, None, jax.random.PRNGKey(5))
  setup = trainer_lib.RLSetup(cfg, ctx.tokenizer, ctx.problems["train"], ctx.problems["eval"],
                              ctx.sandbox)
  t = trainer_lib.RLTrainer(config, setup, str(workdir), policy, prm, steps=steps,
                            dense_reward=True, value_init="prm")
  if value_params_nan:
    value = t.state["ppo"]["value"]
    t.state["ppo"]["value"] = value.replace(
        params=jax.tree_util.tree_map(lambda x: x * jnp.nan, value.params))
  return t


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(ctx, tmp_path):
  full = _trainer(ctx, tmp_path / "full", steps=2)
  full.run(show_progress=False)
  full.close()
  first = _trainer(ctx, tmp_path / "resumed", steps=1)        # "killed" after step 1
  first.run(show_progress=False)
  first.close()
  resumed = _trainer(ctx, tmp_path / "resumed", steps=2)
  assert resumed.maybe_restore() == 1
  resumed.run(show_progress=False)
  resumed.close()
  assert len(resumed.history) == 2
  for key, value in full.history[1].items():
    if not key.startswith("time/"):
      assert resumed.history[1][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
  for a, b in zip(jax.tree_util.tree_leaves(full.policy_params),
                  jax.tree_util.tree_leaves(resumed.policy_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_non_finite_updates_are_skipped_then_training_stops(ctx, tmp_path):
  config = ctx.config
  config.rl.max_nonfinite_steps = 2
  t = _trainer(ctx, tmp_path / "nan", steps=2, value_params_nan=True)
  before = jax.tree_util.tree_map(np.asarray, t.policy_params)
  with pytest.raises(trainer_lib.TrainingDiverged, match="2 consecutive PPO updates"):
    t.run(show_progress=False)
  t.close()
  for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(t.policy_params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert t.checkpointer.latest_step() is None        # nothing NaN was written
  config.rl.max_nonfinite_steps = 3
