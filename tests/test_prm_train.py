"""PRM training: line-end batches, loss, scores, metrics, and learning synthetic labels."""
from __future__ import annotations

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psgpo_jax import batching
from psgpo_jax.data import synthetic, synthetic_corpus
from psgpo_jax.lines import is_trivial_line, split_lines
from psgpo_jax.models import CausalLM, ModelConfig, ScalarModel, init_params
from psgpo_jax.prm import batches as prm_batches
from psgpo_jax.prm import metrics as prm_metrics_lib
from psgpo_jax.prm import scoring as prm_scoring
from psgpo_jax.prm import train as prm
from psgpo_jax.prm.baselines import position_scores
from psgpo_jax.prm.search import label_lines
from psgpo_jax.tokenization import line_spans, load_tokenizer
from oracle_rows import oracle_rows
from tolerances import ADAM_EPS, adam_param_atol

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  path = synthetic_corpus.build_tokenizer(str(tmp_path_factory.mktemp("tok")), vocab_size=512)
  return load_tokenizer(path)


# ----------------------------------------------------------------------------- metrics


def _pair_auroc(pos, scores):
  wins = 0.0
  p = [s for s, y in zip(scores, pos) if y]
  n = [s for s, y in zip(scores, pos) if not y]
  for a, b in itertools.product(p, n):
    wins += 1.0 if a > b else 0.5 if a == b else 0.0
  return wins / (len(p) * len(n))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_brute_force_pair_count_with_ties(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(2, 60))
  scores = rng.integers(0, 6, size=n).astype(float)   # many ties
  pos = rng.random(n) < 0.4
  pos[0], pos[1] = True, False
  assert prm_metrics_lib.auroc(pos, scores) == pytest.approx(_pair_auroc(pos, scores))
  assert prm_metrics_lib.auroc(pos, -scores) == pytest.approx(1.0 - _pair_auroc(pos, scores))
  assert np.isnan(prm_metrics_lib.auroc(np.ones(3, bool), [0.1, 0.2, 0.3]))


def test_calibration_bins_and_ece():
  probs = [0.05, 0.15, 0.15, 0.95, 1.0]
  outcomes = [False, True, False, True, True]
  cal = prm_metrics_lib.calibration(probs, outcomes, num_bins=10)
  counts = [b["count"] for b in cal["bins"]]
  assert counts == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
  assert cal["bins"][1]["positive_rate"] == 0.5
  expected = (1 * 0.05 + 2 * abs(0.15 - 0.5) + 2 * abs(0.975 - 1.0)) / 5
  assert cal["ece"] == pytest.approx(expected)


def test_prm_metrics_first_error_localisation_and_oracle():
  rows = [
      {"line_labels": [1, 0, 1, -1, -1], "oracle_first_bad": 3},
      {"line_labels": [1, 1, -1], "oracle_first_bad": 1},
      {"line_labels": [1, 1], "oracle_first_bad": None},
  ]
  scores = [[0.9, -0.9, 0.2, -0.5, -0.8],   # trivial line 1 is ignored: first below = 3
            [0.5, 0.1, 0.3],                # nothing below 0: predicts no error
            [0.4, -0.2]]                    # false alarm at line 1
  m = prm_metrics_lib.prm_metrics(rows, scores, threshold=0.0)
  assert m["lines"] == 9
  assert m["first_error_accuracy"] == pytest.approx(1 / 3)
  assert m["line_accuracy"] == pytest.approx(7 / 9)
  assert m["oracle_first_error_accuracy"] == pytest.approx(1 / 3)
  assert m["auroc"] == pytest.approx(_pair_auroc(
      [True, True, False, False, True, True, False, True, True],
      [0.9, 0.2, -0.5, -0.8, 0.5, 0.1, 0.3, 0.4, -0.2]))
  # Truncated scores (a row longer than max_len) use only the scored lines.
  m = prm_metrics_lib.prm_metrics(rows[:1], [[0.9, -0.9, 0.2]])
  assert m["lines"] == 2 and m["first_error_accuracy"] == 1.0


# ----------------------------------------------------------------------------- loss


