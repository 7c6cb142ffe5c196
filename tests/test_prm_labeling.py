"""Binary-search PRM labels: search logic vs a linear scan, batching, selection, shards."""
from __future__ import annotations

import itertools
import json
import math
import os

import numpy as np
import pytest

from psgpo_jax.lines import is_trivial_line, split_lines
from psgpo_jax.prm import collect, labeler, search, select, shards
from psgpo_jax.sampling_config import from_pipeline_config


# ----------------------------------------------------------------------------- lines


def test_split_lines_keeps_text_and_counts_lines():
  for text, count in [("", 0), ("a", 1), ("a\n", 1), ("a\nb", 2), ("a\n\nb\n", 3),
                      ("\n", 1), ("a\n\n", 2)]:
    lines = split_lines(text)
    assert "".join(lines) == text
    assert len(lines) == count
    assert all(l.endswith("\n") for l in lines[:-1])


def test_trivial_lines_and_prefix_ends_at_step_line():
  lines = split_lines("    a = x\n\n    # note\n    b = a\n    return b\n")
  trivial = [is_trivial_line(l) for l in lines]
  assert trivial == [False, True, True, False, False]
  steps = search.step_line_indices(trivial, skip_trivial_lines=True)
  assert steps == [0, 3, 4]
  assert search.prefix_text(lines, steps, 0) == ""
  assert search.prefix_text(lines, steps, 1) == "    a = x\n"
  assert search.prefix_text(lines, steps, 2) == "    a = x\n\n    # note\n    b = a\n"
  assert search.step_line_indices(trivial, skip_trivial_lines=False) == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------- search


@pytest.mark.parametrize("n", range(0, 14))
def test_binary_search_equals_linear_scan_for_every_monotone_prefix_function(n):
  worst = 0
  # Monotone: prefixes shorter than t are correct, t and longer fail (prefix n fails).
  for t in range(1, max(n, 1) + 1):
    correct = lambda m, t=t: m < t
    first, probes = search.search_first_bad(n, correct)
    linear_first, linear_probes = search.linear_first_bad(n, correct)
    assert first == linear_first == (t - 1 if n else 0)
    assert probes <= math.ceil(math.log2(n + 1))
    assert probes <= search.max_probes(n)
    assert linear_probes <= max(n - 1, 0)
    worst = max(worst, probes)
  assert worst == search.max_probes(n)  # the bound is tight


@pytest.mark.parametrize("n", range(1, 11))
def test_binary_search_finds_a_boundary_for_any_prefix_function(n):
  # Without monotonicity the answer is still a real boundary: the prefix before the first
  # bad step is correct (or empty) and the one that includes it fails.
  for bits in itertools.product([False, True], repeat=n - 1):
    correct_table = (True,) + bits + (False,)
    first, probes = search.search_first_bad(n, lambda m: correct_table[m])
    assert correct_table[first] and not correct_table[first + 1]
    assert probes <= search.max_probes(n)


def test_update_rejects_a_probe_outside_the_interval():
  state = search.new_search(8)
  assert search.next_probe(state) == 4
  state = search.update(state, 4, passes=3)
  assert (state.lo, state.hi) == (4, 8)
  assert state.trace == ((4, 3),)
  with pytest.raises(ValueError):
    search.update(state, 2, passes=0)


def test_label_lines_marks_trivial_lines_zero():
  trivial = [False, True, False, False, True, False]
  assert search.label_lines(trivial, None) == [1, 0, 1, 1, 0, 1]
  assert search.label_lines(trivial, 2) == [1, 0, 1, -1, 0, -1]
  assert search.label_lines(trivial, 0) == [-1, 0, -1, -1, 0, -1]
  assert search.label_lines(trivial, 2, skip_trivial_lines=False) == [1, 1, -1, -1, -1, -1]


# ----------------------------------------------------------------------------- batches


