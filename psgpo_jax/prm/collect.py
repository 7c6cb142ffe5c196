"""The label collection loop: prompts, batch by batch, into resumable label shards.

Layers:
  * `run_collection(...)`: batches -> resumable JSONL shards (`shards`) +
    `collect_stats.json`, with any respond and probe functions;
  * `collect_labels(...)`: the production wiring (sampler + sandbox + tokenizer):
    responses from `make_respond_fn`, K completions per probed prefix from `PolicyProbe`
    (or the oracle, `labeler.oracle_probe`), and optionally the labels' agreement with
    the oracle as a function of K (`labeler.label_agreement_by_k`).
Below them: the pure search (`search`), one batch through any probe (`labeler`), the
selection and balancing of the labeled rows (`select`) and the shards (`shards`).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from psgpo_jax import faults
from psgpo_jax.jsonio import write_json
from psgpo_jax.lines import split_lines
from psgpo_jax.prm.labeler import (LabelingConfig, OracleFn, _agreement,
                                   label_agreement_by_k, label_batch, oracle_probe)
from psgpo_jax.prm.search import PrefixJob, ProbeFn, Row
from psgpo_jax.prm.select import label_counts, select_rows
from psgpo_jax.prm.shards import load_labels, read_shard, shard_indices, shard_path, write_shard
from psgpo_jax.sampling_config import SamplingConfig

STATS_FILE = "collect_stats.json"


# respond_fn(batch_index, problems) -> (responses, passed, extras): one entry per response,
# responses_per_prompt per problem, problem-major; extras is a list of per-row dicts (e.g.
# line_end_token_indices) or None.
RespondFn = Callable[[int, Sequence[Any]], Tuple[List[str], List[bool], Optional[List[Row]]]]


# ----------------------------------------------------------------------------- collection


def _problem_id(problem: Any, fallback: int) -> Any:
  for name in ("problem_id", "id", "task_id", "name"):
    value = getattr(problem, name, None)
    if value is not None:
      return value
  return fallback


def run_collection(problems: Sequence[Any], respond_fn: RespondFn,
                   probe_for_batch: Callable[[int], ProbeFn], config: LabelingConfig,
                   out_dir: str, oracle_fn: Optional[OracleFn] = None,
                   log_fn: Optional[Callable[[int, Dict[str, float]], None]] = None,
                   shard: Tuple[int, int] = (0, 1),
                   sync: Callable[[str], None] = lambda name: None) -> Dict[str, Any]:
  """Labels `problems` batch by batch into resumable shards; returns the collection stats.

  Batch b holds `config.prompts_per_batch` whole prompts; its rows go to
  `out_dir/labels-{b:05d}.jsonl` (written atomically once the batch is done), and a
  batch whose shard exists is skipped, so a crash loses at most the batch in flight.
  Each row carries `selected` (selection + uniform-prompt drop of `config`). Stats are
  written to `out_dir/collect_stats.json`.

  Several processes (`shard` = (process index, process count)) each label the batches
  b = index (mod count) into the same (shared) directory; since a batch depends only on
  its index (`respond_fn(b, ...)`, `probe_for_batch(b)`), the shards are those one
  process would write. `sync(name)` waits for every process (`multihost.barrier`) before
  the stats are read from all shards; process 0 writes them.

  Args:
    problems: the prompts to label.
    respond_fn: samples and tests the responses of one batch (see `RespondFn`).
    probe_for_batch: batch index -> the batched prefix probe of that batch (see
      `label_batch`); keyed by batch so that a resumed run samples as an uninterrupted
      one would.
    config: the labeling knobs.
    out_dir: the shard directory.
    oracle_fn: optional (problem, response) -> first wrong line (0-based) or None; its
      value is stored per row (`oracle_first_bad`) and agreement goes to the stats.
    log_fn: optional callback (batch_index, batch metrics).
    shard: (this process's index, the process count).
    sync: a barrier over the processes.
  """
  os.makedirs(out_dir, exist_ok=True)
  per_batch = config.prompts_per_batch
  num_batches = math.ceil(len(problems) / per_batch)
  done = set(shard_indices(out_dir))
  new_batches = 0
  index, count = shard
  for b in range(index, num_batches, count):
    if b in done:
      if log_fn is None:
        continue
      rows = read_shard(shard_path(out_dir, b))
    else:
      rows = label_one_batch(b, problems[b * per_batch:(b + 1) * per_batch], b * per_batch,
                             respond_fn, probe_for_batch(b), config, oracle_fn)
      write_shard(out_dir, b, rows)
      faults.reached(f"collect:{b}")
      new_batches += 1
    if log_fn is not None:     # also for a finished shard: a crash may have come between
      log_fn(b, {**_stats(rows, config), "batch_seconds": rows[0]["batch_seconds"],
                 "search_seconds": rows[0].get("search_seconds", 0.0)})
  sync("collect_batches")
  rows = load_labels(out_dir, selected_only=False)
  stats = _stats(rows, config)
  # Wall time of every finished batch, this run's and earlier (interrupted) runs'.
  stats["wall_seconds"] = sum({r["batch"]: r.get("batch_seconds", 0.0) for r in rows}.values())
  stats["seconds_per_response"] = stats["wall_seconds"] / max(len(rows), 1)
  stats["batches"] = num_batches
  stats["batches_run_now"] = new_batches      # by this process
  if index == 0:
    _write_json(os.path.join(out_dir, STATS_FILE), stats)
  return stats


def label_one_batch(b: int, batch: Sequence[Any], first_index: int, respond_fn: RespondFn,
                    probe: ProbeFn, config: LabelingConfig,
                    oracle_fn: Optional[OracleFn] = None) -> List[Row]:
  """The labeled rows of batch `b` (its prompts `batch`, the first one the
  `first_index`-th of the collection): responses from `respond_fn`, binary-search labels
  through `probe` (prompts none of whose responses passed are not searched when
  `config.drop_uniform_prompts`), the oracle's first wrong line when `oracle_fn` is given,
  the selection flag, and the batch's seconds (`batch_seconds`, `search_seconds`)."""
  start = time.time()
  batch = list(batch)
  responses, passed, extras = respond_fn(b, batch)
  k = config.responses_per_prompt
  if len(responses) != k * len(batch):
    raise ValueError(f"respond_fn returned {len(responses)} responses for {len(batch)} "
                     f"prompts x {k}.")
  owners = [batch[i // k] for i in range(len(responses))]
  ids = [_problem_id(p, first_index + i // k) for i, p in enumerate(owners)]
  search = [True] * len(responses)
  if config.drop_uniform_prompts:
    none_pass = {pid for pid in set(ids)
                 if not any(ok for p, ok in zip(ids, passed) if p == pid)}
    search = [pid not in none_pass for pid in ids]
  t_search = time.time()
  rows = label_batch(owners, responses, passed, probe, config, search=search)
  search_seconds = time.time() - t_search
  for i, row in enumerate(rows):
    row.update(problem_id=ids[i], prompt=getattr(owners[i], "prompt", ""), batch=b)
    if extras is not None:
      row.update(extras[i])
    if oracle_fn is not None:
      row["oracle_first_bad"] = oracle_fn(owners[i], responses[i])
  for row, keep in zip(rows, select_rows(rows, config.selection, config.drop_uniform_prompts)):
    row["selected"] = bool(keep)
  seconds = time.time() - start
  for row in rows:
    row["batch_seconds"], row["search_seconds"] = seconds, search_seconds
  return rows


def _stats(rows: Sequence[Row], config: LabelingConfig) -> Dict[str, Any]:
  """Collection statistics of labeled rows (cost, pass rate, label balance, agreement)."""
  n = max(len(rows), 1)
  searched = [r for r in rows if r["searched"]]
  selected = [r for r in rows if r.get("selected")]
  spent = sum(r["completions_spent"] for r in rows)
  linear = sum(config.completions * max(len([t for t in r["trivial"]
                                             if not (config.skip_trivial_lines and t)]) - 1, 0)
               for r in searched)
  stats = {"responses": len(rows), "pass_rate": sum(r["passed"] for r in rows) / n,
           "searched": len(searched), "selected": len(selected),
           "completions": spent, "completions_per_response": spent / n,
           "completions_per_searched": spent / max(len(searched), 1),
           "linear_scan_completions": linear,
           "max_rounds": max((r["rounds"] for r in rows), default=0),
           "mean_lines": float(np.mean([len(r["lines"]) for r in rows])) if rows else 0.0,
           "revised_share": (sum((r["first_bad_step"] or 0) > 0 for r in searched)
                             / max(len(searched), 1)),
           "completions_k": config.completions}
  counts = label_counts(selected)
  stats.update({f"selected_{k}": v for k, v in counts.items()})
  signed = counts["positive_lines"] + counts["negative_lines"]
  stats["selected_positive_share"] = counts["positive_lines"] / max(signed, 1)
  stats.update(_agreement(rows, config.skip_trivial_lines))
  return stats


def _read_json(path: str) -> Optional[Dict[str, Any]]:
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _write_json(path: str, value: Any) -> None:
  write_json(path, value, sort_keys=True)


# ----------------------------------------------------------------------------- production


def _encode(tokenizer: Any, text: str) -> List[int]:
  from psgpo_jax.rollout import encode  # pylint: disable=import-outside-toplevel
  return encode(tokenizer, text) if text else []


class PolicyProbe:
  """The production probe: K completions per prefix from a completer policy, then tests.

  One call = one sampler call (`num_samples = K` completions for every prefix, continuing
  `prompt + prefix`) and one sandbox call over all P * K programs
  `problem.program(prefix + completion)`. Call `i` samples with `fold_in(rng, i)`.

  Attributes:
    completions: programs sampled and tested so far.
    calls: sampler calls so far.
    seconds: {"sample", "test"} wall seconds spent.
  """

  def __init__(self, params: Any, model_cfg: Any, tokenizer: Any, sampling_config: Any,
               run_many_fn: Callable[[List[Tuple[str, Any]]], Sequence[Any]], rng: Any,
               mesh: Any = None):
    self.params, self.model_cfg, self.tokenizer = params, model_cfg, tokenizer
    self.sampling_config, self.run_many_fn, self.rng, self.mesh = (sampling_config,
                                                                   run_many_fn, rng, mesh)
    self.completions, self.calls = 0, 0
    self.seconds = {"sample": 0.0, "test": 0.0}

  @property
  def k(self) -> int:
    return self.sampling_config.num_samples

  def outcomes(self, jobs: List[PrefixJob]) -> List[List[bool]]:
    """Per job, K booleans: completion passed all tests."""
    import jax  # pylint: disable=import-outside-toplevel
    from psgpo_jax.rollout import sample_and_test  # pylint: disable=import-outside-toplevel
    from psgpo_jax.sampling import cached_sampler  # pylint: disable=import-outside-toplevel
    if not jobs:
      return []
    sampler = cached_sampler(self.model_cfg, self.sampling_config, self.tokenizer, self.mesh)
    rollouts = sample_and_test(
        self.params, sampler, [j.problem for j in jobs],
        [_encode(self.tokenizer, j.problem.prompt) for j in jobs], self.run_many_fn,
        jax.random.fold_in(self.rng, self.calls), prefixes=[j.prefix for j in jobs],
        monitor_hacks=False)
    self.calls += 1
    self.completions += len(rollouts)
    for phase in ("sample", "test"):
      self.seconds[phase] += rollouts.seconds[phase]
    return rollouts.passed.reshape(len(jobs), self.k).tolist()

  def __call__(self, jobs: List[PrefixJob]) -> List[int]:
    return [sum(o) for o in self.outcomes(jobs)]


def make_respond_fn(params: Any, model_cfg: Any, tokenizer: Any, sampling_config: Any,
                    run_many_fn: Callable[[List[Tuple[str, Any]]], Sequence[Any]], rng: Any,
                    mesh: Any = None) -> RespondFn:
  """Samples `sampling_config.num_samples` responses per problem and tests them.

  Batch b samples with `fold_in(rng, b)`. Extras per row: `line_end_token_indices` (the
  end token of each line within the response's own token ids, `tokenization.line_spans`),
  `response_tokens`, `status`, `tests_passed`, `tests_total`.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from psgpo_jax.rollout import sample_and_test  # pylint: disable=import-outside-toplevel
  from psgpo_jax.sampling import cached_sampler  # pylint: disable=import-outside-toplevel
  from psgpo_jax.tokenization import line_spans  # pylint: disable=import-outside-toplevel

  def respond(b: int, problems: Sequence[Any]):
    prompt_ids = [_encode(tokenizer, p.prompt) for p in problems]
    sampler = cached_sampler(model_cfg, sampling_config, tokenizer, mesh)
    rollouts = sample_and_test(params, sampler, problems, prompt_ids, run_many_fn,
                               jax.random.fold_in(rng, b), monitor_hacks=False)
    extras = []
    for i, text, result in zip(rollouts.problem_index, rollouts.texts, rollouts.results):
      response_ids = _encode(tokenizer, text)
      spans = line_spans(tokenizer, prompt_ids[i], response_ids)
      if spans.num_lines != len(split_lines(text)):
        raise ValueError(f"Line split mismatch for response {text!r}: tokenization found "
                         f"{spans.num_lines} lines, labeling {len(split_lines(text))}.")
      extras.append({"line_end_token_indices": [int(e) for e in spans.end_token],
                     "response_tokens": len(response_ids), "status": result.status,
                     "tests_passed": result.tests_passed, "tests_total": result.tests_total})
    return list(rollouts.texts), rollouts.passed.tolist(), extras

  return respond


def default_oracle(problems: Sequence[Any]) -> Optional[OracleFn]:
  """The synthetic suite's `first_error_line` when every problem is synthetic, else None."""
  if problems and all(getattr(p, "source", "") == "synthetic" for p in problems):
    from psgpo_jax.data import synthetic_oracle  # pylint: disable=import-outside-toplevel
    return synthetic_oracle.first_error_line
  return None


def _agreement_once(out_dir: str, problems: Sequence[Any], probe: PolicyProbe,
                    oracle_fn: OracleFn, ks: Sequence[int], max_responses: int,
                    skip_trivial_lines: bool, process_index: int,
                    sync: Callable[[str], None]) -> List[Dict[str, float]]:
  """Agreement with the oracle by K on up to `max_responses` searched responses
  (`label_agreement_by_k`), run once: process 0 runs it and writes
  `agreement_by_k.json`, a resumed run and the other processes (after `sync`) read it."""
  path = os.path.join(out_dir, "agreement_by_k.json")
  report = _read_json(path)
  if report is None and process_index == 0:
    by_id = {_problem_id(p, i): p for i, p in enumerate(problems)}
    rows = [r for r in load_labels(out_dir, selected_only=False)
            if r["searched"] and r["problem_id"] in by_id][:max_responses]
    report = label_agreement_by_k([by_id[r["problem_id"]] for r in rows],
                                  [r["response"] for r in rows], probe.outcomes, oracle_fn,
                                  ks, skip_trivial_lines)
    _write_json(path, report)
  sync("collect_agreement")
  return report if report is not None else _read_json(path)


def collect_labels(policy_params: Any, model_cfg: Any, tokenizer: Any,
                   problems: Sequence[Any], labeling: LabelingConfig,
                   sampling: SamplingConfig, out_dir: str, rng: Any,
                   completer_params: Any = None, run_many_fn: Any = None,
                   oracle_fn: Optional[OracleFn] = None, writer: Any = None,
                   agreement_ks: Sequence[int] = (), agreement_responses: int = 32,
                   mesh: Any = None, metrics_prefix: str = "collect/") -> Dict[str, Any]:
  """Collects binary-search PRM labels end to end; resumable (see `run_collection`).

  Args:
    policy_params: CausalLM params that sample the responses to label.
    model_cfg: their ModelConfig (the completer shares it).
    tokenizer: a transformers tokenizer (pad and eos set).
    problems: Problems (`.prompt`, `.tests`, `.program`) to label, all of them.
    labeling: the labeling knobs (`LabelingConfig.from_config` of a pipeline config).
    sampling: the sampler's settings (`sampling_config.from_pipeline_config`); the
      responses' and completions' counts and temperature are `labeling`'s.
    out_dir: shard directory (labels-XXXXX.jsonl, collect_stats.json).
    rng: PRNG key.
    completer_params: the policy that samples the K completions (default: the policy).
    run_many_fn: `(jobs) -> results` (default: a `Sandbox` pool with default limits).
    oracle_fn: (problem, response) -> first wrong line; default the synthetic oracle
      when every problem is synthetic.
    writer: optional MetricWriter: per-batch metrics (step = batch index) and the totals
      (`total/`) under `metrics_prefix`, each logged once even across resumed runs.
    agreement_ks: if given (and an oracle exists), agreement with the oracle as a
      function of K on up to `agreement_responses` searched responses, written to
      `agreement_by_k.json` and into the stats.
    mesh: optional mesh for the sampler.
    metrics_prefix: the prefix of the metric names (one per labeling policy).
  Returns:
    The collection stats (also in `out_dir/collect_stats.json`).
  """
  import jax  # pylint: disable=import-outside-toplevel
  from psgpo_jax import multihost, sandbox  # pylint: disable=import-outside-toplevel
  index = jax.process_index()
  problems = list(problems)
  oracle_fn = oracle_fn or default_oracle(problems)
  pool = None
  if run_many_fn is None:
    pool = sandbox.Sandbox()
    run_many_fn = pool.run_many
  completer_params = policy_params if completer_params is None else completer_params
  respond_rng, probe_rng, agree_rng = jax.random.split(rng, 3)
  respond_cfg = sampling.replace(num_samples=labeling.responses_per_prompt,
                                 temperature=labeling.temperature)
  probe_cfg = sampling.replace(num_samples=labeling.completions,
                               temperature=labeling.temperature)
  respond_fn = make_respond_fn(policy_params, model_cfg, tokenizer, respond_cfg, run_many_fn,
                               respond_rng, mesh)
  probes: List[PolicyProbe] = []

  if labeling.labeler == "oracle" and oracle_fn is None:
    raise ValueError("collect.labeler='oracle' needs problems with a first-error oracle "
                     "(data.source=synthetic); use collect.labeler=search.")

  def probe_for_batch(b: int) -> ProbeFn:
    if labeling.labeler == "oracle":
      return oracle_probe(oracle_fn)
    probe = PolicyProbe(completer_params, model_cfg, tokenizer, probe_cfg, run_many_fn,
                        jax.random.fold_in(probe_rng, b), mesh)
    probes.append(probe)
    return probe

  def log_fn(b: int, metrics: Dict[str, float]) -> None:
    """Logs batch b's row once: a resumed collection replays the rows of its shards."""
    probe = probes.pop() if probes else None       # this batch's probe; none when replayed
    probes.clear()
    if writer is None or writer.has(b, f"{metrics_prefix}batch_seconds"):
      return
    if probe is not None:
      metrics = {**metrics, "sample_seconds": probe.seconds["sample"],
                 "test_seconds": probe.seconds["test"]}
    writer.write(b, metrics, prefix=metrics_prefix)

  try:
    stats = run_collection(problems, respond_fn, probe_for_batch, labeling, out_dir,
                           oracle_fn, log_fn, (index, jax.process_count()),
                           multihost.barrier)
    if agreement_ks and oracle_fn is not None:
      probe = PolicyProbe(completer_params, model_cfg, tokenizer,
                          probe_cfg.replace(num_samples=max(agreement_ks)), run_many_fn,
                          agree_rng, mesh)
      stats["agreement_by_k"] = _agreement_once(out_dir, problems, probe, oracle_fn,
                                                agreement_ks, agreement_responses,
                                                labeling.skip_trivial_lines, index,
                                                multihost.barrier)
      if index == 0:
        _write_json(os.path.join(out_dir, STATS_FILE), stats)
  finally:
    if pool is not None:
      pool.close()
  if writer is not None and not writer.has(0, f"{metrics_prefix}total/batches"):
    writer.write(0, {k: v for k, v in stats.items() if isinstance(v, (int, float))},
                 prefix=f"{metrics_prefix}total/")
  return stats
