"""What every entry point does before absl parses flags."""
import sys
from typing import Sequence

from psgpo_jax.configuration import ConfigError, check_override_flags


def _config_file_arg(argv: Sequence[str]) -> str:
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  return ""


def check_config_flags(argv: Sequence[str]) -> None:
  """Exits with a clear message when the config file is missing or a field is unknown.

  ml_collections reports an unknown `--config.x=...` as a bare AttributeError deep in a
  traceback; this names the field and the closest known ones instead.
  """
  spec = _config_file_arg(argv)
  if not spec:
    sys.exit("error: pass a config file, e.g. --config configs/quickstart.py")
  path = spec.split(":", 1)[0]
  try:
    config = load_config(spec)
  except FileNotFoundError:
    sys.exit(f"error: config file {path!r} not found (configs live in configs/*.py)")
  try:
    check_override_flags(config, argv)
  except ConfigError as e:
    sys.exit(f"error: {e}")


def load_config(spec: str):
  """Loads `path[:arg]` and calls its get_config(arg)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(path)
  module_spec = importlib.util.spec_from_file_location("_pipeline_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


