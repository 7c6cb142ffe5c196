"""PRM training rows labelled by the synthetic suite's first-error oracle (test helper)."""
import numpy as np

from psgpo_jax.data import synthetic_corpus
from psgpo_jax.lines import is_trivial_line, split_lines
from psgpo_jax.prm.search import label_lines


def oracle_rows(problems, per_problem, seed=0):
  """Rows of corrupted references (one reference line replaced by a wrong one), each
  line labelled from the oracle's first wrong line, in the collect stage's row format."""
  rng = np.random.default_rng(seed)
  rows = []
  for p in problems:
    for _ in range(per_problem):
      response, first = synthetic_corpus.corrupt_response(p, rng)
      trivial = [is_trivial_line(l) for l in split_lines(response)]
      rows.append({"problem_id": p.id, "prompt": p.prompt, "response": response,
                   "line_labels": label_lines(trivial, first),
                   "oracle_first_bad": first})
  return rows