def _threshold_probe(thresholds, calls):
  """A deterministic monotone correctness rule per response: prefix m correct iff m < t.

  Records each round's jobs in `calls`. Returns 3 "passing completions" for a correct
  prefix, so the count is passed through to the trace.
  """
  def probe(jobs):
    calls.append(list(jobs))
    return [3 if job.m < thresholds[job.index] else 0 for job in jobs]
  return probe


def _body(n_lines, trivial_every=0):
  lines = []
  for i in range(n_lines):
    lines.append(f"    v{i} = {i}\n")
    if trivial_every and i % trivial_every == trivial_every - 1:
      lines.append("    # comment\n")
  return "".join(lines)


def test_label_batch_advances_all_searches_together_and_matches_linear_scan():
  responses = [_body(n, trivial_every=3) for n in (1, 2, 5, 9, 16, 7, 0)]
  passed = [False, False, False, False, False, True, False]
  thresholds = [1, 2, 3, 9, 1, 99, 1]
  problems = [f"p{i}" for i in range(len(responses))]
  calls = []
  config = labeler.LabelingConfig(completions=5, skip_trivial_lines=True)
  rows = labeler.label_batch(problems, responses, passed, _threshold_probe(thresholds, calls),
                         config)
  # One probe_fn call per round; rounds = ceil(log2(max steps)) = ceil(log2 16) = 4.
  assert len(calls) == 4
  # Each round has at most one job per response, and every job's prefix ends at a step.
  for jobs in calls:
    assert len({j.index for j in jobs}) == len(jobs)
    for job in jobs:
      assert job.prefix.endswith(f"v{job.m - 1} = {job.m - 1}\n")
      assert job.problem == problems[job.index]
  for i, row in enumerate(rows):
    assert "".join(row["lines"]) == responses[i]
    n_steps = sum(not t for t in row["trivial"])
    if passed[i]:
      assert not row["searched"] and row["completions_spent"] == 0
      assert all(y == (0 if t else 1) for y, t in zip(row["line_labels"], row["trivial"]))
      continue
    expected_first, _ = search.linear_first_bad(n_steps, lambda m, t=thresholds[i]: m < t)
    assert row["first_bad_step"] == expected_first
    assert row["line_labels"] == search.label_lines(row["trivial"], expected_first)
    assert row["rounds"] == len(row["trace"]) <= search.max_probes(n_steps)
    assert row["completions_spent"] == 5 * row["rounds"]
    assert [t["round"] for t in row["trace"]] == list(range(row["rounds"]))
    if n_steps:
      assert not row["trivial"][row["first_bad"]]
      assert row["line_labels"][row["first_bad"]] == -1
  assert rows[6]["line_labels"] == [] and rows[6]["first_bad"] is None


def test_label_batch_without_search_flag_leaves_rows_unlabeled():
  calls = []
  rows = labeler.label_batch(["p", "q"], [_body(4), _body(4)], [False, False],
                         _threshold_probe([2, 2], calls), labeler.LabelingConfig(),
                         search=[False, True])
  assert rows[0]["line_labels"] is None and not rows[0]["searched"]
  assert rows[1]["line_labels"] == [1, -1, -1, -1]
  assert all(j.index == 1 for jobs in calls for j in jobs)


# ----------------------------------------------------------------------------- selection


def _row(pid, passed, first_bad_step, labels):
  return {"problem_id": pid, "passed": passed, "first_bad_step": first_bad_step,
          "searched": not passed, "line_labels": labels}


def test_selection_modes_and_uniform_prompt_drop():
  rows = [_row("a", True, None, [1, 1]), _row("a", False, 0, [-1, -1]),
          _row("a", False, 1, [1, -1]), _row("b", False, 2, [1, 1, -1]),
          _row("b", False, 1, [1, -1]), _row("c", True, None, [1])]
  assert select.select_rows(rows, "all") == [True] * 6
  assert select.select_rows(rows, "failed") == [False, True, True, True, True, False]
  assert select.select_rows(rows, "revised") == [False, False, True, True, True, False]
  # b (all fail) and c (all pass) are uniform prompts.
  assert select.select_rows(rows, "all", drop_uniform_prompts=True) == [True, True, True,
                                                                     False, False, False]
  unlabeled = dict(_row("d", False, None, None), searched=False)
  assert select.select_rows([unlabeled], "all") == [False]


