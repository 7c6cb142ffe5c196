"""Feature-major decoding (models/feature_major.py) against the model's own decode step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psgpo_jax.models import CausalLM, ModelConfig, init_cache, init_params
from psgpo_jax.models.feature_major import decode_step, feature_major_params

CONFIGS = {
    # Qwen2: q/k/v biases, tied embeddings, grouped-query attention.
    "qwen2": ModelConfig(architecture="qwen2", vocab_size=97, hidden_size=48,
                         intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True,
                         initializer_range=0.2),
    # Llama: no biases, its own output head, a head size other than hidden / heads.
    "llama": ModelConfig(architecture="llama", vocab_size=97, hidden_size=48,
                         intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=4, head_dim=16, tie_word_embeddings=False,
                         attention_bias=False, initializer_range=0.2),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decode_step_equals_the_models_decode_of_one_token(name):
  """Logits and the updated cache of `decode_step` equal `CausalLM.decode` with T = 1,
  on a cache holding left padding and earlier tokens."""
  cfg = CONFIGS[name]
  model = CausalLM(cfg)
  params = init_params(model, jax.random.PRNGKey(1))
  # Random biases and norm scales, so that a bias or scale read from the wrong place shows.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape) if x.ndim < 3
                                     and x.shape[-1] != cfg.vocab_size else x
                                     for x, k in zip(leaves, keys)])
  b, s, index = 3, 12, 7
  rng = np.random.RandomState(0)
  cache = jax.tree.map(lambda c: jnp.asarray(rng.randn(*c.shape).astype(np.float32)),
                       init_cache(cfg, b, s))
  kv_mask = np.ones((b, s), np.int32)
  kv_mask[0, :3] = 0                                     # row 0 left-padded by 3 slots
  kv_mask[:, index + 1:] = 0                             # slots after the new token: empty
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, b))
  positions = jnp.asarray([index - 3, index, index])
  want, want_cache = model.apply({"params": params}, tokens[:, None], positions[:, None],
                                 jnp.asarray(kv_mask), cache, index, method="decode")
  got, got_cache = decode_step(feature_major_params(params, cfg), cfg, tokens, positions,
                               jnp.asarray(kv_mask), cache, index)
  assert got.shape == (b, cfg.vocab_size) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want[:, 0], rtol=1e-5, atol=1e-5)
  assert float(jnp.std(want)) > 0.5                        # logits far from all-equal
  for g, w in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
