"""Models: the Qwen2/Llama decoder, its heads, and Hugging Face checkpoint I/O."""
from psgpo_jax.models.config import ModelConfig
from psgpo_jax.models.heads import (CausalLM, ScalarModel, init_params, logical_axes,
                                    scalar_params_from_causal)
from psgpo_jax.models.transformer import KVCache, Transformer, init_cache
from psgpo_jax.models.hf_config import load_hf_config
from psgpo_jax.models.hf_io import load_hf_checkpoint, save_hf_checkpoint