def test_balance_lines_equalises_positive_and_negative_lines():
  rows = [_row("a", True, None, [1, 1, 0, 1]), _row("b", False, 1, [1, -1, -1]),
          _row("c", True, None, [1, 1, 1, 1, 1])]
  balanced = select.balance_lines(rows, seed=3)
  counts = select.label_counts(balanced)
  assert counts["positive_lines"] == counts["negative_lines"] == 2
  assert counts["trivial_lines"] == 1
  assert all(u == 1 for row in balanced for y, u in zip(row["line_labels"], row["line_used"])
             if y <= 0)
  assert select.balance_lines(rows, seed=3) == balanced  # deterministic


# ----------------------------------------------------------------------------- shards


def test_shards_are_written_atomically_and_listed(tmp_path):
  out = str(tmp_path)
  shards.write_shard(out, 0, [{"x": 1, "selected": True}])
  shards.write_shard(out, 2, [{"x": 2, "selected": False}, {"x": 3, "selected": True}])
  # A partial temp file of a batch in flight is not a shard.
  with open(os.path.join(out, "labels-00001.jsonl.tmp"), "w") as f:
    f.write('{"x": ')
  assert shards.shard_indices(out) == [0, 2]
  assert [r["x"] for r in shards.load_labels(out)] == [1, 3]
  assert [r["x"] for r in shards.load_labels(out, selected_only=False)] == [1, 2, 3]


# ----------------------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def problems():
  from psgpo_jax.data import synthetic
  return synthetic.make_split(0, 12, range(3, 10))


@pytest.fixture(scope="module")
def pool():
  from psgpo_jax import sandbox
  with sandbox.Sandbox(2) as sb:
    yield sb


def _reference_completer_probe(run_many, calls=None):
  """A perfect completer: after prefix m, the reference's remaining lines; then the tests.

  The prefix is correct iff prefix + the rest of the reference passes in the sandbox.
  """
  from psgpo_jax.data import synthetic_oracle

  def probe(jobs):
    if calls is not None:
      calls.append(len(jobs))
    programs = []
    for job in jobs:
      ref = synthetic_oracle.response_lines(job.problem.reference)
      n_prefix = len(split_lines(job.prefix))
      rest = "".join(l + "\n" for l in ref[n_prefix:])
      programs.append((job.problem.program(job.prefix + rest), job.problem.tests))
    return [int(r.passed) for r in run_many(programs)]
  return probe


def test_search_with_a_perfect_completer_finds_the_oracle_first_error(problems, pool):
  from psgpo_jax.data import synthetic_corpus, synthetic_oracle
  rng = np.random.default_rng(0)
  responses, truth = [], []
  for p in problems:
    response, first = synthetic_corpus.corrupt_response(p, rng)
    responses.append(response)
    truth.append(first)
  outcomes = [bool(r.passed) for r in pool.run_many(
      [(p.program(r), p.tests) for p, r in zip(problems, responses)])]
  # A wrong line the tests cannot see leaves a passing response: nothing to search.
  failing = [i for i, ok in enumerate(outcomes) if not ok]
  assert len(failing) >= len(problems) // 2
  problems = [problems[i] for i in failing]
  responses, truth = [responses[i] for i in failing], [truth[i] for i in failing]
  outcomes = [False] * len(failing)
  calls = []
  rows = labeler.label_batch(problems, responses, outcomes,
                         _reference_completer_probe(pool.run_many, calls),
                         labeler.LabelingConfig(completions=1))
  assert [r["first_bad"] for r in rows] == truth
  assert all(r["first_bad"] == synthetic_oracle.first_error_line(p, r["response"])
             for p, r in zip(problems, rows))
  max_lines = max(len(r["lines"]) for r in rows)
  assert len(calls) == max(r["rounds"] for r in rows)
  assert len(calls) <= search.max_probes(max_lines) <= math.ceil(math.log2(max_lines + 1))
  linear = sum(len(r["lines"]) - 1 for r in rows)
  assert sum(r["completions_spent"] for r in rows) < linear


