"""Problem loaders (HumanEval, MBPP, LiveCodeBench, APPS), bad rows, TFDS round trip."""
from __future__ import annotations

import base64
import dataclasses
import json
import os
import pickle
import zlib

import numpy as np
import pytest

from psgpo_jax.data import problems as P
from psgpo_jax.data import rows, synthetic, tfds_builders
from psgpo_jax.data.record import problem_from_json, problem_to_json, split_by_hash
from psgpo_jax.sandbox.spec import AssertTests, CallTests, StdioTests

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "data")


def fixture(name: str) -> str:
  return os.path.join(FIXTURES, name)


def run_jobs(jobs):
  """Runs (program, tests) jobs in the project's sandbox."""
  from psgpo_jax.sandbox import run_many
  return run_many(jobs)


# --- HumanEval ---------------------------------------------------------------------------


def test_humaneval_from_package():
  problems = P.load_humaneval()
  assert len(problems) == 164
  p = problems[0]
  assert p.id == "HumanEval/0" and p.source == "humaneval"
  assert p.prompt == p.program_prefix and p.entry_point == "has_close_elements"
  assert isinstance(p.tests, AssertTests) and len(p.tests.tests) == 1
  assert p.tests.tests[0].rstrip().endswith("check(has_close_elements)")
  assert p.program(p.reference).startswith(p.prompt)


def test_humaneval_reference_passes_and_wrong_completion_fails():
  p = P.load_humaneval()[0]
  good, bad = run_jobs([(p.program(p.reference), p.tests),
                        (p.program("    return False\n"), p.tests)])
  assert good.passed, good
  assert not bad.passed and bad.status == "failed"


def test_bad_rows_skipped_with_a_warning_naming_file_and_line():
  with pytest.warns(UserWarning) as record:
    problems = P.load_humaneval(fixture("humaneval.jsonl"))
  assert [p.id for p in problems] == ["HumanEval/0", "HumanEval/2"]
  message = str(record[0].message)
  assert "humaneval.jsonl:2: missing field 'test'" in message
  assert "humaneval.jsonl:3:" in message and "JSON object" in message


def test_bad_rows_rejected_with_error():
  with pytest.raises(rows.BadRowsError) as info:
    P.load_humaneval(fixture("humaneval.jsonl"), on_bad_row="error")
  assert [(b.line) for b in info.value.bad_rows] == [2, 3]
  with pytest.raises(ValueError):
    P.load_humaneval(fixture("humaneval.jsonl"), on_bad_row="ignore")


# --- MBPP --------------------------------------------------------------------------------


def test_mbpp_rows_prompts_and_bad_rows():
  with pytest.warns(UserWarning) as record:
    problems = P.load_mbpp(fixture("mbpp.jsonl"), split="test")
  assert [p.id for p in problems] == ["mbpp/11", "mbpp/12", "mbpp/17"]
  message = str(record[0].message)
  for expected in ("mbpp.jsonl:2: no tests", "mbpp.jsonl:4: invalid JSON",
                   "mbpp.jsonl:5: not UTF-8", "mbpp.jsonl:9: duplicate id 'mbpp/12'"):
    assert expected in message, message
  assert "mbpp.jsonl:6" not in message          # a blank line is not a row
  p = problems[0]
  assert p.entry_point == "remove_Occ" and p.program_prefix == ""
  assert p.prompt.startswith("You are an expert Python programmer, and here is your task: "
                             "Write a python function to remove first")
  assert 'assert remove_Occ("hello","l") == "heo"' in p.prompt
  with open(fixture("mbpp.jsonl"), "rb") as f:
    assert p.tests.tests == tuple(json.loads(f.readline())["test_list"])
  assert "\r" not in p.reference
  assert problems[2].tests.setup == "import math"


def test_mbpp_splits_and_challenge_tests():
  with pytest.warns(UserWarning):
    train = P.load_mbpp(fixture("mbpp.jsonl"), split="train")
  assert [p.id for p in train] == ["mbpp/601"]
  with pytest.warns(UserWarning):
    full = P.load_mbpp(fixture("mbpp.jsonl"), split="all", include_challenge_tests=True)
  assert len(full) == 4 and len(full[0].tests.tests) == 5
  with pytest.raises(ValueError):
    P.load_mbpp(fixture("mbpp.jsonl"), split="dev")


def test_mbpp_references_pass_in_sandbox():
  with pytest.warns(UserWarning):
    problems = P.load_mbpp(fixture("mbpp.jsonl"), split="all", include_challenge_tests=True)
  results = run_jobs([(p.program(p.reference), p.tests) for p in problems])
  assert all(r.passed for r in results), results
  wrong = run_jobs([(problems[3].program("def max_of_two(a, b):\n    return a\n"),
                     problems[3].tests)])[0]
  assert not wrong.passed and wrong.tests_passed == 1 and wrong.tests_total == 2


