"""Every config in configs/ loads and validates; the CLI names bad fields clearly."""
import glob
import os
import subprocess
import sys

import jax
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
