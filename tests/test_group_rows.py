"""Rows of prompt groups (each prompt once, then its samples) against the [N, T] rows.

`batching.pack_prompt_groups` lays a step's rollouts out so that each prompt is computed
once; the reference is the plain layout, one `prompt + response` row per sample, whose
numerics the model tests check against transformers. Scores, values, PRM outputs and
the PPO update must agree to float rounding.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psgpo_jax import batching
from psgpo_jax.models import CausalLM, ModelConfig, ScalarModel, init_params
from psgpo_jax.rl import learn, ppo
from psgpo_jax.rl.gae import gae
from psgpo_jax.train_step import TrainState, make_optimizer, make_train_step
from tolerances import ADAM_EPS, adam_param_atol

GROUPS, SAMPLES = 3, 3
CFG = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  attention_query_block=8)


def rollouts(seed=0):
  """Prompts of different lengths, each with SAMPLES ragged responses (one empty)."""
  rng = np.random.default_rng(seed)
  prompts, responses = [], []
  for g in range(GROUPS):
    prompt = rng.integers(1, 40, size=3 + 2 * g).tolist()
    for j in range(SAMPLES):
      length = 0 if (g, j) == (1, 1) else int(rng.integers(1, 9))
      prompts.append(prompt)
      responses.append(rng.integers(1, 40, size=length).tolist())
  rows = batching.pack_sequences(prompts, responses, 0, (8, 16, 24))
  return rows


def group_rows(rows, num_rows):
  lengths = rows["prompt_lengths"] + rows["response_lengths"]
  packed = batching.pack_prompt_groups(rows["tokens"], rows["prompt_lengths"], lengths,
                                       np.arange(GROUPS * SAMPLES) // SAMPLES, (16, 32, 48),
                                       num_rows=num_rows)
  return {f"group_{k}": v for k, v in packed.items()}


@pytest.mark.parametrize("num_rows", [3, 2, 1])
def test_maps_put_every_token_where_its_row_has_it(num_rows):
  rows = rollouts()
  g = group_rows(rows, num_rows)
  tokens, mask = rows["tokens"], rows["attention_mask"] > 0
  real = g["group_branch"] >= 0
  assert g["group_tokens"].shape[0] == num_rows
  assert real.sum() == sum(rows["prompt_lengths"][::SAMPLES]) + rows["response_lengths"].sum()
  np.testing.assert_array_equal(g["group_tokens"][real],
                                tokens.reshape(-1)[g["group_to_packed"][real]])
  np.testing.assert_array_equal(g["group_tokens"].reshape(-1)[g["group_to_rows"]][mask],
                                tokens[mask])
  columns = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  np.testing.assert_array_equal(g["group_positions"].reshape(-1)[g["group_to_rows"]][mask],
                                columns[mask])
  # The parent of a token's slot holds the token before it in its own row.
  flat_parent = (np.arange(num_rows)[:, None] * g["group_tokens"].shape[1] + g["group_parents"])
  parent_of = flat_parent.reshape(-1)[g["group_to_rows"]]
  later = mask & (columns > 0)
  np.testing.assert_array_equal(g["group_tokens"].reshape(-1)[parent_of][later],
                                np.roll(tokens, 1, axis=1)[later])
  assert np.all(g["group_parents"][~real] == -1)


def test_packing_refuses_mixed_prompts_and_empty_rows():
  rows = rollouts()
  lengths = rows["prompt_lengths"] + rows["response_lengths"]
  with pytest.raises(ValueError, match="share group id 0 but not their prompt"):
    batching.pack_prompt_groups(rows["tokens"], rows["prompt_lengths"], lengths,
                                np.zeros(GROUPS * SAMPLES, int), (16,))
  with pytest.raises(ValueError, match="3 prompt groups cannot fill 4 rows"):
    batching.pack_prompt_groups(rows["tokens"], rows["prompt_lengths"], lengths,
                                np.arange(GROUPS * SAMPLES) // SAMPLES, (16,), num_rows=4)


@pytest.fixture(scope="module")
def params():
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  policy = init_params(CausalLM(CFG), keys[0])
  return {"policy": policy, "ref": init_params(CausalLM(CFG), keys[1]),
          "value": init_params(ScalarModel(CFG), keys[2]),
          "prm": init_params(ScalarModel(CFG), keys[1])}


@pytest.mark.parametrize("num_rows", [3, 1])
def test_scorer_on_group_rows_equals_the_plain_rows(params, num_rows):
  rows = rollouts()
  batch = {k: rows[k] for k in ("tokens", "attention_mask", "response_mask")}
  batch["line_end_mask"] = (np.random.default_rng(1).random(rows["tokens"].shape) < 0.3
                            ) * rows["response_mask"]
  score = jax.jit(learn.make_score(CFG, 0.7, True))
  plain = score(params, batch)
  grouped = score(params, {**batch, **group_rows(rows, num_rows)})
  mask = rows["attention_mask"] > 0
  for k, v in plain.items():
    np.testing.assert_allclose(np.asarray(grouped[k])[mask], np.asarray(v)[mask], atol=2e-5,
                               err_msg=k)
  assert np.abs(np.asarray(plain["old_logprobs"])[rows["response_mask"] > 0]).min() > 0


def test_ppo_update_on_group_rows_equals_the_plain_rows(params):
  """One epoch, one minibatch: the same gradient step, in either layout."""
  rows = rollouts()
  rng = np.random.default_rng(2)
  response = rows["response_mask"]
  batch = {k: rows[k] for k in ("tokens", "attention_mask", "response_mask")}
  batch["line_end_mask"] = np.zeros_like(response)
  batch.update(jax.jit(learn.make_score(CFG, 1.0, False))(params, batch))
  rewards = np.where(response > 0, rng.normal(size=response.shape), 0.0).astype(np.float32)
  batch["advantages"], batch["returns"] = gae(rewards, batch["values"], response, 1.0, 0.95)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  grouped = learn.to_group_rows({**batch, **group_rows(rows, 2)}, ppo.UPDATE_KEYS)
  assert grouped["tokens"].shape[0] == 2 and "attention_mask" not in grouped

  lrs = {"policy": 3e-3, "value": 1e-2}
  optimizers = {k: make_optimizer(lr, grad_clip=1.0, eps=ADAM_EPS) for k, lr in lrs.items()}
  config = ppo.PPOConfig(ppo_epochs=1, num_minibatches=1, ent_coef=0.01)
  update = make_train_step(ppo.make_ppo_update(CausalLM(CFG), ScalarModel(CFG), optimizers,
                                               config))
  results = []
  for b in (batch, grouped):
    state = {k: TrainState.create(jax.tree.map(jnp.array, params[k]), optimizers[k])
             for k in ("policy", "value")}
    results.append(update(state, b, jax.random.PRNGKey(3)))
  (plain_state, plain_metrics), (group_state, group_metrics) = results
  for k in ("policy_loss", "value_loss", "entropy", "approx_kl", "explained_variance"):
    np.testing.assert_allclose(group_metrics[k], plain_metrics[k], rtol=1e-4, atol=1e-6,
                               err_msg=k)
  for k, lr in lrs.items():
    chex.assert_trees_all_close(group_state[k].params, plain_state[k].params, rtol=0,
                                atol=adam_param_atol(lr, 1))
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(plain_state["policy"].params), jax.tree.leaves(params["policy"])))
  assert moved > 100 * adam_param_atol(lrs["policy"], 1)
