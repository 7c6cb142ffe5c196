"""Every config in configs/ loads and validates; the CLI names bad fields clearly; every
field of configs/base.py is read."""
import collections.abc
import glob
import os
import re
import subprocess
import sys

import jax
import ml_collections
import pytest

from experiments.common import load_config
from psgpo_jax.configuration import ConfigError, model_config, validate_config
from psgpo_jax.models import CausalLM, init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                      if not p.endswith("__init__.py"))
VARIANTS = [os.path.join(ROOT, "configs", v) for v in (
    "quickstart.py:tiny", "ablation.py:none", "ablation.py:dense", "ablation.py:value",
    "ablation.py:oracle",
    "qwen25_coder.py:1.5b", "qwen25_coder.py:7b", "qwen25_coder.py:toy")]


@pytest.mark.parametrize("path", CONFIG_FILES + VARIANTS, ids=os.path.basename)
def test_config_file_loads_validates_and_builds_model_shapes(path):
  config = validate_config(load_config(path))
  cfg = model_config(config.model, vocab_size=512)
  # Shapes only: nothing is allocated, so big configs are checked too.
  shapes = jax.eval_shape(lambda: init_params(CausalLM(cfg), jax.random.PRNGKey(0)))
  count = sum(x.size for x in jax.tree_util.tree_leaves(shapes))
  assert count == cfg.num_params()


def test_bad_values_are_all_named():
  config = load_config(os.path.join(ROOT, "configs", "quickstart.py"))
  config.rl.value_init = "critic"
  config.sampling.top_p = 1.5
  config.rl.num_minibatches = 7
  with pytest.raises(ConfigError) as info:
    validate_config(config)
  message = str(info.value)
  assert "rl.value_init='critic'" in message and "sampling.top_p=1.5" in message
  assert "num_minibatches=7" in message


def _train_cli(*args):
  return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def test_cli_rejects_unknown_field_with_its_name():
  out = _train_cli("--config", "configs/quickstart.py", "--config.nonexistent=1")
  assert out.returncode != 0
  assert "Unknown config field 'nonexistent'" in out.stderr


def test_cli_rejects_ill_typed_and_invalid_values():
  out = _train_cli("--config", "configs/quickstart.py", "--config.rl.steps=abc")
  assert out.returncode != 0 and "rl.steps" in out.stderr
  out = _train_cli("--config", "configs/quickstart.py", "--config.rl.value_init=critic",
                   "--config.workdir=/tmp/psgpo_never_written")
  assert out.returncode != 0 and "rl.value_init='critic'" in out.stderr
  assert not os.path.exists("/tmp/psgpo_never_written")


class _Recorder(collections.abc.Mapping):
  """A read-only view of a ConfigDict that records the path of every field read."""

  def __init__(self, section, seen, prefix=""):
    object.__setattr__(self, "_section", section)
    object.__setattr__(self, "_seen", seen)
    object.__setattr__(self, "_prefix", prefix)

  def __getitem__(self, key):
    value = self._section[key]
    self._seen.add(self._prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      return _Recorder(value, self._seen, f"{self._prefix}{key}.")
    return value

  def __getattr__(self, key):
    if key.startswith("__"):
      raise AttributeError(key)
    try:
      return self[key]
    except KeyError as exc:
      raise AttributeError(key) from exc

  def __iter__(self):
    return iter(self._section.keys())

  def __len__(self):
    return len(self._section)


def test_every_base_field_is_read_by_some_code_path():
  """A field nothing reads is a promise the code does not keep. Sections that become
  typed records are read through them (recorded while the records are built from a
  view of the config that logs every access); any other field must be read by its
  path somewhere in the package, the experiments or the benchmarks."""
  from configs import base  # pylint: disable=import-outside-toplevel
  from psgpo_jax.configuration import field_paths  # pylint: disable=import-outside-toplevel
  from psgpo_jax.prm.labeler import LabelingConfig  # pylint: disable=import-outside-toplevel
  from psgpo_jax.prm.train import PRMTrainConfig  # pylint: disable=import-outside-toplevel
  from psgpo_jax.rl.ppo import PPOConfig  # pylint: disable=import-outside-toplevel
  from psgpo_jax.rl.rewards import RewardConfig  # pylint: disable=import-outside-toplevel
  from psgpo_jax.sampling_config import SamplingConfig  # pylint: disable=import-outside-toplevel
  config = base.get_config()
  config.sampling.stop_strings = ""
  seen = set()
  view = _Recorder(config, seen)
  model_config(view.model, vocab_size=512)
  SamplingConfig.from_dict(view.sampling)
  RewardConfig.from_config(view.rl.reward)
  PPOConfig.from_config(view.rl)
  LabelingConfig.from_config(view)
  PRMTrainConfig.from_config(view)
  source = ""
  for folder in ("psgpo_jax", "experiments", "benchmarks"):
    for path in glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True):
      with open(path, encoding="utf-8") as f:
        source += f.read()
  unread = []
  for path in field_paths(config):
    if path in seen:
      continue
    *sections, name = path.split(".")
    section = sections[-1] if sections else "config"
    patterns = (rf"\b{section}\.{name}\b", rf"\b{section}\[[\"']{name}[\"']\]",
                rf"\b{section}\.get\([\"']{name}[\"']")
    if not any(re.search(p, source) for p in patterns):
      unread.append(path)
  assert not unread, f"configs/base.py fields that no code reads: {unread}"


@pytest.mark.parametrize("module", ["evaluate", "ablation", "plan_memory", "prepare_tfds",
                                    "make_toy_checkpoint", "memory_vs_compiler"])
def test_every_entry_point_prints_its_help_and_exits_0(module):
  out = subprocess.run([sys.executable, "-m", f"experiments.{module}", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"experiments.{module}" in out.stdout or "usage:" in out.stdout


def test_help_prints_the_usage_and_every_field():
  out = _train_cli("--help")
  assert out.returncode == 0, out.stderr
  assert "python -m experiments.train --config configs/quickstart.py" in out.stdout
  assert "rl.policy_lr = " in out.stdout and "sft.schedule = 'wsd'" in out.stdout


def test_mesh_rules_given_on_the_command_line_shard_the_params_as_they_say():
  """`--config.mesh.rules` reaches the sharding: replicating the embed and vocab axes on an
  8-way fsdp mesh makes the policy's params per device 8x those of the default rules."""
  def policy_bytes(*extra):
    out = subprocess.run([sys.executable, "-m", "experiments.plan_memory", "--config",
                          "configs/quickstart.py", "--num_devices=8", "--device_gb=16",
                          "--config.mesh.shape=(1,8,1)", *extra], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    (line,) = [l for l in out.stdout.splitlines() if l.startswith("params/policy")]
    number, unit = line.split()[1:3]
    return float(number) * {"KiB": 2 ** 10, "MiB": 2 ** 20}[unit]
  sharded, replicated = policy_bytes(), policy_bytes("--config.mesh.rules=embed:,vocab:")
  assert replicated / sharded == pytest.approx(8, rel=0.01)
