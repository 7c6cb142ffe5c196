"""Supervised warm-up: next-token cross-entropy on reference responses.

The loss goes through the shared step builder (`train_step.py`), like PPO and the PRM.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from psgpo_jax import batching, checkpointing, faults, train_step
from psgpo_jax.models import CausalLM, ModelConfig
from psgpo_jax.models.heads import GROUP_ROW_KEYS, row_inputs, shift_right, token_logprobs

Array = jax.Array


def token_nll(logits: Array, tokens: Array, parents: Optional[Array] = None) -> Array:
  """Negative log-likelihood of each token given the ones before it.

  Args:
    logits: [B, T, V] float32 from the full-sequence forward.
    tokens: [B, T] int.
    parents: optional [B, T], the slot predicting each token (`heads.token_logprobs`).
  Returns:
    [B, T] float32; position t is -log p(tokens[t] | tokens[<t]); position 0 is 0.
  """
  return -token_logprobs(logits, tokens, 1.0, parents)


def make_sft_loss(model_cfg: ModelConfig) -> Callable:
  """Returns loss(params, batch, rng) -> (mean response-token NLL, metrics), for rows of
  one pair each or packed rows of several (`pack_pairs`): the same loss either way."""
  model = CausalLM(model_cfg)

  def loss_fn(params, batch, rng):
    del rng
    attention, positions, parents = row_inputs(batch)
    logits = model.apply({"params": params}, batch["tokens"], attention_mask=attention,
                         positions=positions)
    mask = batch["response_mask"].astype(jnp.float32)
    count = jnp.maximum(mask.sum(), 1.0)
    loss = (token_nll(logits, batch["tokens"], parents) * mask).sum() / count
    best = jnp.argmax(logits, -1)
    predicted = (shift_right(best[:, :-1]) if parents is None
                 else jnp.take_along_axis(best, jnp.maximum(parents, 0), axis=1))
    accuracy = ((predicted == batch["tokens"]) * mask).sum() / count
    return loss, {"loss": loss, "token_accuracy": accuracy}

  return loss_fn


def pack_pairs(batch: Dict[str, np.ndarray], num_rows: int, buckets: Sequence[int]
               ) -> Dict[str, np.ndarray]:
  """A `pack_sequences` batch of B pairs -> `num_rows` rows each holding several pairs
  (`batching.pack_prompt_groups` with one response per prompt): tokens, segment,
  branch, positions, parents and response_mask, all [num_rows, Tp]."""
  packed = batching.pack_prompt_groups(
      batch["tokens"], batch["prompt_lengths"],
      batch["prompt_lengths"] + batch["response_lengths"], np.arange(len(batch["tokens"])),
      buckets, num_rows=num_rows)
  out = {k: packed[k] for k in ("tokens",) + GROUP_ROW_KEYS}
  out["response_mask"] = (packed["branch"] > 0).astype(np.int32)
  return out


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
  """The model inputs of a batch ([B, T] each, either row layout), as device arrays; with
  a mesh, rows split over its `batch` axes (`sharding.shard_batch`)."""
  layout = GROUP_ROW_KEYS if "branch" in batch else ("attention_mask",)
  arrays = {k: batch[k] for k in ("tokens", "response_mask") + layout}
  if mesh is None:
    return {k: jnp.asarray(v) for k, v in arrays.items()}
  from psgpo_jax import sharding  # pylint: disable=import-outside-toplevel
  return sharding.shard_batch(arrays, mesh, rules)


def train_sft(params, model_cfg: ModelConfig, pairs, steps: int, batch_size: int,
              learning_rate: float, pad_id: int, seed: int = 0, warmup_steps: int = 0,
              weight_decay: float = 0.0, buckets: Sequence[int] = (), group_size: int = 1,
              schedule: str = "cosine", writer=None, log_every: int = 1,
              show_progress: bool = True, packed_rows: int = 0,
              checkpoint_dir: Optional[str] = None, checkpoint_every: int = 0,
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
    packed_rows: 0, or the rows each batch's `batch_size` pairs are packed into
      (`pack_pairs`): the same loss and gradient with less padding to compute.
    checkpoint_dir, checkpoint_every: with both, the state is saved every
      `checkpoint_every` steps (the latest kept) and a run started again resumes from the
      latest complete checkpoint (`checkpointing.resume_or_start`): the same batches and
      the same result as a run that was never interrupted.
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
    sharding.check_batch_rows(packed_rows or batch_size, mesh, rules,
                              "sft.packed_rows" if packed_rows else "sft.batch_size")
  if not 0 <= packed_rows <= batch_size:
    raise ValueError(f"sft.packed_rows={packed_rows} must be between 0 (off) and "
                     f"sft.batch_size={batch_size}.")
  optimizer = train_step.make_optimizer(learning_rate, weight_decay=weight_decay,
                                        warmup_steps=warmup_steps,
                                        total_steps=max(steps, warmup_steps + 1),
                                        schedule=schedule)
  state = train_step.TrainState.create(jax.tree_util.tree_map(jnp.array, params), optimizer)
  update = train_step.gradient_update(make_sft_loss(model_cfg), optimizer)
  state, step_fn = train_step.single_model_step(update, state, CausalLM(model_cfg), optimizer,
                                                mesh, rules)
  checkpointer, state, start = checkpointing.resume_or_start(checkpoint_dir, checkpoint_every,
                                                             state, "sft")
  buckets = buckets or batching.default_buckets(max(len(p) + len(r) for p, r in pairs))
  batches = sft_batches(pairs, batch_size, pad_id, buckets, np.random.default_rng(seed),
                        group_size)
  for _ in range(start):         # the data order is the seed's: skip the steps done
    next(batches)
  if packed_rows:
    longest = max(len(p) + len(r) for p, r in pairs)
    row_buckets = batching.default_buckets(longest * -(-batch_size // packed_rows), 64)
    batches = (pack_pairs(b, packed_rows, row_buckets) for b in batches)
  rng = jax.random.PRNGKey(seed)
  metrics = {}
  bar = progress(range(start, steps), desc="sft", enabled=show_progress)
  for step in bar:
    batch = batch_arrays(next(batches), mesh, rules)
    state, metrics = step_fn(state, batch, jax.random.fold_in(rng, step))
    checkpointing.save_on_schedule(checkpointer, step + 1, checkpoint_every, steps, state)
    faults.reached(f"sft:{step + 1}", settle=checkpointer and checkpointer.wait)
    logged = step % max(1, log_every) == 0 or step == steps - 1
    if logged or step % 20 == 0:
      metrics = jax.device_get(metrics)
      bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
      if writer is not None and logged:
        writer.write(step, metrics, prefix="sft/")
  if checkpointer is not None:
    checkpointer.close()
  return state.params, {k: float(v) for k, v in jax.device_get(metrics).items()}
