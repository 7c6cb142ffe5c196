"""Hugging Face checkpoints (config.json + *.safetensors) <-> Flax params.

Supported architectures: `Qwen2ForCausalLM`, `LlamaForCausalLM` (loaded into `CausalLM`)
and `Qwen2ForTokenClassification`, `LlamaForTokenClassification` with `num_labels=1`
(loaded into `ScalarModel`: the value model / PRM). A ScalarModel that starts from a
causal LM checkpoint loads it with `model="causal_lm"` and then calls
`heads.scalar_params_from_causal(params, cfg, rng)`, which keeps the backbone and adds a
fresh `score` head.

Weight layout (HF `nn.Linear.weight` is [out, in]; our kernels are [in, out] with the
head axis split out):

  model.embed_tokens.weight [V, D]           -> model/embed_tokens/embedding [V, D]
  self_attn.{q,k,v}_proj.weight [N*Dh, D]    -> self_attn/{q,k,v}_proj/kernel [D, N, Dh]
  self_attn.{q,k,v}_proj.bias [N*Dh]         -> self_attn/{q,k,v}_proj/bias [N, Dh]
  self_attn.o_proj.weight [D, H*Dh]          -> self_attn/o_proj/kernel [H, Dh, D]
  mlp.{gate,up,down}_proj.weight [out, in]   -> mlp/{gate,up,down}_proj/kernel [in, out]
  *_layernorm.weight, model.norm.weight [D]  -> .../scale [D]
  lm_head.weight [V, D]                      -> lm_head/kernel [D, V]  (untied only)
  score.weight [1, D], score.bias [1]        -> score/kernel [D, 1], score/bias [1]

Nothing here needs torch: tensors are read and written with `safetensors` (numpy, or
flax for dtypes an old numpy backend cannot read, e.g. bfloat16); config.json and the
errors are `hf_config.py`'s.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from psgpo_jax.models.config import ModelConfig
from psgpo_jax.models.hf_config import (CheckpointNotFoundError, TensorNamesError,
                                        TensorShapeError, UnsupportedArchitectureError,
                                        UnsupportedConfigError, check_kind, hf_config_for,
                                        read_config)

PathLike = os.PathLike | str

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tensors some checkpoints carry that hold no parameters of ours.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------------------
# The tensor table: one entry per HF tensor, with its Flax path and conversions.


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One checkpoint tensor: its HF name and shape, our param path and shape."""
  hf_name: str
  path: Tuple[str, ...]
  hf_shape: Tuple[int, ...]
  shape: Tuple[int, ...]
  to_flax: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _identity(x: np.ndarray) -> np.ndarray:
  return x


def _transpose(x: np.ndarray) -> np.ndarray:
  return x.T


def _linear(hf_name: str, path: Tuple[str, ...], n_in: int, n_out: int) -> _Tensor:
  """HF [out, in] weight <-> our [in, out] kernel."""
  return _Tensor(hf_name, path, (n_out, n_in), (n_in, n_out), _transpose, _transpose)


def _heads_in(hf_name: str, path: Tuple[str, ...], d: int, n: int, dh: int) -> _Tensor:
  """q/k/v: HF [N*Dh, D] <-> ours [D, N, Dh]."""
  return _Tensor(hf_name, path, (n * dh, d), (d, n, dh),
                 lambda w: w.T.reshape(d, n, dh), lambda k: k.reshape(d, n * dh).T)


def _heads_bias(hf_name: str, path: Tuple[str, ...], n: int, dh: int) -> _Tensor:
  """q/k/v bias: HF [N*Dh] <-> ours [N, Dh]."""
  return _Tensor(hf_name, path, (n * dh,), (n, dh),
                 lambda b: b.reshape(n, dh), lambda b: b.reshape(n * dh))


def _heads_out(hf_name: str, path: Tuple[str, ...], d: int, h: int, dh: int) -> _Tensor:
  """o_proj: HF [D, H*Dh] <-> ours [H, Dh, D]."""
  return _Tensor(hf_name, path, (d, h * dh), (h, dh, d),
                 lambda w: w.T.reshape(h, dh, d), lambda k: k.reshape(h * dh, d).T)


def _vector(hf_name: str, path: Tuple[str, ...], n: int) -> _Tensor:
  return _Tensor(hf_name, path, (n,), (n,), _identity, _identity)