def test_oracle_labeler_equals_the_perfect_completer(problems, pool):
  """`collect.labeler = oracle` answers each probe from the first-error oracle; it must
  give the labels of a perfect completer that really runs the prefix + the reference's
  remaining lines in the sandbox, including recoverable (+1) prefixes."""
  from psgpo_jax.data import synthetic_corpus, synthetic_oracle
  rng = np.random.default_rng(1)
  responses = [synthetic_corpus.corrupt_response(p, rng)[0] for p in problems]
  outcomes = [bool(r.passed) for r in pool.run_many(
      [(p.program(r), p.tests) for p, r in zip(problems, responses)])]
  config = labeler.LabelingConfig(completions=1, labeler="oracle")
  exact = labeler.label_batch(problems, responses, outcomes,
                          labeler.oracle_probe(synthetic_oracle.first_error_line), config)
  ran = labeler.label_batch(problems, responses, outcomes,
                        _reference_completer_probe(pool.run_many), config)
  assert [r["line_labels"] for r in exact] == [r["line_labels"] for r in ran]
  searched = [r for r in exact if r["searched"]]
  assert searched and any(r["first_bad_step"] > 0 for r in searched)   # +1 lines exist
  with pytest.raises(ValueError, match="collect.labeler='nope'"):
    labeler.LabelingConfig(labeler="nope")


def _respond_fn(run_many, batch_calls, crash_at=None):
  """Per prompt: the reference and one corrupted response (deterministic per id), tested."""
  from psgpo_jax.data import synthetic_corpus

  def respond(b, batch):
    batch_calls.append(b)
    if crash_at is not None and b == crash_at:
      raise RuntimeError("crash in batch %d" % b)
    responses, owners = [], []
    for p in batch:
      seed = int(p.id.rsplit("/", 1)[-1])
      bad, _ = synthetic_corpus.corrupt_response(p, np.random.default_rng(seed))
      responses += [p.reference, bad]
      owners += [p, p]
    results = run_many([(p.program(r), p.tests) for p, r in zip(owners, responses)])
    return responses, [r.passed for r in results], [{"k": i} for i in range(len(responses))]
  return respond


