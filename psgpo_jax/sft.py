"""Supervised warm-up: next-token cross-entropy on reference responses.

The loss goes through the shared step builder (`train_step.py`), like PPO and the PRM.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from psgpo_jax import batching, train_step
from psgpo_jax.models import CausalLM, ModelConfig

Array = jax.Array


def token_nll(logits: Array, tokens: Array) -> Array:
  """Negative log-likelihood of each token given the ones before it.

  Args:
    logits: [B, T, V] float32 from the full-sequence forward.
    tokens: [B, T] int.
  Returns:
    [B, T] float32; position t is -log p(tokens[t] | tokens[<t]); position 0 is 0.
  """
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(-picked, ((0, 0), (1, 0)))


def make_sft_loss(model_cfg: ModelConfig) -> Callable:
  """Returns loss(params, batch, rng) -> (mean response-token NLL, metrics)."""
  model = CausalLM(model_cfg)

  def loss_fn(params, batch, rng):
    del rng
    logits = model.apply({"params": params}, batch["tokens"],
                         attention_mask=batch["attention_mask"])
    mask = batch["response_mask"].astype(jnp.float32)
    count = jnp.maximum(mask.sum(), 1.0)
    loss = (token_nll(logits, batch["tokens"]) * mask).sum() / count
    predicted = jnp.pad(jnp.argmax(logits[:, :-1], -1), ((0, 0), (1, 0)))
    accuracy = ((predicted == batch["tokens"]) * mask).sum() / count
    return loss, {"loss": loss, "token_accuracy": accuracy}

  return loss_fn


def sft_batches(pairs: Sequence[Tuple[Sequence[int], Sequence[int]]], batch_size: int,
                pad_id: int, buckets: Sequence[int], rng: np.random.Generator,
                group_size: int = 1):
  """Endless shuffled batches of (prompt ids, response ids) pairs, epoch after epoch.

  Length grouping: each epoch's shuffled order is cut into groups of `group_size`
  batches, each group is sorted by length and cut into batches, and the batches are
  shuffled. Rows of a batch then have similar lengths, so little compute goes to padding
  (on the synthetic suite about half the tokens a random batch would pad to); the order
  stays random at the scale of an epoch. `group_size=1` gives plain shuffled batches.
  On the synthetic suite grouping halved the padding but learned slower (loss 0.37 vs
  0.18 after 1000 steps), so the pipeline leaves it off by default (`sft.length_grouping`).

  Yields dicts of [batch_size, T] arrays from `batching.pack_sequences`.
  """
  lengths = np.array([len(p) + len(r) for p, r in pairs])
  while True:
    order = rng.permutation(len(pairs))
    order = order[:len(order) - len(order) % batch_size]        # whole batches only
    span = batch_size * max(1, group_size)
    groups = [order[i:i + span] for i in range(0, len(order), span)]
    grouped = np.concatenate([g[np.argsort(lengths[g], kind="stable")] for g in groups])
    batches = grouped.reshape(-1, batch_size)
    for rows in batches[rng.permutation(len(batches))]:
      chosen = [pairs[i] for i in rows]
      yield batching.pack_sequences([p for p, _ in chosen], [r for _, r in chosen], pad_id,
                                    buckets)


def batch_arrays(batch: Dict[str, np.ndarray], mesh: Any = None,
                 rules: Optional[Mapping[str, Any]] = None) -> Dict[str, Array]:
  """The model inputs of a packed batch ([B, T] each), as device arrays; with a mesh,
  rows split over its `batch` axes (`sharding.shard_batch`)."""
  arrays = {k: batch[k] for k in ("tokens", "attention_mask", "response_mask")}
  if mesh is None:
    return {k: jnp.asarray(v) for k, v in arrays.items()}
  from psgpo_jax import sharding  # pylint: disable=import-outside-toplevel
  return sharding.shard_batch(arrays, mesh, rules)


def train_sft(params, model_cfg: ModelConfig, pairs, steps: int, batch_size: int,
              learning_rate: float, pad_id: int, seed: int = 0, warmup_steps: int = 0,
              weight_decay: float = 0.0, buckets: Sequence[int] = (), group_size: int = 1,
              schedule: str = "cosine", writer=None, log_every: int = 1,
              show_progress: bool = True,
              mesh: Any = None,
              rules: Optional[Mapping[str, Any]] = None):
  """Fine-tunes `params` on (prompt ids, response ids) pairs; returns (params, last metrics).

  Args:
    params: CausalLM params (not donated: the caller's copy stays valid).
    pairs: list of (prompt token ids, response token ids incl. EOS).
    steps, batch_size, learning_rate, warmup_steps, weight_decay: the optimisation.
    schedule: learning-rate schedule after warmup (`train_step.SCHEDULES`).
    pad_id: padding token id.
    buckets: padded row lengths; () = `batching.default_buckets` of the longest pair.
    group_size: batches per length-sorted group (`sft_batches`); 1 = no grouping.
    writer: optional MetricWriter (metrics under `sft/`), written every `log_every` steps
      and at the last.
    mesh: optional device mesh: params and optimizer state sharded by `rules`
      (`train_step.state_shardings`), rows of each batch split over the `batch` axes
      (`batch_size` must divide evenly: checked first), activations constrained.
    rules: logical-axis rules for `mesh` (default `sharding.make_rules()`).
  """
  from psgpo_jax.logging import progress  # pylint: disable=import-outside-toplevel
  if len(pairs) < batch_size:
    raise ValueError(f"The SFT corpus has {len(pairs)} pairs, fewer than sft.batch_size="
                     f"{batch_size}; lower the batch size or add data.")
  if mesh is not None:
    from psgpo_jax import sharding  # pylint: disable=import-outside-toplevel
    sharding.check_batch_rows(batch_size, mesh, rules, "sft.batch_size")
  optimizer = train_step.make_optimizer(learning_rate, weight_decay=weight_decay,
                                        warmup_steps=warmup_steps,
                                        total_steps=max(steps, warmup_steps + 1),
                                        schedule=schedule)
  state = train_step.TrainState.create(jax.tree_util.tree_map(jnp.array, params), optimizer)
  update = train_step.gradient_update(make_sft_loss(model_cfg), optimizer)
  state, step_fn = train_step.single_model_step(update, state, CausalLM(model_cfg), optimizer,
                                                mesh, rules)
  buckets = buckets or batching.default_buckets(max(len(p) + len(r) for p, r in pairs))
  batches = sft_batches(pairs, batch_size, pad_id, buckets, np.random.default_rng(seed),
                        group_size)
  rng = jax.random.PRNGKey(seed)
  metrics = {}
  bar = progress(range(steps), desc="sft", enabled=show_progress)
  for step in bar:
    batch = batch_arrays(next(batches), mesh, rules)
    state, metrics = step_fn(state, batch, jax.random.fold_in(rng, step))
    logged = step % max(1, log_every) == 0 or step == steps - 1
    if logged or step % 20 == 0:
      metrics = jax.device_get(metrics)
      bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
      if writer is not None and logged:
        writer.write(step, metrics, prefix="sft/")
  return state.params, {k: float(v) for k, v in jax.device_get(metrics).items()}