# --- LiveCodeBench -------------------------------------------------------------------------


def test_lcb_decodes_plain_and_pickled_private_tests():
  cases = [{"input": "1\n", "output": "2\n", "testtype": "stdin"}]
  packed = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()
  assert P.decode_lcb_tests(json.dumps(cases)) == cases
  assert P.decode_lcb_tests(packed) == cases


def test_lcb_refuses_pickled_objects():

  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned",))

  packed = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
  with pytest.raises(pickle.UnpicklingError):
    P.decode_lcb_tests(packed)


def test_lcb_rows_tests_and_bad_rows():
  with pytest.warns(UserWarning) as record:
    problems = P.load_livecodebench(fixture("livecodebench.jsonl"), tests="all")
  assert [p.id for p in problems] == ["livecodebench/abc900_a", "livecodebench/9001",
                                      "livecodebench/abc100_a"]
  message = str(record[0].message)
  for expected in ("livecodebench.jsonl:4: test cases are neither JSON",
                   "livecodebench.jsonl:5: functional tests without metadata.func_name",
                   "livecodebench.jsonl:6: no all test cases",
                   "livecodebench.jsonl:7: invalid JSON"):
    assert expected in message, message
  stdin, func = problems[0], problems[1]
  assert stdin.tests == StdioTests((("1 2\n", "3\n"), ("10 20\n", "30\n"), ("-5 5\n", "0\n")))
  assert func.tests == CallTests("countPairs", (("[1, 2, 3, 4]\n5", "2"), ("[0, 0, 0]\n0", "3")),
                                 "Solution")
  assert func.metadata["difficulty"] == "medium" and func.metadata["platform"] == "leetcode"
  assert "class Solution:" in func.prompt and func.prompt.endswith("```python\n")
  assert stdin.metadata["num_public_tests"] == 1 and stdin.metadata["num_private_tests"] == 2


def test_lcb_public_only_and_date_filter():
  with pytest.warns(UserWarning):
    public = P.load_livecodebench(fixture("livecodebench.jsonl"), tests="public",
                                  start_date="2023-01-01", end_date="2024-12-31")
  # Private tests are not decoded when not asked for, so row 4 is fine here.
  assert [p.id for p in public] == ["livecodebench/abc900_a", "livecodebench/9001",
                                    "livecodebench/abc901_a"]
  assert len(public[0].tests.cases) == 1
  assert public[0].metadata["contest_date"] == "2023-09-02"
  with pytest.warns(UserWarning):
    recent = P.load_livecodebench(fixture("livecodebench.jsonl"), start_date="2024-01-01")
  assert [p.id for p in recent] == ["livecodebench/9001"]


def test_lcb_programs_run_in_sandbox():
  with pytest.warns(UserWarning):
    stdin, func = P.load_livecodebench(fixture("livecodebench.jsonl"), start_date="2023-01-01")
  solution_stdin = "a, b = map(int, input().split())\nprint(a + b)\n"
  solution_func = ("class Solution:\n    def countPairs(self, nums: List[int], target: int) -> int:\n"
                   "        return sum(nums[i] + nums[j] == target for i in range(len(nums))"
                   " for j in range(i + 1, len(nums)))\n")
  results = run_jobs([(stdin.program(solution_stdin), stdin.tests),
                      (func.program(solution_func), func.tests),
                      (stdin.program("print(0)\n"), stdin.tests)])
  assert results[0].passed, results[0]
  assert results[1].passed, results[1]
  assert not results[2].passed


# --- APPS ----------------------------------------------------------------------------------


def test_apps_rows_and_bad_rows():
  with pytest.warns(UserWarning) as record:
    problems = P.load_apps(fixture("apps.jsonl"))
  assert [p.id for p in problems] == ["apps/4001", "apps/4002", "apps/4003"]
  message = str(record[0].message)
  assert "apps.jsonl:3: no tests" in message and "apps.jsonl:5: 2 inputs but 1 outputs" in message
  stdin, call, lines = problems
  assert stdin.tests == StdioTests((("3\n", "6\n"), ("10\n", "55\n")))
  assert call.tests == CallTests("evens", (("[[1, 2, 3, 4]]", "[2, 4]"), ("[[5]]", "[]")),
                                 None, "list")
  assert lines.tests == StdioTests((("ab\ncd\n", "ab\ncd\n"),))
  assert "Use Call-Based format" in call.prompt and "Use Standard Input format" in stdin.prompt
  results = run_jobs([(p.program(p.reference), p.tests) for p in problems])
  assert all(r.passed for r in results), results