def test_collection_is_resumable_and_reports_cost_and_oracle_agreement(problems, pool,
                                                                       tmp_path):
  from psgpo_jax.data import synthetic_oracle
  config = labeler.LabelingConfig(completions=1, responses_per_prompt=2, batch_responses=6,
                              selection="revised")
  probe_for_batch = lambda b: _reference_completer_probe(pool.run_many)
  crashed = str(tmp_path / "crashed")
  calls = []
  with pytest.raises(RuntimeError):
    collect.run_collection(problems, _respond_fn(pool.run_many, calls, crash_at=2),
                       probe_for_batch, config, crashed,
                       oracle_fn=synthetic_oracle.first_error_line)
  assert shards.shard_indices(crashed) == [0, 1]
  calls.clear()
  stats = collect.run_collection(problems, _respond_fn(pool.run_many, calls), probe_for_batch,
                             config, crashed, oracle_fn=synthetic_oracle.first_error_line)
  assert calls == [2, 3]                       # finished batches were not redone
  clean = str(tmp_path / "clean")
  collect.run_collection(problems, _respond_fn(pool.run_many, []), probe_for_batch, config,
                     clean, oracle_fn=synthetic_oracle.first_error_line)
  timeless = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_seconds")}
                           for r in rows]
  for index in range(4):
    assert (timeless(shards.read_shard(shards.shard_path(crashed, index)))
            == timeless(shards.read_shard(shards.shard_path(clean, index))))
  rows = shards.load_labels(crashed, selected_only=False)
  assert len(rows) == stats["responses"] == 24
  failing = [r for r in rows if not r["passed"]]
  assert all(r["passed"] for r in rows[::2])             # the references
  assert stats["searched"] == len(failing) >= 6
  assert stats["pass_rate"] == pytest.approx(1 - len(failing) / 24)
  # A perfect completer recovers exactly the prefixes before the corrupted line.
  assert stats["oracle_first_bad_agreement"] == 1.0
  assert stats["completions"] == sum(r["completions_spent"] for r in rows)
  assert stats["completions"] < stats["linear_scan_completions"]
  assert stats["wall_seconds"] > 0
  assert json.load(open(os.path.join(crashed, collect.STATS_FILE)))["responses"] == 24
  for row in rows:
    assert row["problem_id"] and row["prompt"] and "k" in row
    assert row["selected"] == (not row["passed"] and row["first_bad_step"] > 0)
    assert len(row["line_labels"]) == len(row["lines"])


def test_agreement_by_k_grows_with_k_for_a_noisy_completer(problems):
  from psgpo_jax.data import synthetic_corpus, synthetic_oracle
  rng = np.random.default_rng(1)
  responses = [synthetic_corpus.corrupt_response(p, rng)[0] for p in problems]

  # Each completion of a recoverable prefix succeeds with probability 0.3 (a weak
  # completer); an unrecoverable prefix never succeeds.
  def outcomes(jobs):
    out = []
    for job in jobs:
      ok = synthetic_oracle.first_error_line(job.problem, job.prefix) == len(
          split_lines(job.prefix))
      out.append(list(rng.random(16) < 0.3) if ok else [False] * 16)
    return out

  report = labeler.label_agreement_by_k(problems, responses, outcomes,
                                    synthetic_oracle.first_error_line, ks=(1, 4, 16))
  assert [r["k"] for r in report] == [1, 4, 16]
  agreement = [r["first_bad_agreement"] for r in report]
  assert agreement[0] < agreement[2] and agreement[2] >= 0.9
  # A missed recoverable prefix blames an earlier line: the offset is <= 0 and shrinks.
  assert report[0]["mean_first_bad_minus_oracle"] < report[2]["mean_first_bad_minus_oracle"] <= 0
  # Label noise against the oracle: K = 1 misses a recoverable prefix 70% of the time,
  # K = 16 almost never (0.7^16); the completer never rescues an unrecoverable prefix.
  misses = [r["probe_false_fail_share"] for r in report]
  assert 0.5 < misses[0] < 0.9 and misses[2] < 0.05
  assert all(r["probe_false_pass_share"] == 0.0 for r in report)


def test_probe_outcomes_against_the_oracle_count_both_kinds_of_label_noise():
  # 4 step lines (line 1 a comment), the oracle's first wrong line is line 3 (step 2):
  # prefixes of <= 2 steps are right.
  row = {"searched": True, "trivial": [False, True, False, False, False], "lines": [""] * 5,
         "first_bad": 3, "oracle_first_bad": 3, "line_labels": [1, 0, 1, -1, -1],
         "trace": [{"m": 2, "passes": 0},     # right prefix, every completion failed
                   {"m": 1, "passes": 3},     # right prefix, passed
                   {"m": 3, "passes": 1},     # wrong prefix, a completion passed
                   {"m": 4, "passes": 0}]}    # wrong prefix, failed
  stats = labeler._agreement([row])  # pylint: disable=protected-access
  assert stats["probe_outcomes"] == 4
  assert stats["probe_false_fail_share"] == 0.5 and stats["probe_false_pass_share"] == 0.5
  assert stats["oracle_first_bad_agreement"] == 1.0


