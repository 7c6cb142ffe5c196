"""Writes a config's problems as a TFDS problem set (array_record files), which any
host of a pod then reads by index with `data.source=tfds`:

    python -m experiments.prepare_tfds --config configs/quickstart.py \\
        --data_dir data/tfds --name synthetic_quickstart
    python -m experiments.train --config configs/quickstart.py --config.data.source=tfds \\
        --config.data.train_path=data/tfds --config.data.tfds_name=synthetic_quickstart

The set gets the config's "train" and "eval" splits (the held-out problems, as the run
would split them), and beside them the problems' sources, which decide the run's stop
strings, SFT corpus and oracle when it reads the set. An existing set of that name is
kept unless `--overwrite`.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from absl import app, flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pipeline config file (configs/*.py).",
                                          lock_config=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory to write into.")
_NAME = flags.DEFINE_string("name", None, "The set's name (letters, digits, underscores).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing set of that name.")


def main(argv):
  del argv
  if not _DATA_DIR.value or not _NAME.value:
    sys.exit("error: pass --data_dir and --name (see --help).")
  from psgpo_jax import run_setup  # pylint: disable=import-outside-toplevel
  path = run_setup.write_tfds_set(_CONFIG.value, os.path.abspath(_DATA_DIR.value), _NAME.value,
                                  _OVERWRITE.value)
  print(f"wrote {path}; read it with --config.data.source=tfds "
        f"--config.data.train_path={_DATA_DIR.value} --config.data.tfds_name={_NAME.value}")


if __name__ == "__main__":
  common.check_config_flags(sys.argv, __doc__)
  app.run(main)
