"""Runs a PSGPO pipeline: `python -m experiments.train --config configs/quickstart.py`.

Any config field can be overridden: `--config.rl.kl_coef=0.02`. Stages whose output
exists in `config.workdir` are skipped, so re-running a command continues a run.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from absl import app, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pipeline config file (configs/*.py).",
                                          lock_config=True)


def main(argv):
  del argv
  if not any(a.startswith(("--verbosity", "-v=")) for a in sys.argv):
    logging.set_verbosity(logging.WARNING)   # orbax logs every file it writes at INFO
  from psgpo_jax import pipeline  # pylint: disable=import-outside-toplevel
  from psgpo_jax.configuration import ConfigError  # pylint: disable=import-outside-toplevel
  try:
    pipeline.run(_CONFIG.value)
  except ConfigError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  common.check_config_flags(sys.argv, __doc__)
  app.run(main)
