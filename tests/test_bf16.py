"""bfloat16 compute end to end: float32 params and optimizer state, losses that track the
float32 run's, and PPO log-probabilities computed consistently (ratio 1 before updates)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.common import load_config
from psgpo_jax import pipeline, stages
from psgpo_jax.data import synthetic, synthetic_corpus
from psgpo_jax.models import CausalLM, ModelConfig, init_params
from psgpo_jax.rl import value_init
from psgpo_jax.rl import trainer as trainer_lib
from psgpo_jax.rl.trainer_config import TrainerConfig
from psgpo_jax.rollout import encode
from psgpo_jax.sft import train_sft
from psgpo_jax.tokenization import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _float_dtypes(tree):
  return {x.dtype for x in jax.tree_util.tree_leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.floating)}


def test_sft_in_bfloat16_keeps_float32_state_and_tracks_the_float32_loss(tmp_path):
  tokenizer = load_tokenizer(synthetic_corpus.build_tokenizer(str(tmp_path / "tok")))
  problems = synthetic.make_split(0, 16, range(2, 4), "train")
  pairs = [(encode(tokenizer, p), encode(tokenizer, r) + [tokenizer.eos_token_id])
           for p, r in synthetic_corpus.sft_corpus(problems)]
  cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id)
  init = init_params(CausalLM(cfg), jax.random.PRNGKey(0))
  losses = {}
  for dtype in ("float32", "bfloat16"):
    params, metrics = train_sft(init, cfg.replace(dtype=dtype), pairs, steps=20, batch_size=8,
                                learning_rate=1e-2, pad_id=tokenizer.pad_token_id,
                                buckets=(128,), show_progress=False)
    assert _float_dtypes(params) == {jnp.dtype("float32")}, dtype
    losses[dtype] = metrics["loss"]
  first = 2.0 * np.log(len(tokenizer))                  # far above either: both learned
  assert losses["float32"] < first / 4
  assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.1)


@pytest.fixture(scope="module")
def bf16_ctx(tmp_path_factory):
  config = load_config(os.path.join(ROOT, "configs", "quickstart.py:tiny"))
  config.workdir = str(tmp_path_factory.mktemp("bf16"))
  config.model.dtype = "bfloat16"
  context = pipeline.RunContext(config)
  yield context
  context.close()


def test_an_rl_step_in_bfloat16_keeps_float32_state_and_consistent_log_probs(bf16_ctx,
                                                                             tmp_path):
  ctx = bf16_ctx
  cfg = ctx.model_cfg
  assert cfg.dtype == "bfloat16" and cfg.param_dtype == "float32"
  policy = stages.initial_policy(ctx)
  prm = value_init.init_value_params("policy", cfg, policy, None, jax.random.PRNGKey(5))
  setup = trainer_lib.RLSetup(cfg, ctx.tokenizer, ctx.problems["train"],
                              ctx.problems["eval"], ctx.sandbox)
  trainer_cfg = TrainerConfig.from_config(ctx.config, cfg, ctx.tokenizer, steps=1,
                                          dense_reward=True, value_init="prm")
  trainer = trainer_lib.RLTrainer(trainer_cfg, setup, str(tmp_path), policy, prm)
  trainer.run(show_progress=False)
  trainer.close()
  for name in ("policy", "value"):
    state = trainer.state["ppo"][name]
    assert _float_dtypes(state.params) == {jnp.dtype("float32")}, name
    assert _float_dtypes(state.opt_state) == {jnp.dtype("float32")}, name
  metrics = trainer.history[0]
  assert all(np.isfinite(v) for k, v in metrics.items() if isinstance(v, float)), metrics
  # The policy is the reference at step 0 and both are scored by the same bf16 forward:
  # no KL. The update's log-probs start from the scorer's (ratio 1), and the update has
  # moved them only by its own steps, far from the clip range.
  assert metrics["reward/kl"] == pytest.approx(0.0, abs=1e-6)
  assert metrics["ppo/approx_kl"] < 1e-2 and metrics["ppo/clip_frac"] < 0.05
