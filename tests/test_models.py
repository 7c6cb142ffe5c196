"""The transformer and its heads: padding invariance, KV cache, GQA, dtypes, axis names."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psgpo_jax.models import (CausalLM, ModelConfig, ScalarModel, init_cache, init_params,
                              logical_axes, scalar_params_from_causal)
from psgpo_jax.models.transformer import default_positions, dot_product_attention

TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def _tokens(batch, length, seed=1, vocab=101):
  return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, vocab)


@pytest.mark.parametrize("tied,bias,kv_heads", [(True, True, 2), (False, False, 1), (True, False, 4)])
def test_left_padding_gives_same_logits_as_no_padding(tied, bias, kv_heads):
  cfg = ModelConfig(**{**TINY, "num_key_value_heads": kv_heads}, tie_word_embeddings=tied,
                    attention_bias=bias)
  model = CausalLM(cfg)
  params = init_params(model, jax.random.PRNGKey(0))
  tokens = _tokens(3, 12)
  pads = [0, 5, 11]
  mask = (jnp.arange(12)[None, :] >= jnp.array(pads)[:, None]).astype(jnp.int32)
  batched = model.apply({"params": params}, tokens, attention_mask=mask)
  for row, pad in enumerate(pads):
    alone = model.apply({"params": params}, tokens[row:row + 1, pad:])
    np.testing.assert_allclose(batched[row, pad:], alone[0], atol=1e-5)


def _numpy_attention(q, k, v, mask):
  """Softmax attention one (row, query, head) at a time: q [B, T, H, Dh], k, v [B, KV, S, Dh]."""
  b, t, h, dh = q.shape
  group = h // k.shape[1]
  out = np.zeros_like(q)
  for i, j, head in np.ndindex(b, t, h):
    scores = k[i, head // group] @ q[i, j, head] / np.sqrt(dh)
    scores = np.where(mask[i, j], scores, -np.inf)
    weights = np.exp(scores - scores.max())
    out[i, j, head] = (weights / weights.sum()) @ v[i, head // group]
  return out


@pytest.mark.parametrize("queries,kv_heads", [(1, 2), (1, 1), (3, 2)])
def test_grouped_query_attention_matches_a_numpy_loop(queries, kv_heads):
  """Both paths, one query per row (the decode step's own layout) and several."""
  rng = np.random.RandomState(0)
  q = rng.randn(3, queries, 4, 8).astype(np.float32)
  k, v = (rng.randn(3, kv_heads, 7, 8).astype(np.float32) for _ in range(2))
  mask = rng.rand(3, queries, 7) < 0.6
  mask[..., 0] = True                                  # every query sees at least one slot
  got = jax.jit(dot_product_attention, static_argnums=4)(q, k, v, mask, jnp.float32)
  np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k, v, mask), atol=1e-5)


@pytest.mark.parametrize("block", [4, 5])
def test_blockwise_causal_attention_matches_one_block(block):
  """Query blocks attend to their key prefix only: the same logits and gradients."""
  cfg = ModelConfig(**TINY, attention_query_block=0)
  blocked = CausalLM(cfg.replace(attention_query_block=block))
  params = init_params(CausalLM(cfg), jax.random.PRNGKey(0))
  tokens = _tokens(3, 12)
  mask = (jnp.arange(12)[None, :] >= jnp.array([0, 5, 11])[:, None]).astype(jnp.int32)
  def loss(model, p):
    logits = model.apply({"params": p}, tokens, attention_mask=mask)
    return jnp.sum(jnp.where(mask[..., None] > 0, jax.nn.log_softmax(logits), 0.0)), logits
  grad = lambda model: jax.jit(jax.value_and_grad(lambda p: loss(model, p), has_aux=True))
  (_, want), want_grads = grad(CausalLM(cfg))(params)
  (_, got), got_grads = grad(blocked)(params)
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               got_grads, want_grads)


def test_kv_cache_decoding_reproduces_full_sequence_logits():
  cfg = ModelConfig(**TINY, tie_word_embeddings=False, attention_query_block=4)
  model = CausalLM(cfg)
  params = init_params(model, jax.random.PRNGKey(0))
  tokens = _tokens(2, 10)
  mask = jnp.ones((2, 10), jnp.int32).at[1, :4].set(0)
  full = model.apply({"params": params}, tokens, attention_mask=mask)
  positions = default_positions(mask)
  cache = init_cache(cfg, 2, 16)
  kv_mask = jnp.zeros((2, 16), jnp.int32).at[:, :10].set(mask)
  prefill, cache = model.apply({"params": params}, tokens[:, :6], positions[:, :6], kv_mask,
                               cache, 0, method="decode")
  steps = [prefill]
  for t in range(6, 10):
    logits, cache = model.apply({"params": params}, tokens[:, t:t + 1], positions[:, t:t + 1],
                                kv_mask, cache, t, method="decode")
    steps.append(logits)
  incremental = jnp.concatenate(steps, axis=1)
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(incremental)[real], np.asarray(full)[real], atol=1e-5)


