"""Prints the bytes per device a config needs on its mesh, and whether it fits.

    python -m experiments.plan_memory --config configs/quickstart.py \\
        --config.mesh.shape="(2,4,1)" --device_gb 16

Counts params, gradients, optimizer state, the sampler's KV cache and training activations
of the RL stage (`psgpo_jax.memory`). Nothing is allocated, so a 7B config on a 256-chip
mesh can be planned on a laptop (`--num_devices` fills a -1 in the mesh shape). Exits
with status 1 and the numbers when the config does not fit `--device_gb` (default: the
first device's reported memory limit; CPUs report none, then only the table is printed).
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pipeline config file (configs/*.py).",
                                          lock_config=True)
_DEVICE_GB = flags.DEFINE_float("device_gb", 0.0, "Memory of one device in GiB (0 = detect).")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 0,
                                    "Devices that fill a -1 in mesh.shape (0 = this host's).")


def main(argv):
  del argv
  if not any(a.startswith(("--verbosity", "-v=")) for a in sys.argv):
    logging.set_verbosity(logging.WARNING)   # JAX logs each backend it cannot start at INFO
  from psgpo_jax import memory  # pylint: disable=import-outside-toplevel
  device_bytes = int(_DEVICE_GB.value * memory.GiB) if _DEVICE_GB.value > 0 else None
  plan = memory.plan_from_config(_CONFIG.value, device_bytes=device_bytes,
                                 num_devices=_NUM_DEVICES.value or None)
  print(memory.format_plan(plan))
  if plan.device_bytes is None:
    print("(no device memory limit known: pass --device_gb to check the fit)")
    return
  try:
    memory.check_fits(plan)
  except memory.NotEnoughMemoryError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  common.check_config_flags(sys.argv, __doc__)
  app.run(main)
