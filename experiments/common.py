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


HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull")


def usage(doc: str, argv: Sequence[str]) -> str:
  """An entry point's help: its docstring, then every config field with its value in
  the given config (configs/quickstart.py when none is given)."""
  from psgpo_jax.configuration import field_paths  # pylint: disable=import-outside-toplevel
  spec = _config_file_arg(argv) or "configs/quickstart.py"
  lines = [doc.strip(), "", f"Config fields (values of {spec}; their meanings are in "
           "configs/base.py), each settable as --config.<field>=<value>:"]
  try:
    config = load_config(spec)
  except FileNotFoundError:
    return "\n".join(lines[:2] + [f"(config file {spec!r} not found)"])
  for path in field_paths(config):
    value = config
    for part in path.split("."):
      value = value[part]
    lines.append(f"  {path} = {value!r}")
  return "\n".join(lines)


def check_config_flags(argv: Sequence[str], doc: str = "") -> None:
  """Exits with a clear message when the config file is missing or a field is unknown;
  with -h / --help, prints `usage(doc, argv)` and exits.

  ml_collections reports an unknown `--config.x=...` as a bare AttributeError deep in a
  traceback; this names the field and the closest known ones instead.
  """
  if any(a in HELP_FLAGS for a in argv[1:]):
    print(usage(doc or "Pass --config configs/<name>.py and any --config.<field>=<value>.",
                argv))
    sys.exit(0)
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


