"""psgpo_jax: Process Supervision-Guided Policy Optimization for code LLMs, in JAX."""
__version__ = "0.1.0"
