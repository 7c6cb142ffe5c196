"""Hugging Face config.json <-> our ModelConfig, and the errors of checkpoint I/O.

`load_hf_config` reads a local checkpoint directory's config.json (through `transformers`'
configuration classes: Qwen2Config / LlamaConfig) into a `ModelConfig`, refusing features
our model does not implement with a message that says which; `hf_config_for` writes the
other way. The tensors themselves are `hf_io.py`'s.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Optional, Tuple

import transformers

from psgpo_jax.models.config import DTYPES, ModelConfig

PathLike = os.PathLike | str

# HF class name -> (our architecture, our model kind).
SUPPORTED_ARCHITECTURES = {
    "Qwen2ForCausalLM": ("qwen2", "causal_lm"),
    "LlamaForCausalLM": ("llama", "causal_lm"),
    "Qwen2ForTokenClassification": ("qwen2", "scalar"),
    "LlamaForTokenClassification": ("llama", "scalar"),
}
MODEL_KINDS = ("causal_lm", "scalar")
CONFIG_FILE = "config.json"


class HFCheckpointError(Exception):
  """Base class of every error raised while reading or writing a checkpoint."""


class CheckpointNotFoundError(HFCheckpointError, FileNotFoundError):
  """The directory, its config.json or its safetensors files are missing."""


class UnsupportedArchitectureError(HFCheckpointError, ValueError):
  """The checkpoint's architecture is not one of `SUPPORTED_ARCHITECTURES`."""


class UnsupportedConfigError(HFCheckpointError, ValueError):
  """A supported architecture uses a feature our model does not implement."""


class TensorNamesError(HFCheckpointError, ValueError):
  """Tensors are missing from, or unexpected in, a checkpoint or a params tree."""


class TensorShapeError(HFCheckpointError, ValueError):
  """A tensor's shape does not match the one the config implies."""


# ---------------------------------------------------------------------------------------
# config.json


def check_kind(model: str) -> None:
  """Raises unless `model` is one of MODEL_KINDS."""
  if model not in MODEL_KINDS:
    raise ValueError(f"model={model!r}; choose one of {MODEL_KINDS}.")


def checkpoint_dir(path: PathLike) -> pathlib.Path:
  """The checkpoint directory, checked to exist and to hold config.json."""
  path = pathlib.Path(path).expanduser()
  if not path.is_dir():
    raise CheckpointNotFoundError(
        f"Checkpoint directory {str(path)!r} does not exist. Pass a local directory "
        f"holding config.json and *.safetensors (e.g. one written by save_pretrained or "
        f"downloaded with `huggingface-cli download <repo> --local-dir <dir>`).")
  if not (path / CONFIG_FILE).is_file():
    raise CheckpointNotFoundError(
        f"{str(path)!r} has no {CONFIG_FILE}; a Hugging Face checkpoint directory needs "
        f"config.json next to its *.safetensors files.")
  return path


def _raw_config(path: pathlib.Path) -> dict:
  try:
    return json.loads((path / CONFIG_FILE).read_text())
  except json.JSONDecodeError as err:
    raise UnsupportedConfigError(f"{path / CONFIG_FILE} is not valid JSON: {err}") from err


def _architecture(raw: dict, path: pathlib.Path) -> Tuple[str, Optional[str], str]:
  """(our architecture, our model kind or None if unknown, HF class name) of a config."""
  supported = ", ".join(SUPPORTED_ARCHITECTURES)
  names = raw.get("architectures") or []
  if names:
    name = names[0]
    if name not in SUPPORTED_ARCHITECTURES:
      raise UnsupportedArchitectureError(
          f"{path} holds a {name} checkpoint; supported architectures: {supported}.")
    return (*SUPPORTED_ARCHITECTURES[name], name)
  model_type = raw.get("model_type")
  if model_type in ("qwen2", "llama"):
    return model_type, None, model_type
  raise UnsupportedArchitectureError(
      f"{path / CONFIG_FILE} has model_type={model_type!r} and no supported "
      f"'architectures' entry; supported architectures: {supported}.")


def _dtype_name(value) -> Optional[str]:
  """'float32' from 'float32', torch.float32 or None."""
  if value is None:
    return None
  return str(value).replace("torch.", "")