def test_within_prompt_pick_counts_mixed_prompts_and_breaks_ties_at_random():
  rows = [{"problem_id": "a", "passed": True}, {"problem_id": "a", "passed": False},
          {"problem_id": "b", "passed": False}, {"problem_id": "b", "passed": True},
          {"problem_id": "b", "passed": False},
          {"problem_id": "c", "passed": True}, {"problem_id": "c", "passed": True}]
  # a: the passing response's weakest line is the higher (picked); b: the passing one
  # ties with a failing one (half a pick); c: all pass, left out.
  scores = [[0.9, 0.2], [0.8, -0.5], [0.05], [0.1, 0.7, 0.5], [0.3, 0.1], [1.0], []]
  out = prm_metrics_lib.within_prompt_pick(rows, scores)
  assert out["pick_prompts"] == 2
  assert out["pick_passing"] == pytest.approx((1.0 + 0.5) / 2)
  assert out["pick_random"] == pytest.approx((1 / 2 + 1 / 3) / 2)
  # A response without line scores counts -1: below any scored one.
  out = prm_metrics_lib.within_prompt_pick(rows[:2], [[-0.9], []])
  assert out["pick_passing"] == 1.0
  assert prm_metrics_lib.within_prompt_pick(rows[5:], scores[5:]) == {"pick_prompts": 0}