def test_load_problems_dispatch():
  assert len(P.load_problems("humaneval")) == 164
  with pytest.warns(UserWarning):
    assert len(P.load_problems("mbpp", fixture("mbpp.jsonl"), split="test")) == 3
  with pytest.warns(UserWarning):
    assert len(P.load_problems("lcb", fixture("livecodebench.jsonl"), tests="public")) == 4
  with pytest.warns(UserWarning):
    assert len(P.load_problems("apps", fixture("apps.jsonl"))) == 3
  synth = P.load_problems("synthetic", split="test", seed=3, num_problems=4, horizons=[2, 3])
  assert [p.metadata["horizon"] for p in synth] == [2, 3, 2, 3]
  with pytest.raises(ValueError, match="needs path"):
    P.load_problems("mbpp")
  with pytest.raises(ValueError, match="unknown source"):
    P.load_problems("codecontests", "x.jsonl")
  with pytest.raises(FileNotFoundError):
    P.load_problems("apps", fixture("missing.jsonl"))


def test_directory_of_jsonl_files(tmp_path):
  lines = open(fixture("livecodebench.jsonl"), "rb").read().splitlines(keepends=True)
  (tmp_path / "test.jsonl").write_bytes(lines[0])
  (tmp_path / "test2.jsonl").write_bytes(lines[1] + lines[0])   # a duplicate across files
  with pytest.warns(UserWarning, match=r"test2.jsonl:2: duplicate id"):
    problems = P.load_livecodebench(str(tmp_path))
  assert [p.id for p in problems] == ["livecodebench/abc900_a", "livecodebench/9001"]


# --- Serialisation and TFDS ----------------------------------------------------------------


def _all_kinds():
  with pytest.warns(UserWarning):
    lcb = P.load_livecodebench(fixture("livecodebench.jsonl"))
  with pytest.warns(UserWarning):
    apps = P.load_apps(fixture("apps.jsonl"))
  return (P.load_humaneval()[:3] + lcb + apps
          + synthetic.make_split(0, 4, horizons=[1, 5, 12], split="train"))


def test_json_round_trip_all_test_kinds():
  for p in _all_kinds():
    back = problem_from_json(problem_to_json(p))
    assert back == p
    assert type(back.tests) is type(p.tests)
  weird = dataclasses.replace(P.load_humaneval()[0], prompt="caf\u00e9 \u2603 \x00 \"q\"\n",
                              metadata={"nested": {"a": [1, 2.5, None, True]}})
  assert problem_from_json(problem_to_json(weird)) == weird


def test_tfds_round_trip(tmp_path):
  problems = _all_kinds()
  train, evals = problems[:-3], problems[-3:]
  path = tfds_builders.write_problems(str(tmp_path), "mixed", {"train": train, "eval": evals})
  assert any(f.endswith(".array_record-00000-of-00001") or ".array_record" in f
             for f in os.listdir(path))
  source = tfds_builders.read_problems(str(tmp_path), "mixed", "train")
  assert len(source) == len(train)
  assert [source[i] for i in range(len(source))] == train       # order kept, identical
  assert source[-1] == train[-1] and source[1:3] == train[1:3]
  assert source.take([2, 0]) == [train[2], train[0]]
  assert list(tfds_builders.read_problems(str(tmp_path), "mixed", "eval")) == evals
  assert P.load_problems("tfds", str(tmp_path), split="eval", name="mixed") == evals
  with pytest.raises(ValueError, match="split"):
    tfds_builders.read_problems(str(tmp_path), "mixed", "validation")
  with pytest.raises(FileNotFoundError):
    tfds_builders.read_problems(str(tmp_path), "absent", "train")
  # Rewriting with overwrite replaces the data; without it the existing set is kept.
  tfds_builders.write_problems(str(tmp_path), "mixed", {"train": evals}, overwrite=True)
  assert list(tfds_builders.read_problems(str(tmp_path), "mixed", "train")) == evals
  tfds_builders.write_problems(str(tmp_path), "mixed", {"train": train})
  assert list(tfds_builders.read_problems(str(tmp_path), "mixed", "train")) == evals