# ----------------------------------------------------------------------------- production


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
  import jax
  from psgpo_jax.data import synthetic_corpus
  from psgpo_jax.models import CausalLM, ModelConfig, init_params
  from psgpo_jax.tokenization import load_tokenizer
  tokenizer = load_tokenizer(synthetic_corpus.build_tokenizer(str(tmp_path_factory.mktemp("tok"))))
  cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id)
  return cfg, init_params(CausalLM(cfg), jax.random.PRNGKey(0)), tokenizer


def test_policy_probe_samples_k_completions_per_prefix_in_one_call(problems, pool,
                                                                   tiny_policy):
  import jax
  from configs import base
  from psgpo_jax.data import synthetic_corpus
  cfg, params, tokenizer = tiny_policy
  config = base.get_config()
  config.sampling.max_new_tokens = 8
  sampling = from_pipeline_config(config, tokenizer, num_samples=3, temperature=1.0)
  seen = []

  def run_many(jobs):
    seen.extend(jobs)
    return pool.run_many(jobs)

  probe = collect.PolicyProbe(params, cfg, tokenizer, sampling, run_many, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  jobs = []
  for i, p in enumerate(problems[:4]):
    lines = split_lines(synthetic_corpus.corrupt_response(p, rng)[0])
    jobs.append(search.PrefixJob(i, p, "".join(lines[:1 + i % 2]), 1 + i % 2))
  outcomes = probe.outcomes(jobs)
  assert probe.calls == 1 and probe.completions == len(seen) == 12
  assert [len(o) for o in outcomes] == [3, 3, 3, 3]
  for j, job in enumerate(jobs):
    for program, tests in seen[3 * j:3 * j + 3]:
      assert program.startswith(job.problem.program(job.prefix)) and tests == job.problem.tests
  # The reference completion of a correct prefix passes; random completions here cannot
  # make a corrupted function body pass all six tests, so outcomes are all False.
  assert not any(any(o) for o in outcomes)


def test_collect_labels_end_to_end_with_sampler_and_sandbox(problems, tiny_policy, pool,
                                                           tmp_path):
  import jax
  from configs import quickstart
  cfg, params, tokenizer = tiny_policy
  config = quickstart.get_config()
  config.collect.num_prompts = 4
  config.collect.responses_per_prompt = 2
  config.collect.completions = 2
  config.collect.batch_responses = 4
  config.collect.selection = "failed"
  config.sampling.max_new_tokens = 16
  out = str(tmp_path / "collect")
  labeling = labeler.LabelingConfig.from_config(config)
  sampling = from_pipeline_config(config, tokenizer, 1)
  collect_four = lambda: collect.collect_labels(                        # noqa: E731
      params, cfg, tokenizer, problems[:4], labeling, sampling, out, jax.random.PRNGKey(3),
      run_many_fn=pool.run_many, agreement_ks=(1, 2))
  stats = collect_four()
  rows = shards.load_labels(out, selected_only=False)
  assert shards.shard_indices(out) == [0, 1] and len(rows) == stats["responses"] == 8
  assert [r["problem_id"] for r in rows] == [p.id for p in problems[:4] for _ in range(2)]
  for row in rows:
    assert len(row["line_end_token_indices"]) == len(row["lines"]) == len(row["line_labels"])
    assert row["completions_spent"] == 2 * len(row["trace"])
    assert "oracle_first_bad" in row and row["tests_total"] == 6
  assert stats["completions"] == sum(r["completions_spent"] for r in rows)
  assert [r["k"] for r in stats["agreement_by_k"]] == [1, 2]
  assert os.path.exists(os.path.join(out, "agreement_by_k.json"))
  # A second call finds everything done and recomputes nothing.
  again = collect_four()
  assert again["batches_run_now"] == 0 and again["responses"] == 8