def test_prm_objective_uses_only_masked_line_ends():
  outputs = jnp.array([[0.5, 9.0, -0.2, 3.0], [0.0, 0.3, 7.0, -1.0]])
  targets = jnp.array([[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, -1.0]])
  mask = jnp.array([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
  loss, metrics = prm.prm_objective(outputs, targets, mask, "mse")
  expected = ((0.5 - 1) ** 2 + (-0.2 + 1) ** 2 + (0.3 - 1) ** 2 + 0.0) / 4
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  assert float(metrics["line_accuracy"]) == 1.0
  # Off-mask outputs do not matter.
  changed = outputs.at[0, 1].set(-50.0).at[1, 2].set(50.0)
  assert float(prm.prm_objective(changed, targets, mask, "mse")[0]) == pytest.approx(expected)
  loss, _ = prm.prm_objective(outputs, targets, mask, "bce")
  z, y = np.array([0.5, -0.2, 0.3, -1.0]), np.array([1.0, 0.0, 1.0, 0.0])
  bce = np.mean(np.log1p(np.exp(-z)) * y + np.log1p(np.exp(z)) * (1 - y))
  assert float(loss) == pytest.approx(bce, rel=1e-5)


# ----------------------------------------------------------------------------- batches


def test_batches_put_labels_on_the_newline_tokens(tokenizer):
  problems = synthetic.make_split(0, 4, range(3, 6))
  rows = oracle_rows(problems, 1)
  rows[0]["line_used"] = [1] + [0] * (len(rows[0]["line_labels"]) - 1)
  batches = prm_batches.make_prm_batches(rows, tokenizer, max_len=256, batch_size=3,
                                 pad_id=tokenizer.pad_token_id)
  # Rows are padded to the smallest default bucket that holds the batch's longest row.
  buckets = batching.default_buckets(256)
  for b in batches:
    longest = int(b["attention_mask"].sum(-1).max())
    assert b["tokens"].shape == (3, batching.bucket_length(longest, buckets))
  assert sorted(r for b in batches for r in b["row_index"] if r >= 0) == [0, 1, 2, 3]
  for batch in batches:
    for i, r in enumerate(batch["row_index"]):
      if r < 0:
        assert batch["line_end_mask"][i].sum() == 0 and batch["attention_mask"][i].sum() == 0
        continue
      row = rows[r]
      where = np.flatnonzero(batch["line_end_mask"][i])
      assert len(where) == len(row["line_labels"])
      assert all(tokenizer.decode([t]) == "\n" for t in batch["tokens"][i, where])
      assert batch["targets"][i, where].tolist() == row["line_labels"]
      expected_used = row.get("line_used", [1] * len(where))
      assert batch["loss_mask"][i, where].tolist() == expected_used
      assert batch["loss_mask"][i].sum() == sum(expected_used)


def test_lines_sharing_an_end_token_take_the_code_lines_label():
  # "x\n\n" as one token: the code line and the blank line after it end together.
  example = prm_batches.PRMExample(prompt_ids=(5, 6), response_ids=(7, 8, 9),
                                   line_ends=(0, 1, 1, 2), labels=(1, -1, 0, -1),
                                   used=(1, 1, 1, 1), row=0)
  batch = prm_batches.pack_examples([example], pad_id=0, buckets=(8,), batch_size=2)
  assert batch["line_end_mask"][0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
  assert batch["targets"][0].tolist() == [0, 0, 1, -1, -1, 0, 0, 0]
  assert batch["row_index"].tolist() == [0, -1]


def test_row_line_ends_match_tokenization_line_spans(tokenizer):
  rows = oracle_rows(synthetic.make_split(1, 3, range(4, 7)), 1)
  for row in rows:
    prompt_ids = prm_batches.encode(tokenizer, row["prompt"])
    response_ids = prm_batches.encode(tokenizer, row["response"])
    spans = line_spans(tokenizer, prompt_ids, response_ids)
    assert spans.num_lines == len(split_lines(row["response"]))
    assert prm_batches.line_end_indices(tokenizer, prompt_ids, response_ids) == \
        spans.end_token.tolist()


# ----------------------------------------------------------------------------- score


def test_score_is_the_scalar_output_at_line_ends_and_zero_elsewhere():
  cfg = ModelConfig(vocab_size=64, **TINY)
  params = init_params(ScalarModel(cfg), jax.random.PRNGKey(1))
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 10), 0, 64)
  mask = jnp.ones((2, 10), jnp.int32).at[1, 7:].set(0)
  line_end = jnp.zeros((2, 10), jnp.int32).at[0, 3].set(1).at[0, 9].set(1).at[1, 6].set(1)
  batch = {"tokens": tokens, "attention_mask": mask, "line_end_mask": line_end}
  raw = ScalarModel(cfg).apply({"params": params}, tokens, attention_mask=mask)
  out = prm_scoring.make_score_fn(cfg)(params, batch)
  assert out.shape == (2, 10) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, np.where(line_end, raw, 0.0), rtol=1e-6)
  out_bce = prm_scoring.make_score_fn(cfg, "bce")(params, batch)
  np.testing.assert_allclose(out_bce, np.where(line_end, 2 * jax.nn.sigmoid(raw) - 1, 0.0),
                             rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- training


def test_split_by_prompt_keeps_a_prompts_responses_together():
  rows = [{"problem_id": f"p{i // 3}", "k": i} for i in range(60)]
  train, held = prm.split_by_prompt(rows, 0.25, seed=0)
  assert len(train) + len(held) == 60 and held and train
  assert not {r["problem_id"] for r in train} & {r["problem_id"] for r in held}
  assert prm.split_by_prompt(rows, 0.25, seed=0) == (train, held)
  small_train, small_held = prm.split_by_prompt(rows[:6], 0.01, seed=0)
  assert len(small_held) == 3 and len(small_train) == 3


def test_init_copies_the_policy_backbone():
  cfg = ModelConfig(vocab_size=64, **TINY)
  policy = init_params(CausalLM(cfg), jax.random.PRNGKey(0))
  params = prm.init_prm_params(policy, cfg, jax.random.PRNGKey(1))
  assert set(params) == {"model", "score"}
  for a, b in zip(jax.tree.leaves(params["model"]), jax.tree.leaves(policy["model"])):
    np.testing.assert_array_equal(a, b)
    assert a is not b


def test_train_prm_learns_oracle_labels_on_the_synthetic_suite(tokenizer, tmp_path):
  problems = synthetic.make_split(0, 48, range(3, 9))
  rows = oracle_rows(problems, 2)
  cfg = ModelConfig(vocab_size=len(tokenizer), **TINY)
  policy = init_params(CausalLM(cfg), jax.random.PRNGKey(0))
  config = prm.PRMTrainConfig(steps=60, batch_size=8, learning_rate=2e-3, max_len=256,
                              eval_fraction=0.25, warmup_steps=5)
  params, metrics = prm.train_prm(policy, cfg, tokenizer, rows, config, str(tmp_path),
                                  pad_id=tokenizer.pad_token_id, show_progress=False)
  assert metrics["eval_rows"] > 0 and metrics["train_rows"] > 0
  assert metrics["train/nonfinite"] == 0.0
  # Learned, on prompts never trained on: better than at init and than the trivial
  # predictor (each line scored by the mean label of its position on the training rows),
  # which alone beats fixed thresholds such as AUROC 0.7 on this suite.
  assert metrics["auroc"] > metrics["init/auroc"] + 0.1, metrics
  assert metrics["auroc"] > metrics["position/auroc"], metrics
  assert metrics["line_accuracy"] > metrics["position/line_accuracy"], metrics
  assert metrics["first_error_accuracy"] > metrics["position/first_error_accuracy"], metrics
  written = json.load(open(tmp_path / "metrics.json"))
  assert written["auroc"] == pytest.approx(metrics["auroc"])
  assert len(written["calibration"]) == 10
  assert os.path.getsize(tmp_path / "calibration.png") > 1000
  assert set(params) == {"model", "score"}


def test_train_prm_measures_every_response_of_the_held_out_prompts(tokenizer, tmp_path):
  # Trained on failed responses only (as `revised` selects), the PRM is also scored on
  # every response of the held-out prompts, passing references included: the rows RL's
  # dense rewards score, split by prompt as its own held-out rows are.
  problems = synthetic.make_split(0, 24, range(3, 7))
  failed = [dict(r, passed=False) for r in oracle_rows(problems, 2)]
  passing = [{"problem_id": p.id, "prompt": p.prompt, "response": p.reference,
              "passed": True, "oracle_first_bad": None,
              "line_labels": label_lines([is_trivial_line(l)
                                          for l in split_lines(p.reference)], None)}
             for p in problems]
  cfg = ModelConfig(vocab_size=len(tokenizer), **TINY)
  policy = init_params(CausalLM(cfg), jax.random.PRNGKey(0))
  config = prm.PRMTrainConfig(steps=4, batch_size=8, learning_rate=2e-3, max_len=256,
                              eval_fraction=0.25, warmup_steps=1)
  params, metrics = prm.train_prm(policy, cfg, tokenizer, failed, config, str(tmp_path),
                                  pad_id=tokenizer.pad_token_id, show_progress=False,
                                  all_rows=failed + passing)
  train_all, held_all = prm.split_by_prompt(failed + passing, 0.25, 0)
  _, held_failed = prm.split_by_prompt(failed, 0.25, 0)
  assert metrics["eval_rows"] == len(held_failed)
  assert metrics["responses/rows"] == len(held_all) > len(held_failed)
  assert metrics["responses/passing_share"] == pytest.approx(
      np.mean([r["passed"] for r in held_all])) and metrics["responses/passing_share"] > 0
  scored = prm_metrics_lib.evaluate_prm(params, cfg, tokenizer, held_all, 256, 8,
                                        tokenizer.pad_token_id)
  position = prm_metrics_lib.prm_metrics(
      held_all, position_scores(train_all, held_all))
  for key in prm.QUALITY:
    assert metrics[f"responses/{key}"] == pytest.approx(scored[key]), key
    assert metrics[f"responses_position/{key}"] == pytest.approx(position[key]), key
  # Every held-out prompt has a passing reference and failed responses: all are mixed.
  pick = prm_metrics_lib.within_prompt_pick(
      held_all, prm_metrics_lib.line_scores(params, cfg, tokenizer, held_all, 256, 8,
                                            tokenizer.pad_token_id))
  assert metrics["responses/pick_prompts"] == len({r["problem_id"] for r in held_all})
  assert metrics["responses/pick_passing"] == pytest.approx(pick["pick_passing"])
  assert 0 < metrics["responses/pick_random"] < 1
  assert metrics["responses/auroc"] != pytest.approx(metrics["auroc"])


def test_train_prm_on_a_mesh_matches_single_device(tokenizer, tmp_path):
  from psgpo_jax import sharding
  rows = oracle_rows(synthetic.make_split(2, 10, range(3, 6)), 1)
  cfg = ModelConfig(vocab_size=len(tokenizer), **TINY)
  policy = init_params(CausalLM(cfg), jax.random.PRNGKey(0))
  lr = 1e-3
  config = prm.PRMTrainConfig(steps=3, batch_size=8, learning_rate=lr, max_len=128,
                              eval_fraction=0.0, warmup_steps=1, eval_train_rows=0,
                              adam_eps=ADAM_EPS)
  single, m1 = prm.train_prm(policy, cfg, tokenizer, rows, config, str(tmp_path / "one"),
                             pad_id=tokenizer.pad_token_id, show_progress=False)
  mesh = sharding.make_mesh((2, 2, 2))
  sharded, m2 = prm.train_prm(policy, cfg, tokenizer, rows, config, str(tmp_path / "mesh"),
                              pad_id=tokenizer.pad_token_id, mesh=mesh, show_progress=False)
  kernel = sharded["model"]["layers_0"]["mlp"]["gate_proj"]["kernel"]
  assert len(kernel.sharding.device_set) == 8
  assert kernel.addressable_shards[0].data.size < kernel.size     # really sharded
  # Two steps at <= lr after the warmup step: the Adam bound of tests/tolerances.py.
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=adam_param_atol(lr, updates=2))
  # A mean loss over the batch's line ends after those steps: rounding plus the params'
  # bounded drift.
  assert m1["train/loss"] == pytest.approx(m2["train/loss"], rel=1e-4)


