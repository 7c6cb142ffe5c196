"""The synthetic long-horizon suite: generation, oracle, noisy warm-up data, tokenizer."""
from __future__ import annotations

import os

import numpy as np
import pytest

from psgpo_jax.data import synthetic as S
from psgpo_jax.data import synthetic_corpus as corpus
from psgpo_jax.data import synthetic_oracle as oracle
from psgpo_jax.data.record import Problem
from psgpo_jax.sandbox.spec import AssertTests

HORIZONS = range(1, 13)


@pytest.fixture(scope="module")
def train():
  return S.make_split(0, 96, HORIZONS, "train")


@pytest.fixture(scope="module")
def held_out():
  return S.make_split(0, 48, HORIZONS, "test")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  return corpus.build_tokenizer(str(tmp_path_factory.mktemp("tok")), seed=0)


def run_jobs(jobs):
  from psgpo_jax.sandbox import run_many
  return run_many(jobs)


def test_prompt_response_format(train):
  p = train[5]
  h = p.metadata["horizon"]
  assert p.prompt.startswith("def f(x, y):\n    \"\"\"\n") and p.prompt.endswith('    """\n')
  assert p.program_prefix == p.prompt and p.entry_point == "f" and p.source == "synthetic"
  lines = oracle.response_lines(p.reference)
  assert len(lines) == h == len(p.metadata["steps"])
  assert p.reference == "".join(line + "\n" for line in lines)
  assert all(line.startswith("    ") and not line[4].isspace() for line in lines)
  assert lines[-1].startswith("    return ")
  assert not any(line.startswith("    return") for line in lines[:-1])
  docstring = p.prompt.split('"""')[1].strip().split("\n")
  assert [d.strip() for d in docstring] == p.metadata["steps"]
  assert isinstance(p.tests, AssertTests) and len(p.tests.tests) == S.NUM_TEST_INPUTS
  assert all(t.startswith("assert f(") for t in p.tests.tests)


def test_step_k_maps_to_line_k(train):
  """Step k and line k align word for token; line k assigns the k-th local."""
  for p in train:
    lines = oracle.response_lines(p.reference)
    for k, (spec, line) in enumerate(zip(p.metadata["steps"], lines)):
      assert line.split() == [S.WORDS.get(w, w) for w in spec.split()]
      if k < len(lines) - 1:
        assert line.split()[:2] == [S.LOCALS[k], "="]


def test_suite_covers_its_grammar(train):
  lines = [l for p in train for l in oracle.response_lines(p.reference)]
  for needle in (" + ", " - ", " * ", " // ", " % ", " > ", " < ", " if ", " else "):
    assert any(needle in l for l in lines), needle
  assert sum(" if " in l for l in lines) > 0.1 * len(lines)


def test_deterministic_and_seed_dependent():
  a = S.make_split(3, 24, HORIZONS, "train")
  b = S.make_split(3, 24, HORIZONS, "train")
  c = S.make_split(4, 24, HORIZONS, "train")
  assert a == b
  assert [p.prompt for p in a] != [p.prompt for p in c]


def test_splits_never_share_a_spec(train, held_out):
  train_specs = {p.prompt for p in train}
  held_specs = {p.prompt for p in held_out}
  assert not train_specs & held_specs
  assert len(train_specs) == len(train) and len(held_specs) == len(held_out)
  assert all(p.metadata["split"] == "train" for p in train)
  assert all(p.metadata["split"] == "test" for p in held_out)
  # Another seed's held-out problems still avoid every training spec.
  other = S.make_split(11, 48, HORIZONS, "test")
  assert not {p.prompt for p in other} & train_specs


