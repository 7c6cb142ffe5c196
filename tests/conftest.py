"""Test setup: 8 simulated CPU devices for sharding tests, offline Hugging Face."""
import os

# Must be set before JAX initialises its backends.
# Appended to any XLA_FLAGS of the caller (e.g. --xla_cpu_multi_thread_eigen=false), so
# that the sharding tests still see 8 devices.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache for the session's own process: the tests build many trainers
# and stages of the same settings, each with its own jitted closures; the second and later
# ones load the first one's compiled programs (the same programs, so the same results).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit  # noqa: E402
  import shutil  # noqa: E402
  import tempfile  # noqa: E402
  _CACHE_DIR = tempfile.mkdtemp(prefix="psgpo_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE_DIR,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")

import pytest  # noqa: E402  (after the environment above)


@pytest.fixture(scope="session")
def toy_checkpoint(tmp_path_factory) -> str:
  """A toy Qwen2.5-Coder-Instruct style directory (random Qwen2 + BPE on HumanEval),
  built once per session by experiments/make_toy_checkpoint.py."""
  from experiments.make_toy_checkpoint import build_toy_checkpoint
  return build_toy_checkpoint(str(tmp_path_factory.mktemp("toy_qwen25_coder")))


@pytest.fixture(scope="session")
def subprocess_env(tmp_path_factory):
  """The environment of the tests' pipeline subprocesses: one CPU device (no simulated
  eight) and one XLA compilation cache for the whole session, so that each launch of the
  tiny pipeline loads what an earlier one compiled (the same programs, so the same
  results) instead of compiling it again."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return env
