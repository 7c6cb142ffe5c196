"""Problem sets as tensorflow-datasets (array_record files, read without TensorFlow).

`write_problems` stores any lists of Problems as the splits of one named dataset under a
data_dir; `read_problems` opens a split as a random-access sequence of Problems
(`builder.as_data_source`), so a host reads only the indices it owns. `host_indices`
gives each host of a multi-host run its disjoint, per-epoch reshuffled share of indices
(stable train/eval splits of any problem list: `record.split_by_hash`).

Each example holds the whole Problem as a JSON string (`problem_to_json`) plus a few scalar
features for filtering without decoding (id, source, horizon, number of tests).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, overload

import numpy as np
import tensorflow_datasets as tfds

from psgpo_jax.data.record import Problem, num_tests, problem_from_json, problem_to_json
from psgpo_jax.jsonio import write_json

VERSION = "1.0.0"
FILE_FORMAT = "array_record"
SOURCES_FILE = "problem_sources.json"    # the sources of a set's problems, beside its files


class ProblemSet(tfds.core.GeneratorBasedBuilder):
  """A named set of Problems, one example per problem, in the order given.

  The config name is the set's name (`data_dir/problem_set/<name>/<version>/`). To write,
  pass `splits={"train": [...], "test": [...]}`; to read, omit it.
  """

  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, splits: Optional[Mapping[str, Sequence[Problem]]] = None, **kwargs):
    self._splits = splits
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Programming problems (prompt, tests, reference) for psgpo_jax.",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "source": tfds.features.Text(),
            "problem": tfds.features.Text(),     # problem_to_json(problem)
            "horizon": np.int32,                 # metadata["horizon"], or -1
            "num_tests": np.int32,
        }),
        disable_shuffling=True,                  # index i is the i-th problem given
    )

  def _split_generators(self, dl_manager):
    if self._splits is None:
      raise ValueError("ProblemSet needs splits={...} to be prepared.")
    return {name: self._generate_examples(problems) for name, problems in self._splits.items()}

  def _generate_examples(self, problems: Sequence[Problem]) -> Iterator[Tuple[int, Dict]]:
    for index, problem in enumerate(problems):
      yield index, example_from_problem(problem)


def example_from_problem(problem: Problem) -> Dict[str, object]:
  """The feature dict stored for one Problem."""
  return {"id": problem.id, "source": problem.source, "problem": problem_to_json(problem),
          "horizon": int(problem.metadata.get("horizon", -1)),
          "num_tests": num_tests(problem.tests)}


def problem_from_example(example: Mapping[str, object]) -> Problem:
  """Inverse of `example_from_problem` (for examples read back from array_record)."""
  return problem_from_json(example["problem"])


def _builder(data_dir: str, name: str, splits=None) -> ProblemSet:
  return ProblemSet(splits=splits, data_dir=data_dir, file_format=FILE_FORMAT,
                    config=tfds.core.BuilderConfig(name=name, version=VERSION))


def write_problems(data_dir: str, name: str, splits: Mapping[str, Sequence[Problem]],
                   overwrite: bool = False) -> str:
  """Writes problem lists as the splits of dataset `name` (array_record files).

  An existing, complete dataset of that name is kept as it is unless `overwrite`.

  Args:
    data_dir: TFDS data directory.
    name: the set's name (letters, digits, underscores), e.g. "synthetic_v1".
    splits: {"train": problems, "test": problems, ...}.
  Returns:
    the dataset's directory.
  """
  builder = _builder(data_dir, name, splits)
  if overwrite and os.path.isdir(builder.data_dir):
    shutil.rmtree(builder.data_dir)
    builder = _builder(data_dir, name, splits)
  if not builder.is_prepared():
    builder.download_and_prepare()
    sources = sorted({p.source for problems in splits.values() for p in problems})
    write_json(os.path.join(builder.data_dir, SOURCES_FILE), sources)
  return builder.data_dir


def set_sources(data_dir: str, name: str) -> List[str]:
  """The `Problem.source` values of the set `name` (written beside it by `write_problems`)."""
  path = os.path.join(_builder(data_dir, name).data_dir, SOURCES_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no problem set {name!r} under {data_dir} (write_problems first)")
  with open(path, encoding="utf-8") as f:
    return list(json.load(f))


class ProblemSource(Sequence[Problem]):
  """A split read back as a random-access sequence of Problems (decoded on access)."""

  def __init__(self, data_source):
    self._source = data_source

  def __len__(self) -> int:
    return len(self._source)

  @overload
  def __getitem__(self, index: int) -> Problem: ...

  @overload
  def __getitem__(self, index: slice) -> List[Problem]: ...

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    if not -len(self) <= index < len(self):
      raise IndexError(index)
    return problem_from_example(self._source[index % len(self)])

  def take(self, indices: Sequence[int]) -> List[Problem]:
    """The problems at `indices` (e.g. one host's `host_indices`)."""
    return [self[int(i)] for i in indices]


def read_problems(data_dir: str, name: str, split: str = "train") -> ProblemSource:
  """Opens split `split` of the dataset `name` written by `write_problems`."""
  builder = _builder(data_dir, name)
  if not builder.is_prepared():
    raise FileNotFoundError(f"no problem set {name!r} under {data_dir} (write_problems first)")
  if split not in builder.info.splits:
    raise ValueError(f"split {split!r} not in {sorted(builder.info.splits)} of {name!r}")
  return ProblemSource(builder.as_data_source(split))


def host_indices(num_examples: int, process_index: int, process_count: int, seed: int,
                 epoch: int = 0, drop_remainder: bool = False) -> np.ndarray:
  """This host's indices of a dataset for one epoch.

  Every host draws the same permutation of `range(num_examples)` from (seed, epoch) and
  takes every `process_count`-th element from `process_index`: shares are disjoint, their
  union is everything, and each epoch is reshuffled deterministically. With
  `drop_remainder`, each host gets exactly `num_examples // process_count` (lockstep).

  Returns:
    int64 array [num_examples // process_count (+1)].
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
  order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_examples)
  if drop_remainder:
    order = order[:num_examples - num_examples % process_count]
  return order[process_index::process_count].astype(np.int64)