def tensor_table(cfg: ModelConfig, model: str = "causal_lm") -> List[_Tensor]:
  """Every HF tensor of a checkpoint for `cfg`, in Hugging Face's order.

  Args:
    cfg: the model config.
    model: "causal_lm" (CausalLM params) or "scalar" (ScalarModel params).
  Returns:
    one `_Tensor` per parameter of our params tree (tied embeddings: no lm_head).
  """
  check_kind(model)
  d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  h, kv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.kv_head_dim
  table = [_Tensor("model.embed_tokens.weight", ("model", "embed_tokens", "embedding"),
                   (v, d), (v, d), _identity, _identity)]
  for i in range(cfg.num_hidden_layers):
    hf, ours = f"model.layers.{i}.", ("model", f"layers_{i}")
    attn = ours + ("self_attn",)
    table.append(_vector(hf + "input_layernorm.weight", ours + ("input_layernorm", "scale"), d))
    for proj, n in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
      table.append(_heads_in(f"{hf}self_attn.{proj}.weight", attn + (proj, "kernel"), d, n, dh))
      if cfg.attention_bias:
        table.append(_heads_bias(f"{hf}self_attn.{proj}.bias", attn + (proj, "bias"), n, dh))
    table.append(_heads_out(hf + "self_attn.o_proj.weight", attn + ("o_proj", "kernel"), d, h, dh))
    table.append(_vector(hf + "post_attention_layernorm.weight",
                         ours + ("post_attention_layernorm", "scale"), d))
    mlp = ours + ("mlp",)
    table.append(_linear(hf + "mlp.gate_proj.weight", mlp + ("gate_proj", "kernel"), d, f))
    table.append(_linear(hf + "mlp.up_proj.weight", mlp + ("up_proj", "kernel"), d, f))
    table.append(_linear(hf + "mlp.down_proj.weight", mlp + ("down_proj", "kernel"), f, d))
  table.append(_vector("model.norm.weight", ("model", "norm", "scale"), d))
  if model == "scalar":
    table.append(_linear("score.weight", ("score", "kernel"), d, 1))
    table.append(_vector("score.bias", ("score", "bias"), 1))
  elif not cfg.tie_word_embeddings:
    table.append(_linear("lm_head.weight", ("lm_head", "kernel"), d, v))
  return table


def _zero_biases(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
  """Bias tensors an HF class always has but our config leaves out (written as zeros).

  Qwen2 always has q/k/v biases; Llama with `attention_bias` also biases o_proj.
  """
  h, kv, dh, d = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.kv_head_dim,
                  cfg.hidden_size)
  out = {}
  for i in range(cfg.num_hidden_layers):
    attn = f"model.layers.{i}.self_attn."
    if cfg.architecture == "qwen2" and not cfg.attention_bias:
      out.update({attn + "q_proj.bias": (h * dh,), attn + "k_proj.bias": (kv * dh,),
                  attn + "v_proj.bias": (kv * dh,)})
    if cfg.architecture == "llama" and cfg.attention_bias:
      out[attn + "o_proj.bias"] = (d,)
  return out


# ---------------------------------------------------------------------------------------
# Loading


def _tensor_files(path: pathlib.Path) -> Dict[str, pathlib.Path]:
  """Maps every tensor name of the checkpoint to the safetensors file holding it."""
  index = path / INDEX_FILE
  if index.is_file():
    weight_map = json.loads(index.read_text()).get("weight_map", {})
    missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
    if missing:
      raise CheckpointNotFoundError(
          f"{index} lists shard file(s) that are not in {path}: {missing}. Download or "
          f"copy every shard into the directory.")
    return {name: path / f for name, f in weight_map.items()}
  files = [path / SINGLE_FILE] if (path / SINGLE_FILE).is_file() else sorted(
      path.glob("*.safetensors"))
  if not files:
    others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pth"))
    hint = (f" It holds {others}: convert them to safetensors first (load with "
            f"transformers and save_pretrained(dir, safe_serialization=True)).") if others else ""
    raise CheckpointNotFoundError(f"{path} holds no *.safetensors weight files.{hint}")
  names = {}
  for file in files:
    with safe_open(str(file), framework="numpy") as handle:
      names.update({name: file for name in handle.keys()})
  return names