def test_horizon_control():
  problems = S.make_split(1, 12, horizons=range(4, 13))
  assert [p.metadata["horizon"] for p in problems] == [4, 5, 6, 7, 8, 9, 10, 11, 12, 4, 5, 6]
  long = S.make_split(2, 3, horizons=[S.MAX_HORIZON])
  assert all(len(oracle.response_lines(p.reference)) == S.MAX_HORIZON for p in long)
  with pytest.raises(ValueError):
    S.make_split(0, 1, horizons=[0])
  with pytest.raises(ValueError, match="spec space"):
    S.make_split(0, 400, horizons=[1])          # horizon 1 has about a hundred specs


def test_references_pass_and_outputs_are_consistent(train, held_out):
  problems = train + held_out
  results = run_jobs([(p.program(p.reference), p.tests) for p in problems])
  assert all(r.passed for r in results), [r for r in results if not r.passed][:3]
  for p in problems:
    lines = oracle.response_lines(p.reference)
    for pair, out in zip(p.metadata["inputs"], p.metadata["outputs"]):
      assert oracle.run_reference(lines, dict(zip(S.ARGS, pair))) == out
      assert all(abs(v) <= S.MAX_ABS_VALUE for v in p.metadata["outputs"])


def test_oracle_exact_on_reference_and_corruptions(train):
  rng = np.random.default_rng(0)
  for p in train:
    assert oracle.first_error_line(p, p.reference) is None
    assert oracle.line_correctness(p, p.reference) == [True] * p.metadata["horizon"]
    for k in range(p.metadata["horizon"]):
      response, index = corpus.corrupt_response(p, rng, index=k)
      assert index == k
      assert oracle.first_error_line(p, response) == k
      assert oracle.line_correctness(p, response) == [j < k for j in range(p.metadata["horizon"])]
      assert len(oracle.response_lines(response)) == p.metadata["horizon"]


def _problem(reference_lines, inputs=((1, 2), (5, 3), (9, 9), (0, 7), (4, 1), (8, 2))):
  """A hand-written problem of the suite's shape."""
  lines = [oracle.INDENT + c for c in reference_lines]
  outputs = [oracle.run_reference(lines, dict(zip(S.ARGS, i))) for i in inputs]
  return Problem(id="hand", prompt="", tests=AssertTests(()), reference=S.format_response(
      reference_lines), source="synthetic",
      metadata={"horizon": len(lines), "args": ["x", "y"], "inputs": [list(i) for i in inputs],
                "outputs": outputs})