def config_from_hf(hf_config, dtype: Optional[str] = None,
                   architecture: Optional[str] = None) -> ModelConfig:
  """Maps a `transformers` Qwen2Config / LlamaConfig to our `ModelConfig`.

  Args:
    hf_config: a `transformers.PretrainedConfig` of model_type "qwen2" or "llama".
    dtype: compute and parameter dtype ("float32", "bfloat16", "float16"); defaults to
      the checkpoint's stored dtype when it is one of those, else float32.
    architecture: "qwen2" or "llama"; defaults to `hf_config.model_type`.
  Returns:
    the ModelConfig. Raises UnsupportedConfigError for features our model lacks.
  """
  arch = architecture or hf_config.model_type
  if arch not in ("qwen2", "llama"):
    raise UnsupportedArchitectureError(
        f"model_type={hf_config.model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}.")
  act = getattr(hf_config, "hidden_act", "silu")
  if act != "silu":
    raise UnsupportedConfigError(f"hidden_act={act!r}; only 'silu' (SwiGLU) is implemented.")
  if getattr(hf_config, "mlp_bias", False):
    raise UnsupportedConfigError("mlp_bias=True is not implemented (Llama MLP must be bias-free).")
  if arch == "qwen2" and getattr(hf_config, "use_sliding_window", False):
    raise UnsupportedConfigError(
        "use_sliding_window=True is not implemented; only full attention is. Set "
        "use_sliding_window=false in config.json if sequences stay under sliding_window.")
  rope = dict(getattr(hf_config, "rope_parameters", None) or {})
  legacy = getattr(hf_config, "rope_scaling", None)       # transformers < 5
  if legacy and not rope.get("rope_type"):
    rope.update(legacy)
  rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
  if rope_type != "default":
    raise UnsupportedConfigError(
        f"RoPE scaling {rope_type!r} is not implemented; only the default rotary embedding "
        f"is. Remove rope_scaling/rope_parameters scaling from config.json only if the "
        f"model was trained without it.")
  theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", None))
  if dtype is None:
    stored = _dtype_name(getattr(hf_config, "dtype", None) or
                         getattr(hf_config, "torch_dtype", None))
    dtype = stored if stored in DTYPES else "float32"
  eos = hf_config.eos_token_id
  if isinstance(eos, (list, tuple)):
    eos = eos[0] if eos else None
  bos = hf_config.bos_token_id
  head_dim = getattr(hf_config, "head_dim", None)
  return ModelConfig(
      architecture=arch,
      vocab_size=hf_config.vocab_size,
      hidden_size=hf_config.hidden_size,
      intermediate_size=hf_config.intermediate_size,
      num_hidden_layers=hf_config.num_hidden_layers,
      num_attention_heads=hf_config.num_attention_heads,
      num_key_value_heads=(getattr(hf_config, "num_key_value_heads", None)
                           or hf_config.num_attention_heads),
      head_dim=head_dim if head_dim != hf_config.hidden_size // hf_config.num_attention_heads
      else None,
      rope_theta=float(theta if theta is not None else 10000.0),
      rms_norm_eps=float(hf_config.rms_norm_eps),
      max_position_embeddings=hf_config.max_position_embeddings,
      tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
      attention_bias=True if arch == "qwen2" else bool(getattr(hf_config, "attention_bias", False)),
      dtype=dtype,
      param_dtype=dtype,
      initializer_range=float(getattr(hf_config, "initializer_range", 0.02)),
      bos_token_id=bos if isinstance(bos, int) else None,
      eos_token_id=eos,
  )


def read_config(path: PathLike, dtype: Optional[str]):
  """(ModelConfig, our model kind or None, HF class name, HF config) of a directory."""
  path = checkpoint_dir(path)
  arch, kind, name = _architecture(_raw_config(path), path)
  hf_config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
  if kind == "scalar" and getattr(hf_config, "num_labels", 1) != 1:
    raise UnsupportedConfigError(
        f"{name} has num_labels={hf_config.num_labels}; ScalarModel needs num_labels=1.")
  return config_from_hf(hf_config, dtype, arch), kind, name, hf_config


def load_hf_config(path: PathLike, dtype: Optional[str] = None) -> ModelConfig:
  """The ModelConfig of a local Hugging Face checkpoint directory (config.json only)."""
  return read_config(path, dtype)[0]


def hf_config_for(cfg: ModelConfig, model: str = "causal_lm"):
  """The `transformers` configuration object describing `cfg` (Qwen2Config/LlamaConfig)."""
  check_kind(model)
  qwen = cfg.architecture == "qwen2"
  cls = transformers.Qwen2Config if qwen else transformers.LlamaConfig
  suffix = "ForTokenClassification" if model == "scalar" else "ForCausalLM"
  kwargs = dict(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
      num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
      hidden_act="silu", rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
      max_position_embeddings=cfg.max_position_embeddings,
      tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.initializer_range,
      bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
      architectures=[("Qwen2" if qwen else "Llama") + suffix])
  if not qwen:
    kwargs.update(attention_bias=cfg.attention_bias, mlp_bias=False, head_dim=cfg.kv_head_dim)
  elif cfg.kv_head_dim != cfg.hidden_size // cfg.num_attention_heads:
    kwargs["head_dim"] = cfg.kv_head_dim
  if model == "scalar":
    kwargs["num_labels"] = 1
  dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
  kwargs[dtype_key] = cfg.param_dtype
  return cls(**kwargs)