def test_host_indices_disjoint_complete_and_reshuffled():
  n, hosts = 103, 4
  shares = [tfds_builders.host_indices(n, i, hosts, seed=7, epoch=0) for i in range(hosts)]
  assert sorted(np.concatenate(shares).tolist()) == list(range(n))
  assert max(len(s) for s in shares) - min(len(s) for s in shares) <= 1
  again = tfds_builders.host_indices(n, 2, hosts, seed=7, epoch=0)
  np.testing.assert_array_equal(again, shares[2])
  next_epoch = [tfds_builders.host_indices(n, i, hosts, seed=7, epoch=1) for i in range(hosts)]
  assert sorted(np.concatenate(next_epoch).tolist()) == list(range(n))
  assert not np.array_equal(next_epoch[0], shares[0])
  even = [tfds_builders.host_indices(n, i, hosts, 7, 0, drop_remainder=True) for i in range(hosts)]
  assert {len(s) for s in even} == {n // hosts}
  assert len(set(np.concatenate(even).tolist())) == hosts * (n // hosts)
  with pytest.raises(ValueError):
    tfds_builders.host_indices(n, 4, hosts, 7)


def test_split_by_hash_is_stable():
  problems = P.load_humaneval()
  train, evals = split_by_hash(problems, 0.25, salt="s")
  assert len(train) + len(evals) == len(problems) and 20 < len(evals) < 62
  shuffled = list(reversed(problems[:80]))
  _, evals_part = split_by_hash(shuffled, 0.25, salt="s")
  assert {p.id for p in evals_part} == {p.id for p in evals if p in problems[:80]}


def test_data_source_tfds_loads_a_prepared_set_like_the_source_it_was_written_from(
    tmp_path, subprocess_env):
  """experiments/prepare_tfds.py writes the tiny config's problems; a run with
  data.source=tfds then loads the same train and held-out problems, follows the set's
  source (synthetic: its stop strings, corpus, oracle), and trains from the command line."""
  import subprocess
  import sys
  from configs import quickstart
  from psgpo_jax import run_setup
  from psgpo_jax.configuration import ConfigError, validate_config
  config = quickstart.get_config("tiny")
  direct = run_setup.load_run_problems(config)
  data_dir = str(tmp_path / "tfds")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = subprocess_env
  cli = lambda module, *args: subprocess.run(  # noqa: E731
      [sys.executable, "-m", module, "--config", "configs/quickstart.py:tiny", *args],
      cwd=root, env=env, capture_output=True, text=True, timeout=600)
  out = cli("experiments.prepare_tfds", f"--data_dir={data_dir}", "--name=tiny_set")
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  assert tfds_builders.set_sources(data_dir, "tiny_set") == ["synthetic"]
  from_set = config.copy_and_resolve_references()
  from_set.data.source, from_set.data.train_path = "tfds", data_dir
  from_set.data.tfds_name = "tiny_set"
  validate_config(from_set)
  assert run_setup.problem_source(from_set) == "synthetic"
  assert run_setup.load_run_problems(from_set) == direct
  from_set.data.tfds_eval_split = ""        # no held-out split: a hash split of train
  loaded = run_setup.load_run_problems(from_set)
  assert sorted(p.id for p in loaded["train"] + loaded["eval"]) == sorted(
      p.id for p in direct["train"])
  from_set.data.tfds_name = ""
  with pytest.raises(ConfigError, match="data.tfds_name"):
    validate_config(from_set)
  out = cli("experiments.train", f"--config.workdir={tmp_path / 'run'}", "--config.stages=sft",
            "--config.sft.steps=2", "--config.data.source=tfds",
            f"--config.data.train_path={data_dir}", "--config.data.tfds_name=tiny_set")
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  assert os.path.exists(tmp_path / "run" / "sft" / "result.json")


def test_prompts_longer_than_max_prompt_tokens_are_dropped_and_counted(tmp_path, capsys):
  from configs import quickstart
  from psgpo_jax import run_setup
  from psgpo_jax.data import synthetic_corpus
  from psgpo_jax.rollout import encode
  from psgpo_jax.tokenization import load_tokenizer
  tokenizer = load_tokenizer(synthetic_corpus.build_tokenizer(str(tmp_path)))
  config = quickstart.get_config("tiny")
  every = run_setup.load_run_problems(config, tokenizer)["train"]
  lengths = sorted(len(encode(tokenizer, p.prompt)) for p in every)
  config.data.max_prompt_tokens = lengths[len(lengths) // 2]
  kept = run_setup.load_run_problems(config, tokenizer)["train"]
  assert 0 < len(kept) < len(every)
  assert len(kept) == sum(n <= config.data.max_prompt_tokens for n in lengths)
  assert all(len(encode(tokenizer, p.prompt)) <= config.data.max_prompt_tokens for p in kept)
  said = capsys.readouterr().out
  assert f"train: dropped {len(every) - len(kept)} of {len(every)} problems" in said