def test_oracle_accepts_equivalent_lines_and_rejects_everything_else(tmp_path):
  p = _problem(["a = x + 3", "b = max(a, y)", "c = b - 4 if a > 6 else y", "d = c % 5",
                "e = abs(d - x)", "return e * b"])
  ok = S.format_response(["a = 3 + x", "b = max(y, a)", "c = y\n    if a > 6: c = b - 4",
                          "d = c % 5", "e = abs(x - d)", "return b * e"])
  assert oracle.first_error_line(p, ok) == 2                # two lines for one step: misaligned
  ok = S.format_response(["a = 3 + x", "b = max(y, a)", "c = y if 6 >= a else b - 4",
                          "d = c % 5", "e = abs(x - d)", "return b * e"])
  assert oracle.first_error_line(p, ok) is None
  assert oracle.first_error_line(p, "    a = x + 3\n    a += 0\n") == 1       # b missing
  ref = oracle.response_lines(p.reference)

  def with_line(k, text):
    lines = list(ref)
    lines[k] = text
    return "\n".join(lines) + "\n"

  marker = tmp_path / "pwned"
  bad_lines = [
      "    a = x + 4",                                   # wrong value
      "  a = x + 3",                                     # wrong indentation
      "     a = x + 3",
      "\ta = x + 3",
      "    a = x +",                                     # syntax error
      "    a = x + 3; b = 1",                            # two statements
      "    import os",                                   # outside the grammar
      f"    a = __import__('os').system('touch {marker}')",
      f"    a = open('{marker}', 'w').write('x')",
      "    a = x.__class__",
      "    a = [x][0]",
      "    a = x ** 3",
      "    a = 3.5",
      "    a = z + 3",                                     # undefined name
      "    return x + 3",                                  # early return
      "    a = x + 3 if x > 100 else x // 0",               # division by zero when run
  ]
  for text in bad_lines:
    assert oracle.first_error_line(p, with_line(0, text)) == 0, text
  # A comment or blank line in place of a step is neutral: the step is missing, so the
  # next code line (which reads `a`) is the first wrong one.
  for text in ("    # a comment", ""):
    assert oracle.first_error_line(p, with_line(0, text)) == 1, repr(text)
  assert not marker.exists()
  assert oracle.first_error_line(p, with_line(1, "    b = 10**20")) == 1
  # Extra line after the return; missing lines; trailing blank lines are ignored.
  assert oracle.first_error_line(p, p.reference + "    return 0\n") == len(ref)
  assert oracle.first_error_line(p, "".join(l + "\n" for l in ref[:3])) == 3
  assert oracle.first_error_line(p, "") == 0
  assert oracle.first_error_line(p, p.reference + "\n   \n") is None
  # Only values still needed count: clobbering x after its last use is fine.
  q = _problem(["a = x + y", "b = a * 2", "return b - a"])
  assert oracle.first_error_line(q, "    a = x + y\n    b = a * 2\n    return b - a\n") is None
  assert oracle.first_error_line(q, "    a = x + y\n    x = 0\n") == 1          # b never set
  assert oracle.first_error_line(
      q, "    a = x + y\n    b, x = a * 2, 0\n    return b - a\n") is None
  assert oracle.first_error_line(
      q, "    x = x + y\n    b = x * 2\n    return b - x\n") == 0       # a never set
  assert oracle.first_error_line(
      q, "    a = x + y\n    b = a + a\n    if b > 999: b = 0\n") == 2


def test_oracle_agrees_with_the_tests(train):
  """A response the oracle accepts passes; single wrong lines almost always fail."""
  rng = np.random.default_rng(1)
  cases = []
  for p in train:
    response, _ = corpus.corrupt_response(p, rng)
    cases.append((p, response))
  results = run_jobs([(p.program(r), p.tests) for p, r in cases])
  failed = [not r.passed for r in results]
  assert np.mean(failed) > 0.9, np.mean(failed)


def test_weak_policy_pass_rate_falls_with_horizon():
  problems = S.make_split(5, 120, horizons=[2, 12])
  pairs = corpus.sft_corpus(problems, noise=0.1, seed=0)
  solved = {2: [], 12: []}
  for p, (prompt, response) in zip(problems, pairs):
    assert prompt == p.prompt
    solved[p.metadata["horizon"]].append(oracle.is_correct(p, response))
  assert np.mean(solved[12]) < np.mean(solved[2]) - 0.3


def test_sft_corpus_noise(train):
  clean = corpus.sft_corpus(train, noise=0.0)
  assert clean == [(p.prompt, p.reference) for p in train]
  noisy = corpus.sft_corpus(train, noise=0.3, seed=2)
  assert noisy == corpus.sft_corpus(train, noise=0.3, seed=2)
  total = changed = 0
  for p, (_, response) in zip(train, noisy):
    ref, got = oracle.response_lines(p.reference), oracle.response_lines(response)
    assert len(got) == len(ref)
    total += len(ref)
    changed += sum(a != b for a, b in zip(ref, got))
    first = next((k for k, (a, b) in enumerate(zip(ref, got)) if a != b), None)
    assert oracle.first_error_line(p, response) == first
  assert 0.2 < changed / total < 0.4
  with pytest.raises(ValueError):
    corpus.sft_corpus(train, noise=1.5)


