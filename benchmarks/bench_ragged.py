"""The sampler on the quickstart's ragged work: useful tokens/s of rollouts and label probes.

Real rollouts end at EOS or a stop string at different lengths, and label probes are many
short completions of response prefixes. A batched decoder computes every row of its batch
(padded to a power of two) until the batch's longest row ends, so finished and padding
rows cost as much as live ones. From a finished run's SFT policy (`--run_dir`, e.g.
runs/quickstart after `python -m experiments.train --config configs/quickstart.py`) this
replays, with the run's sampling settings (temperature, EOS, stop strings):

  * rollout: an RL step's call, `rl.prompts_per_step` training prompts x
    `rl.samples_per_prompt` samples;
  * probe:   a label batch's first probe, `collect.completions` completions of the first
    half of the lines of each of those rollouts' responses (the binary search's midpoint).

For each, twice: with the run's row compaction (`sampling.compact_halvings`: the loop goes on
with the live rows only once they fit in half the batch) and without it (compact_halvings=0,
every padded row decoded until the longest ends: the baseline). Each prints seconds per
call (best of `--repeats` after a warm-up), the first call's seconds (compilation
included), kept tokens per second (the returned rows' lengths: the work that is used),
computed token slots per second (rows x decode steps at each batch size the loop ran: what
the decoder paid for) and the share of the work that is used. The ratio is kept tokens/s
with compaction over without: the same tokens (the outputs are equal), sooner.

Usage: python benchmarks/bench_ragged.py --run_dir runs/quickstart [--repeats 3]
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax                                                   # noqa: E402
import numpy as np                                           # noqa: E402

from experiments.common import load_config                   # noqa: E402


def workloads(ctx, config, sampler_for, params, key):
  """{name: (num_samples, prompts, prefixes)} of the rollout and probe calls."""
  from psgpo_jax.lines import split_lines  # pylint: disable=import-outside-toplevel
  from psgpo_jax.rollout import encode  # pylint: disable=import-outside-toplevel
  rl = config.rl
  problems = ctx.problems["train"][:int(rl.prompts_per_step)]
  prompts = [encode(ctx.tokenizer, p.prompt) for p in problems]
  out = sampler_for(int(rl.samples_per_prompt)).generate(params, prompts, key)
  halves, owners = [], []
  for row, text in enumerate(out.texts):
    lines = split_lines(text)
    if len(lines) > 1:
      halves.append(encode(ctx.tokenizer, "".join(lines[:len(lines) // 2])))
      owners.append(prompts[out.prompt_index[row]])
  return {"rollout": (int(rl.samples_per_prompt), prompts, None),
          "probe": (int(config.collect.completions), owners, halves)}


def computed_slots(lengths: np.ndarray, rows: int, compact_halvings: int) -> int:
  """Token slots the decode loop computes: at each step the batch size it runs at (it
  moves to the next of `row_compaction.compaction_levels` once the live rows fit)."""
  from psgpo_jax.row_compaction import compaction_levels  # pylint: disable=import-outside-toplevel
  levels, level, total = compaction_levels(rows, compact_halvings), 0, 0
  for step in range(int(np.max(lengths))):
    live = int(np.sum(lengths > step))
    while level + 1 < len(levels) and live <= levels[level + 1]:
      level += 1
    total += levels[level]
  return total


def measure(sampler, params, prompts, prefixes, repeats: int) -> dict:
  """Best seconds per call and the call's kept and computed token counts."""
  from psgpo_jax.batching import bucket_length  # pylint: disable=import-outside-toplevel
  key = jax.random.PRNGKey(1)
  start = time.perf_counter()
  out = sampler.generate(params, prompts, key, prefixes=prefixes)       # warm-up, compile
  first = time.perf_counter() - start
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    out = sampler.generate(params, prompts, key, prefixes=prefixes)
    best = min(best, time.perf_counter() - start)      # host arrays: the call has ended
  cfg = sampler.config
  rows = bucket_length(len(prompts), cfg.batch_buckets, cfg.min_batch_bucket) * cfg.num_samples
  kept = int(np.sum(out.lengths))
  lengths = np.zeros(rows, np.int64)      # padding rows end at once
  lengths[:len(out.lengths)] = out.lengths
  computed = computed_slots(lengths, rows, cfg.compact_halvings)
  return {"calls_rows": int(len(out.lengths)), "padded_rows": rows, "seconds": best,
          "first_call_seconds": first, "tokens": out.tokens,
          "kept_tokens": kept, "computed_slots": computed,
          "kept_per_s": kept / best, "computed_per_s": computed / best,
          "used_share": kept / computed,
          "mean_length": float(np.mean(out.lengths)), "max_length": int(np.max(out.lengths))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--run_dir", default="runs/quickstart")
  parser.add_argument("--config", default="configs/quickstart.py")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  from psgpo_jax import pipeline, stages  # pylint: disable=import-outside-toplevel
  from psgpo_jax.sampling import Sampler  # pylint: disable=import-outside-toplevel
  from psgpo_jax.sampling_config import from_pipeline_config  # pylint: disable=import-outside-toplevel
  run_dir = os.path.abspath(args.run_dir)
  if not os.path.isdir(os.path.join(run_dir, "sft", "policy")):
    sys.exit(f"{run_dir}/sft/policy is missing: run `python -m experiments.train --config "
             f"{args.config} --config.workdir={args.run_dir}` first (the sft stage at least).")
  config = load_config(args.config)
  config.workdir, config.logging.progress = run_dir, False
  ctx = pipeline.RunContext(config)
  try:
    params = stages.sft_policy(ctx)
    compact_halvings = from_pipeline_config(config, ctx.tokenizer, 1).compact_halvings
    sampler_for = lambda n, compact: Sampler(                         # noqa: E731
        ctx.model_cfg,
        from_pipeline_config(config, ctx.tokenizer, n).replace(compact_halvings=compact),
        ctx.tokenizer)
    calls = workloads(ctx, config, lambda n: sampler_for(n, compact_halvings), params,
                      jax.random.PRNGKey(0))
    results = {(name, mode): measure(sampler_for(n, compact), params, p, r, args.repeats)
               for name, (n, p, r) in calls.items()
               for mode, compact in (("compact", compact_halvings), ("whole", 0))}
  finally:
    ctx.close()
  for name in calls:
    if not np.array_equal(results[name, "compact"]["tokens"], results[name, "whole"]["tokens"]):
      sys.exit(f"{name}: compaction changed the sampled tokens; the sampler has a bug.")
  print(f"sampling.compact_halvings={compact_halvings} (compact) against 0 (whole)")
  print(f"{'workload':<10}{'mode':>8}{'rows':>6}{'padded':>8}{'mean len':>10}{'max len':>9}"
        f"{'seconds':>9}{'1st call':>9}{'kept tok/s':>12}{'computed/s':>12}{'used':>7}")
  for (name, mode), r in results.items():
    print(f"{name:<10}{mode:>8}{r['calls_rows']:>6}{r['padded_rows']:>8}"
          f"{r['mean_length']:>10.1f}{r['max_length']:>9}{r['seconds']:>9.3f}"
          f"{r['first_call_seconds']:>9.2f}{r['kept_per_s']:>12.0f}"
          f"{r['computed_per_s']:>12.0f}{r['used_share']:>7.2f}")
  summary = {}
  for name in calls:
    compact, whole = results[name, "compact"], results[name, "whole"]
    summary[name] = {"ours": round(compact["kept_per_s"], 1),
                     "baseline": round(whole["kept_per_s"], 1),
                     "ratio": round(compact["kept_per_s"] / whole["kept_per_s"], 3),
                     "used_share": round(compact["used_share"], 3),
                     "baseline_used_share": round(whole["used_share"], 3),
                     "seconds": round(compact["seconds"], 4),
                     "baseline_seconds": round(whole["seconds"], 4),
                     "rows": compact["calls_rows"], "padded_rows": compact["padded_rows"]}
  print(json.dumps({"benchmark": "sampler_ragged",
                    "metric": "kept tokens/s with row compaction (ours) vs without (baseline)",
                    **summary}))


if __name__ == "__main__":
  main()
