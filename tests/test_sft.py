"""Supervised warm-up: the loss is the response-token NLL and it learns a toy task."""
import jax
import jax.numpy as jnp
import numpy as np

from psgpo_jax.batching import default_buckets, pack_sequences
from psgpo_jax.models import CausalLM, ModelConfig, init_params
from psgpo_jax.sft import make_sft_loss, pack_pairs, sft_batches, token_nll, train_sft

CFG = ModelConfig(vocab_size=20, hidden_size=32, intermediate_size=64, num_hidden_layers=2)


def test_token_nll_matches_numpy():
  logits = np.random.default_rng(0).normal(size=(2, 5, 20)).astype(np.float32)
  tokens = np.random.default_rng(1).integers(0, 20, size=(2, 5))
  got = np.asarray(token_nll(jnp.asarray(logits), jnp.asarray(tokens)))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  for b in range(2):
    assert got[b, 0] == 0.0
    for t in range(1, 5):
      np.testing.assert_allclose(got[b, t], -logp[b, t - 1, tokens[b, t]], rtol=1e-5)


def test_loss_ignores_prompt_and_padding():
  params = init_params(CausalLM(CFG), jax.random.PRNGKey(0))
  batch = pack_sequences([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0, buckets=(8,))
  loss, _ = make_sft_loss(CFG)(params, {k: jnp.asarray(v) for k, v in batch.items()}, None)
  logits = CausalLM(CFG).apply({"params": params}, jnp.asarray(batch["tokens"]),
                               attention_mask=jnp.asarray(batch["attention_mask"]))
  nll = np.asarray(token_nll(logits, jnp.asarray(batch["tokens"])))
  expected = np.mean([nll[0, 3], nll[0, 4], nll[1, 1], nll[1, 2], nll[1, 3]])
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_packed_rows_give_the_loss_and_gradient_of_one_row_per_pair():
  """Several pairs per row (each attending only to itself) = one row per pair."""
  rng = np.random.default_rng(3)
  prompts = [rng.integers(1, 20, size=int(n)).tolist() for n in rng.integers(1, 6, size=6)]
  responses = [rng.integers(1, 20, size=int(n)).tolist() for n in rng.integers(1, 7, size=6)]
  plain = pack_sequences(prompts, responses, pad_id=0, buckets=(16,))
  params = init_params(CausalLM(CFG), jax.random.PRNGKey(0))
  loss_fn = make_sft_loss(CFG)
  grad = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, None)[0]))
  as_arrays = lambda b: {k: jnp.asarray(v) for k, v in b.items()}   # noqa: E731
  loss, grads = grad(params, as_arrays({k: plain[k] for k in
                                        ("tokens", "attention_mask", "response_mask")}))
  for rows in (2, 3):
    packed = pack_pairs(plain, rows, (16, 32, 48))
    assert packed["tokens"].shape[0] == rows
    assert packed["response_mask"].sum() == plain["response_mask"].sum()
    packed_loss, packed_grads = grad(params, as_arrays(packed))
    np.testing.assert_allclose(float(packed_loss), float(loss), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(packed_grads), jax.tree.leaves(grads)):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)
  _, metrics = loss_fn(params, as_arrays(pack_pairs(plain, 2, (16, 32, 48))), None)
  _, plain_metrics = loss_fn(params, as_arrays(plain), None)
  np.testing.assert_allclose(metrics["token_accuracy"], plain_metrics["token_accuracy"])


def test_sft_learns_a_deterministic_continuation():
  rng = np.random.default_rng(0)
  pairs = []
  for _ in range(64):
    a = int(rng.integers(2, 10))
    pairs.append(([1, a], [a + 1, a + 2, a + 3, 0]))
  params = init_params(CausalLM(CFG), jax.random.PRNGKey(0))
  _, before = make_sft_loss(CFG)(params, {k: jnp.asarray(v) for k, v in pack_sequences(
      [p for p, _ in pairs[:16]], [r for _, r in pairs[:16]], 0, (8,)).items()}, None)
  _, metrics = train_sft(params, CFG, pairs, steps=150, batch_size=16, learning_rate=3e-3,
                         pad_id=0, show_progress=False)
  assert metrics["loss"] < 0.2 < float(before["loss"])
  assert metrics["token_accuracy"] == 1.0


def test_default_buckets_double_with_midpoints_and_cover_the_longest():
  assert default_buckets(150) == (32, 48, 64, 96, 128, 192)
  assert default_buckets(192) == (32, 48, 64, 96, 128, 192)
  assert default_buckets(20) == (32,)


def test_length_grouped_batches_cover_each_pair_once_per_epoch_and_pad_less():
  rng = np.random.default_rng(0)
  pairs = [([1] * int(n), [2] * 3) for n in rng.integers(5, 150, size=512)]
  buckets = default_buckets(160)
  batches = sft_batches(pairs, 16, 0, buckets, np.random.default_rng(1), group_size=16)
  epoch = [next(batches) for _ in range(512 // 16)]
  seen = sorted(int(b["attention_mask"][i].sum()) for b in epoch for i in range(16))
  assert seen == sorted(len(p) + len(r) for p, r in pairs)
  padded = sum(b["tokens"].size for b in epoch)
  plain = sft_batches(pairs, 16, 0, buckets, np.random.default_rng(1), group_size=1)
  padded_plain = sum(next(plain)["tokens"].size for _ in range(512 // 16))
  assert padded < 0.7 * padded_plain
  # Batches of one group come out in a shuffled order, not sorted by length.
  widths = [b["tokens"].shape[1] for b in epoch]
  assert widths != sorted(widths)


def test_sft_logs_every_log_every_steps_and_the_last(tmp_path):
  """logging.every_steps thins the SFT rows (the stage passes it as log_every)."""
  from psgpo_jax.logging import MetricWriter, read_metrics
  pairs = [([1, a], [a + 1, 0]) for a in range(2, 10)]
  params = init_params(CausalLM(CFG), jax.random.PRNGKey(0))
  with MetricWriter(str(tmp_path), tensorboard=False) as writer:
    train_sft(params, CFG, pairs, steps=10, batch_size=4, learning_rate=1e-3, pad_id=0,
              writer=writer, log_every=4, show_progress=False)
  rows = list(read_metrics(str(tmp_path / "metrics.jsonl")))
  assert [r["step"] for r in rows] == [0, 4, 8, 9] and "sft/loss" in rows[0]