def test_train_batches_are_full_and_cover_every_example():
  examples = [prm_batches.PRMExample((1,), (2, 3), (1,), (1,), (1,), i) for i in range(7)]
  batches = prm_batches.train_batches(examples, 3, 0, (8,), np.random.default_rng(0))
  seen = []
  for _ in range(14):                   # 7 epochs of 2 full batches each
    rows = next(batches)["row_index"].tolist()
    assert -1 not in rows and len(set(rows)) == 3
    seen += rows
  assert set(seen) == set(range(7))
  small = prm_batches.train_batches(examples[:2], 4, 0, (8,), np.random.default_rng(0))
  assert sorted(next(small)["row_index"].tolist()) == [-1, -1, 0, 1]


def test_position_baseline_scores_each_line_by_its_index_mean():
  from psgpo_jax.prm.baselines import position_means  # pylint: disable=import-outside-toplevel
  train = [{"line_labels": [1, 1, -1]}, {"line_labels": [1, -1]}, {"line_labels": [1, 0, 1, -1]}]
  assert position_means(train) == pytest.approx([1.0, 0.0, 0.0, -1.0])
  assert position_scores(train, [{"line_labels": [1, 1, 1, 1, 1]}, {"line_labels": []}]) == \
      [[1.0, 0.0, 0.0, -1.0, -1.0], []]


