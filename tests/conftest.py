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