def _name_list(names: Iterable[str], limit: int = 20) -> str:
  names = sorted(names)
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def _check_names(expected: Iterable[str], found: Iterable[str], where: str, hint: str) -> None:
  """Raises TensorNamesError naming missing and unexpected tensors."""
  expected, found = set(expected), set(found)
  missing, unexpected = expected - found, found - expected
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing {len(missing)} tensor(s): {_name_list(missing)}")
    if unexpected:
      parts.append(f"unexpected {len(unexpected)} tensor(s): {_name_list(unexpected)}")
    raise TensorNamesError(f"{where}: {'; '.join(parts)}. {hint}")


def _read_tensor(handle, file: pathlib.Path, name: str) -> np.ndarray:
  """One tensor as a numpy array (bfloat16 via ml_dtypes when numpy cannot read it)."""
  try:
    return handle.get_tensor(name)
  except (TypeError, ValueError):     # old safetensors: no bf16 in numpy
    with safe_open(str(file), framework="flax") as flax_handle:
      return np.asarray(flax_handle.get_tensor(name))


def _set(tree: dict, path: Tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def load_hf_checkpoint(path: PathLike, dtype: Optional[str] = None,
                       model: str = "causal_lm") -> Tuple[ModelConfig, dict]:
  """Loads a local Hugging Face checkpoint directory into Flax params.

  Args:
    path: directory with config.json and model.safetensors, or sharded
      model-*.safetensors with model.safetensors.index.json.
    dtype: parameter and compute dtype of the result ("float32", "bfloat16",
      "float16"); default: the checkpoint's stored dtype (float32 if unknown).
    model: "causal_lm" (a *ForCausalLM checkpoint -> CausalLM params) or "scalar"
      (a *ForTokenClassification checkpoint with num_labels=1 -> ScalarModel params).
  Returns:
    (cfg, params): params is a plain pytree of jnp arrays of `cfg.param_dtype`, in
    the layout of `CausalLM(cfg)` / `ScalarModel(cfg)`.
  """
  check_kind(model)
  cfg, kind, name, hf_config = read_config(path, dtype)
  path = pathlib.Path(path).expanduser()
  if kind is not None and kind != model:
    if kind == "causal_lm":
      raise UnsupportedArchitectureError(
          f"{path} is a {name} (causal LM) checkpoint but model='scalar' was asked for. To "
          f"start a ScalarModel from it, load it with model='causal_lm' and call "
          f"psgpo_jax.models.scalar_params_from_causal(params, cfg, rng).")
    raise UnsupportedArchitectureError(
        f"{path} is a {name} (scalar head) checkpoint; load it with model='scalar'.")
  table = tensor_table(cfg, model)
  files = _tensor_files(path)
  optional = set()
  if model == "causal_lm" and cfg.tie_word_embeddings:
    optional.add("lm_head.weight")             # some tied checkpoints store it anyway
  o_bias = {} if cfg.architecture != "llama" else {
      k: s for k, s in _zero_biases(cfg).items() if k.endswith("o_proj.bias")}
  present = {n for n in files if not n.endswith(_IGNORED_SUFFIXES) and n not in optional}
  _check_names([t.hf_name for t in table] + list(o_bias), present, f"checkpoint {path}",
               f"It does not match the {name} layout that config.json describes; check "
               f"that config.json belongs to these weights.")
  params: dict = {}
  by_file: Dict[pathlib.Path, List[_Tensor]] = {}
  for t in table:
    by_file.setdefault(files[t.hf_name], []).append(t)
  for file, tensors in by_file.items():
    with safe_open(str(file), framework="numpy") as handle:
      for t in tensors:
        found = tuple(handle.get_slice(t.hf_name).get_shape())
        if found != t.hf_shape:
          raise TensorShapeError(
              f"checkpoint {path}: tensor {t.hf_name} has shape {list(found)}, expected "
              f"{list(t.hf_shape)} from config.json; check that config.json belongs to "
              f"these weights.")
      for t in tensors:
        value = t.to_flax(_read_tensor(handle, file, t.hf_name))
        _set(params, t.path, jnp.asarray(value, dtype=cfg.storage_dtype))
  for bias_name in o_bias:
    with safe_open(str(files[bias_name]), framework="numpy") as handle:
      bias = _read_tensor(handle, files[bias_name], bias_name)
    if np.any(np.asarray(bias, np.float32) != 0):
      raise UnsupportedConfigError(
          f"{bias_name} is non-zero: an attention output bias is not implemented (only "
          f"q/k/v biases are).")
  return cfg, params


# ---------------------------------------------------------------------------------------
# Saving


def _flatten(tree: dict, prefix: Tuple[str, ...] = ()) -> Dict[Tuple[str, ...], object]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def hf_tensors(cfg: ModelConfig, params: dict, model: str = "causal_lm") -> Dict[str, np.ndarray]:
  """Our params as HF-named numpy tensors (in `cfg.param_dtype`), checked first.

  Args:
    cfg: the model config.
    params: CausalLM (model="causal_lm") or ScalarModel (model="scalar") params.
  Returns:
    {HF tensor name: contiguous np.ndarray in HF layout}, in HF's order.
  """
  table = tensor_table(cfg, model)
  flat = _flatten(params)
  _check_names(["/".join(t.path) for t in table], ["/".join(p) for p in flat],
               f"params for {cfg.architecture} model={model!r}",
               "Pass params of the module that `model` names, built with this cfg.")
  dtype = np.dtype(cfg.storage_dtype)
  out = {}
  for t in table:
    value = np.asarray(flat[t.path])
    if tuple(value.shape) != t.shape:
      raise TensorShapeError(f"param {'/'.join(t.path)} has shape {list(value.shape)}, "
                             f"expected {list(t.shape)} from the config.")
    out[t.hf_name] = np.ascontiguousarray(t.to_hf(value).astype(dtype))
  for name, shape in _zero_biases(cfg).items():
    out[name] = np.zeros(shape, dtype)
  return out


def _shards(tensors: Dict[str, np.ndarray], max_shard_bytes: Optional[int]
            ) -> List[Dict[str, np.ndarray]]:
  """Greedy split of tensors, in order, into shards of at most max_shard_bytes each.

  A tensor larger than the limit gets a shard of its own.
  """
  if not max_shard_bytes:
    return [tensors]
  shards, current, size = [], {}, 0
  for name, value in tensors.items():
    if current and size + value.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = value
    size += value.nbytes
  shards.append(current)
  return shards


def save_hf_checkpoint(out_dir: PathLike, cfg: ModelConfig, params: dict,
                       model: str = "causal_lm",
                       max_shard_bytes: Optional[int] = None) -> pathlib.Path:
  """Writes params as a Hugging Face checkpoint directory that `transformers` loads.

  Writes config.json (a Qwen2Config / LlamaConfig with `architectures` set to
  *ForCausalLM, or *ForTokenClassification with num_labels=1 for model="scalar") and
  the weights in `cfg.param_dtype`: model.safetensors, or, when they exceed
  `max_shard_bytes`, model-0000i-of-0000n.safetensors plus model.safetensors.index.json.
  Weight files from an earlier save into the same directory are removed first.

  Args:
    out_dir: target directory (created if needed).
    cfg: the model config.
    params: CausalLM params (model="causal_lm") or ScalarModel params (model="scalar").
    model: "causal_lm" or "scalar".
    max_shard_bytes: shard size limit in bytes; None writes a single file.
  Returns:
    the output directory.
  """
  tensors = hf_tensors(cfg, params, model)
  out_dir = pathlib.Path(out_dir).expanduser()
  out_dir.mkdir(parents=True, exist_ok=True)
  for old in [out_dir / SINGLE_FILE, out_dir / INDEX_FILE,
              *out_dir.glob("model-*-of-*.safetensors")]:
    old.unlink(missing_ok=True)
  hf_config_for(cfg, model).save_pretrained(str(out_dir))
  shards = _shards(tensors, max_shard_bytes)
  metadata = {"format": "pt"}        # what transformers writes and expects
  if len(shards) == 1:
    save_file(shards[0], str(out_dir / SINGLE_FILE), metadata=metadata)
    return out_dir
  weight_map = {}
  for i, shard in enumerate(shards, start=1):
    file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, str(out_dir / file), metadata=metadata)
    weight_map.update({name: file for name in shard})
  index = {"metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))},
           "weight_map": weight_map}
  (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
  return out_dir