def test_train_prm_resumes_from_its_checkpoint_to_the_same_params(tokenizer, tmp_path,
                                                                  capsys):
  """A run that finds a checkpoint (step 3 of 6) continues from it, with the batches and
  step keys of the uninterrupted run, and ends with its params."""
  rows = oracle_rows(synthetic.make_split(2, 10, range(3, 6)), 1)
  cfg = ModelConfig(vocab_size=len(tokenizer), **TINY)
  policy = init_params(CausalLM(cfg), jax.random.PRNGKey(0))
  config = prm.PRMTrainConfig(steps=6, batch_size=4, learning_rate=1e-3, max_len=128,
                              eval_fraction=0.0, eval_train_rows=0)
  ckpt = str(tmp_path / "checkpoints")
  run = lambda out: prm.train_prm(policy, cfg, tokenizer, rows, config,   # noqa: E731
                                  str(tmp_path / out), pad_id=tokenizer.pad_token_id,
                                  show_progress=False, checkpoint_dir=ckpt, checkpoint_every=3)
  whole, _ = run("whole")                 # leaves the checkpoint of step 3
  assert os.listdir(ckpt) == ["3"]
  resumed, _ = run("resumed")
  assert "[prm] resumed from the checkpoint of step 3" in capsys.readouterr().out
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)


def test_response_score_is_the_lowest_line_score(tokenizer):
  """`scoring.response_scores` (one PRM score per sampled response, for Best-of-K by the
  PRM's pick) = the minimum of the held-out metrics' per-line scores, computed through
  the PRM example batches instead; a response without lines scores -1."""
  rows = oracle_rows(synthetic.make_split(3, 6, range(2, 6)), 1)
  cfg = ModelConfig(vocab_size=len(tokenizer), **TINY)
  params = init_params(ScalarModel(cfg), jax.random.PRNGKey(4))
  prompts = [prm_batches.encode(tokenizer, r["prompt"]) for r in rows]
  responses = [prm_batches.encode(tokenizer, r["response"]) for r in rows]
  got = prm_scoring.response_scores(params, cfg, tokenizer, prompts + prompts[:1],
                                    responses + [[]], rows_per_call=4)
  per_line = prm_metrics_lib.line_scores(params, cfg, tokenizer, rows, 256, 4,
                                         tokenizer.pad_token_id)
  np.testing.assert_allclose(got[:-1], [min(s) for s in per_line], atol=1e-5)
  assert got[-1] == -1.0 and len(set(np.round(got[:-1], 4))) > 1
