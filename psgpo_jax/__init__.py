"""psgpo_jax: Process Supervision-Guided Policy Optimization for code LLMs, in JAX."""
import os as _os

# transformers is used for configs and tokenizers only: silence its "PyTorch was not
# found" advisory, which is expected here.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