def test_gqa_matches_explicitly_repeated_kv_heads():
  """GQA with 2 kv heads equals full multi-head attention with each kv head repeated."""
  gqa_cfg = ModelConfig(**TINY, attention_bias=False)
  mha_cfg = gqa_cfg.replace(num_key_value_heads=4)
  params = init_params(CausalLM(gqa_cfg), jax.random.PRNGKey(0))
  mha_params = jax.tree_util.tree_map(lambda x: x, params)
  for name in ("layers_0", "layers_1"):
    attn = mha_params["model"][name]["self_attn"]
    for proj in ("k_proj", "v_proj"):
      attn[proj] = {"kernel": jnp.repeat(attn[proj]["kernel"], 2, axis=1)}
  tokens = _tokens(2, 9)
  np.testing.assert_allclose(CausalLM(gqa_cfg).apply({"params": params}, tokens),
                             CausalLM(mha_cfg).apply({"params": mha_params}, tokens), atol=1e-5)


def test_remat_and_bfloat16():
  cfg = ModelConfig(**TINY)
  params = init_params(CausalLM(cfg), jax.random.PRNGKey(0))
  tokens = _tokens(2, 8)
  ref = CausalLM(cfg).apply({"params": params}, tokens)

  def loss(p, c):
    return CausalLM(c).apply({"params": p}, tokens).mean()

  g1 = jax.grad(loss)(params, cfg)
  g2 = jax.grad(loss)(params, cfg.replace(remat=True))
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  bf16 = CausalLM(cfg.replace(dtype="bfloat16")).apply({"params": params}, tokens)
  assert bf16.dtype == jnp.float32
  assert float(jnp.abs(bf16 - ref).max()) < 0.1


def _is_spec(x):
  return isinstance(x, jax.sharding.PartitionSpec)


def test_every_parameter_has_logical_axis_names():
  for cfg in (ModelConfig(**TINY, tie_word_embeddings=False), ModelConfig(**TINY)):
    for module in (CausalLM(cfg), ScalarModel(cfg)):
      specs = logical_axes(module)
      shapes = jax.eval_shape(lambda: init_params(module, jax.random.PRNGKey(0)))
      for spec, shape in zip(jax.tree_util.tree_leaves(specs, is_leaf=_is_spec),
                             jax.tree_util.tree_leaves(shapes)):
        assert len(spec) == len(shape.shape)
      names = {a for s in jax.tree_util.tree_leaves(specs, is_leaf=_is_spec)
               for a in s if a}
      assert {"vocab", "embed", "heads", "kv_heads", "mlp"} <= names


def test_scalar_model_reuses_causal_backbone():
  cfg = ModelConfig(**TINY)
  causal = init_params(CausalLM(cfg), jax.random.PRNGKey(0))
  scalar = scalar_params_from_causal(causal, cfg, jax.random.PRNGKey(1))
  assert scalar["model"] is causal["model"]
  tokens = _tokens(2, 7)
  values = ScalarModel(cfg).apply({"params": scalar}, tokens)
  assert values.shape == (2, 7) and values.dtype == jnp.float32
  # Same backbone, same hidden states: the scalar head is a linear read-out of them.
  hidden, _ = CausalLM(cfg).apply(
      {"params": causal}, tokens, jnp.ones((2, 7), jnp.int32), default_positions(jnp.ones((2, 7))),
      method=lambda m, t, k, p: m.model(t, k, p))
  head = scalar["score"]
  np.testing.assert_allclose(values, hidden @ head["kernel"][:, 0] + head["bias"][0], atol=1e-5)


@pytest.mark.parametrize("bad,message", [
    (dict(architecture="gpt2"), "not supported"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "multiple"),
    (dict(dtype="float8"), "dtype"),
])
def test_config_errors_name_the_problem(bad, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig(**{**TINY, **bad})
  with pytest.raises(ValueError, match="Unknown model config field"):
    ModelConfig.from_dict({**TINY, "hiden_size": 3})


def test_inputs_longer_than_the_position_limit_are_refused_by_name():
  cfg = ModelConfig(**{**TINY, "max_position_embeddings": 8})
  params = init_params(CausalLM(cfg), jax.random.PRNGKey(0))
  CausalLM(cfg).apply({"params": params}, _tokens(1, 8))           # at the limit: fine
  for module in (CausalLM(cfg), ScalarModel(cfg)):
    with pytest.raises(ValueError, match="max_position_embeddings=8"):
      module.apply({"params": params if isinstance(module, CausalLM) else
                    init_params(module, jax.random.PRNGKey(0))}, _tokens(1, 9))


def test_the_sampler_refuses_prompts_that_leave_no_room_for_new_tokens():
  from psgpo_jax.sampling import Sampler  # pylint: disable=import-outside-toplevel
  from psgpo_jax.sampling_config import SamplingConfig  # pylint: disable=import-outside-toplevel
  cfg = ModelConfig(**{**TINY, "max_position_embeddings": 16})
  params = init_params(CausalLM(cfg), jax.random.PRNGKey(0))
  sampler = Sampler(cfg, SamplingConfig(max_new_tokens=8, eos_ids=()))
  sampler.generate(params, [[1] * 8], jax.random.PRNGKey(0))       # 8 + 8 = 16: fine
  with pytest.raises(ValueError, match="sampling.max_new_tokens"):
    sampler.generate(params, [[1] * 9], jax.random.PRNGKey(0))