def test_tokenizer_round_trip_and_lengths(tokenizer_dir, train):
  from transformers import AutoTokenizer

  tok = AutoTokenizer.from_pretrained(tokenizer_dir)
  assert tok.eos_token == tok.pad_token == "<|endoftext|>"
  assert tok.eos_token_id == tok.pad_token_id
  assert len(tok) <= 512
  long = S.make_split(7, 16, horizons=[12])
  for p in train + long:
    text = p.prompt + p.reference
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    # Newlines are tokens of their own: prompt and response tokenize the same apart.
    assert tok(p.prompt)["input_ids"] + tok(p.reference)["input_ids"] == ids
    assert len(ids) + 1 <= 256
  h12 = [len(tok(p.prompt + p.reference)["input_ids"]) for p in long]
  assert 150 < np.mean(h12) < 240
  assert tok.decode(tok("caf\u00e9 \u2603 {x}")["input_ids"]) == "caf\u00e9 \u2603 {x}"
  eos = tok("    return a\n<|endoftext|>")["input_ids"]
  assert eos[-1] == tok.eos_token_id


def test_build_tokenizer_is_idempotent(tokenizer_dir):
  path = os.path.join(tokenizer_dir, "tokenizer.json")
  before = os.path.getmtime(path), open(path).read()
  assert corpus.build_tokenizer(tokenizer_dir, seed=0) == tokenizer_dir
  assert (os.path.getmtime(path), open(path).read()) == before


def test_comment_and_blank_lines_are_neutral_for_the_oracle():
  """A passing program with an inserted comment or blank line has no error line."""
  p = S.make_split(3, 1, [4], "train")[0]
  lines = oracle.response_lines(p.reference)
  commented = "\n".join(lines[:1] + ["    # first step done", ""] + lines[1:]) + "\n"
  assert oracle.first_error_line(p, commented) is None
  labels = oracle.oracle_line_labels(p, commented.split("\n")[:-1])
  assert labels == [1, 0, 0, 1, 1, 1]
  # A wrong line after the comment is still found, at its own index.
  broken = commented.split("\n")
  broken[3] = "    " + broken[3].strip().split("=")[0] + "= 12345"
  assert oracle.first_error_line(p, "\n".join(broken)) == 3
  assert oracle.oracle_line_labels(p, broken[:-1]) == [1, 0, 0, -1, -1, -1]


def test_oracle_matches_the_interpreter_on_prefixes_completed_by_the_reference(train):
  """An independent reference for the oracle: line k is the first wrong line iff the
  response's lines up to k, completed by the reference's later lines, is the first such
  program that fails the tests when the real interpreter runs it (in the sandbox). The
  wrong lines are drawn from the mutations unfiltered (`corrupt_line` keeps only those
  the oracle agrees with, so it cannot test the oracle)."""
  rng = np.random.default_rng(3)
  cases = []
  for p in train[:60]:
    ref = oracle.response_lines(p.reference)
    k = int(rng.integers(len(ref)))
    names = list(S.ARGS) + list(S.LOCALS[:k + 1])
    wrong = corpus._mutations(ref[k][len(oracle.INDENT):], names, rng)  # pylint: disable=protected-access
    if wrong:
      cases.append((p, ref, ref[:k] + [oracle.INDENT + wrong[0]] + ref[k + 1:]))
  assert len(cases) > 50
  text = lambda lines: "".join(l + "\n" for l in lines)
  jobs = [(p.program(text(lines[:j + 1] + ref[j + 1:])), p.tests)
          for p, ref, lines in cases for j in range(len(lines))]
  results = iter(run_jobs(jobs))
  disagreements, wrong_found = [], 0
  for p, ref, lines in cases:
    passed = [next(results).passed for _ in lines]
    expected = next((j for j, ok in enumerate(passed) if not ok), None)
    wrong_found += expected is not None
    got = oracle.first_error_line(p, text(lines))
    if got != expected:
      disagreements.append((p.id, lines, got, expected))
  assert not disagreements, disagreements[:3]
  assert wrong_found > 0.8 * len(cases)          # most unfiltered mutations are wrong
