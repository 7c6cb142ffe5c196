"""Hugging Face checkpoint I/O: parity with transformers, round trips, clear errors.

The parity fixtures in tests/fixtures/parity/ were written by
scripts/make_parity_fixtures.py with transformers + PyTorch (not needed here).
"""
from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file

from psgpo_jax.models import (CausalLM, ModelConfig, ScalarModel, init_params,
                              scalar_params_from_causal)
from psgpo_jax.models import hf_config as hfcfg
from psgpo_jax.models.hf_config import load_hf_config
from psgpo_jax.models.hf_io import load_hf_checkpoint, save_hf_checkpoint

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "parity"
CASES = {"qwen2_tied": "causal_lm", "llama_untied": "causal_lm",
         "llama_sharded": "causal_lm", "qwen2_scalar": "scalar"}


def _reference(name: str) -> dict:
  with np.load(FIXTURES / f"{name}.npz") as data:
    return dict(data)


def _forward(cfg: ModelConfig, params: dict, model: str, ref: dict) -> np.ndarray:
  module = CausalLM(cfg) if model == "causal_lm" else ScalarModel(cfg)
  out = module.apply({"params": params}, jnp.asarray(ref["input_ids"]),
                     attention_mask=jnp.asarray(ref["attention_mask"]))
  return np.asarray(out)


def _header(path: pathlib.Path) -> dict:
  """{tensor name: (shape, dtype)} over every safetensors file in a directory."""
  out = {}
  for file in sorted(path.glob("*.safetensors")):
    with safe_open(str(file), framework="numpy") as handle:
      for name in handle.keys():
        piece = handle.get_slice(name)
        out[name] = (tuple(piece.get_shape()), piece.get_dtype())
  return out


def _assert_trees_equal(a: dict, b: dict) -> None:
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def _copy_fixture(name: str, tmp_path: pathlib.Path) -> pathlib.Path:
  target = tmp_path / name
  shutil.copytree(FIXTURES / name, target)
  return target


def _rewrite_weights(path: pathlib.Path, edit) -> None:
  """Applies `edit(dict of tensors)` to a single-file checkpoint in place."""
  file = path / "model.safetensors"
  with safe_open(str(file), framework="numpy") as handle:
    tensors = {k: handle.get_tensor(k) for k in handle.keys()}
  edit(tensors)
  save_file(tensors, str(file), metadata={"format": "pt"})


def _edit_config(path: pathlib.Path, **changes) -> None:
  config = json.loads((path / "config.json").read_text())
  config.update(changes)
  (path / "config.json").write_text(json.dumps(config))


# ---------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers_at_non_pad_positions(name):
  model = CASES[name]
  cfg, params = load_hf_checkpoint(FIXTURES / name, model=model)
  ref = _reference(name)
  out = _forward(cfg, params, model, ref)
  assert out.shape == ref["logits"].shape and out.dtype == np.float32
  real = ref["attention_mask"].astype(bool)
  assert (~real).any(), "the fixture batch must be left-padded"
  err = np.abs(out - ref["logits"])[real].max()
  assert err < 1e-4, f"{name}: max abs error {err}"


def test_parity_check_is_sensitive_to_the_rope_base():
  """The fixtures' logits are O(1): a wrong RoPE base is far outside the tolerance."""
  cfg, params = load_hf_checkpoint(FIXTURES / "llama_untied")
  ref = _reference("llama_untied")
  out = _forward(cfg.replace(rope_theta=10000.0), params, "causal_lm", ref)
  real = ref["attention_mask"].astype(bool)
  assert np.abs(out - ref["logits"])[real].max() > 1e-2


def test_config_fields_are_read_from_config_json():
  qwen = load_hf_config(FIXTURES / "qwen2_tied")
  assert (qwen.architecture, qwen.tie_word_embeddings, qwen.attention_bias) == ("qwen2", True, True)
  assert (qwen.num_attention_heads, qwen.num_key_value_heads, qwen.kv_head_dim) == (4, 2, 8)
  assert (qwen.vocab_size, qwen.hidden_size, qwen.intermediate_size) == (128, 32, 64)
  assert (qwen.bos_token_id, qwen.eos_token_id, qwen.dtype, qwen.param_dtype) == (
      1, 2, "float32", "float32")
  llama = load_hf_config(FIXTURES / "llama_untied")
  assert (llama.architecture, llama.tie_word_embeddings, llama.attention_bias) == (
      "llama", False, False)
  assert (llama.num_key_value_heads, llama.head_dim, llama.rope_theta, llama.rms_norm_eps) == (
      1, 16, 500000.0, 1e-5)
  assert load_hf_config(FIXTURES / "llama_untied", dtype="bfloat16").param_dtype == "bfloat16"


def test_sharded_and_single_file_checkpoints_load_the_same_params():
  index = json.loads((FIXTURES / "llama_sharded" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) == 2
  cfg_a, single = load_hf_checkpoint(FIXTURES / "llama_untied")
  cfg_b, sharded = load_hf_checkpoint(FIXTURES / "llama_sharded")
  assert cfg_a == cfg_b
  _assert_trees_equal(single, sharded)


def test_loaded_params_have_the_model_layout():
  cfg, params = load_hf_checkpoint(FIXTURES / "llama_untied")
  expected = init_params(CausalLM(cfg), jax.random.PRNGKey(0))
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(expected)
  for got, want in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected)):
    assert got.shape == want.shape and got.dtype == want.dtype
  assert params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].shape == (48, 4, 16)
  assert params["model"]["layers_0"]["self_attn"]["o_proj"]["kernel"].shape == (4, 16, 48)
  _, bf16 = load_hf_checkpoint(FIXTURES / "qwen2_tied", dtype="bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(bf16))


# ---------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("name", ["qwen2_tied", "llama_untied", "qwen2_scalar"])
def test_export_matches_the_transformers_checkpoint_and_round_trips(name, tmp_path):
  model = CASES[name]
  cfg, params = load_hf_checkpoint(FIXTURES / name, model=model)
  out = save_hf_checkpoint(tmp_path / "export", cfg, params, model=model)
  # Same tensor names, shapes and dtypes as the checkpoint transformers wrote.
  assert _header(out) == _header(FIXTURES / name)
  # transformers reads the config back as the same architecture.
  hf_config = transformers.AutoConfig.from_pretrained(str(out), local_files_only=True)
  reference = transformers.AutoConfig.from_pretrained(str(FIXTURES / name), local_files_only=True)
  assert hf_config.architectures == reference.architectures
  for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "vocab_size", "rms_norm_eps",
              "tie_word_embeddings", "max_position_embeddings", "num_labels"):
    assert getattr(hf_config, key) == getattr(reference, key), key
  assert hf_config.rope_parameters["rope_theta"] == reference.rope_parameters["rope_theta"]
  # Our loader gives back identical params and config.
  cfg_back, params_back = load_hf_checkpoint(out, model=model)
  assert cfg_back == cfg
  _assert_trees_equal(params, params_back)


@pytest.mark.parametrize("arch,tied,bias,dtype", [
    ("qwen2", True, True, "bfloat16"),
    ("llama", False, False, "float32"),
    ("llama", True, False, "bfloat16"),
])
def test_random_params_round_trip_through_sharded_export(arch, tied, bias, dtype, tmp_path):
  cfg = ModelConfig(architecture=arch, vocab_size=96, hidden_size=32, intermediate_size=48,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    tie_word_embeddings=tied, attention_bias=bias, rope_theta=20000.0,
                    dtype=dtype, param_dtype=dtype, eos_token_id=5)
  params = init_params(CausalLM(cfg), jax.random.PRNGKey(3))
  out = save_hf_checkpoint(tmp_path / "ckpt", cfg, params, max_shard_bytes=8_000)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 2 and sorted(p.name for p in out.glob("*.safetensors")) == shards
  assert set(index["weight_map"]) == set(_header(out))
  assert index["metadata"]["total_size"] == sum(
      np.prod(shape) * (2 if dtype == "bfloat16" else 4) for shape, _ in _header(out).values())
  cfg_back, params_back = load_hf_checkpoint(out)
  assert cfg_back == cfg
  _assert_trees_equal(params, params_back)
  cfg32, params32 = load_hf_checkpoint(out, dtype="float32")
  assert (cfg32.dtype, cfg32.param_dtype) == ("float32", "float32")
  _assert_trees_equal(jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params), params32)
  # Saving again, unsharded, into the same directory leaves no stale shards behind.
  save_hf_checkpoint(out, cfg, params)
  assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
  assert not (out / "model.safetensors.index.json").exists()
  _assert_trees_equal(params, load_hf_checkpoint(out)[1])


@pytest.mark.parametrize("arch,bias", [("qwen2", False), ("llama", True)])
def test_bias_layouts_hf_lacks_are_written_as_zeros(arch, bias, tmp_path):
  """Qwen2 always has q/k/v biases; a biased Llama also biases o_proj. Both exact."""
  cfg = ModelConfig(architecture=arch, vocab_size=64, hidden_size=32, intermediate_size=48,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    attention_bias=bias)
  params = init_params(CausalLM(cfg), jax.random.PRNGKey(1))
  out = save_hf_checkpoint(tmp_path / arch, cfg, params)
  zero_bias = "q_proj.bias" if arch == "qwen2" else "o_proj.bias"
  with safe_open(str(out / "model.safetensors"), framework="numpy") as handle:
    biases = [handle.get_tensor(k) for k in handle.keys() if k.endswith(zero_bias)]
  assert len(biases) == 2 and not any(b.any() for b in biases)
  cfg_back, params_back = load_hf_checkpoint(out)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 7), 0, 64)
  np.testing.assert_allclose(CausalLM(cfg_back).apply({"params": params_back}, tokens),
                             CausalLM(cfg).apply({"params": params}, tokens), atol=1e-6)


def test_scalar_model_starts_from_a_causal_checkpoint(tmp_path):
  cfg, causal = load_hf_checkpoint(FIXTURES / "qwen2_tied")
  scalar = scalar_params_from_causal(causal, cfg, jax.random.PRNGKey(0))
  _assert_trees_equal(scalar["model"], causal["model"])
  assert scalar["score"]["kernel"].shape == (cfg.hidden_size, 1)
  ref = _reference("qwen2_tied")
  assert _forward(cfg, scalar, "scalar", ref).shape == ref["input_ids"].shape
  out = save_hf_checkpoint(tmp_path / "prm", cfg, scalar, model="scalar")
  assert transformers.AutoConfig.from_pretrained(str(out)).architectures == [
      "Qwen2ForTokenClassification"]
  _assert_trees_equal(scalar, load_hf_checkpoint(out, model="scalar")[1])


# ---------------------------------------------------------------------------------------
# Errors


def test_missing_directory_config_or_weights_are_reported(tmp_path):
  with pytest.raises(hfcfg.CheckpointNotFoundError, match="does not exist"):
    load_hf_checkpoint(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(hfcfg.CheckpointNotFoundError, match="no config.json"):
    load_hf_checkpoint(tmp_path / "empty")
  path = _copy_fixture("qwen2_tied", tmp_path)
  (path / "model.safetensors").rename(path / "pytorch_model.bin")
  with pytest.raises(hfcfg.CheckpointNotFoundError, match=r"no \*\.safetensors.*pytorch_model"):
    load_hf_checkpoint(path)
  sharded = _copy_fixture("llama_sharded", tmp_path)
  (sharded / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(hfcfg.CheckpointNotFoundError, match="model-00002-of-00002"):
    load_hf_checkpoint(sharded)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
  path = _copy_fixture("qwen2_tied", tmp_path)
  _edit_config(path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
  with pytest.raises(hfcfg.UnsupportedArchitectureError, match="GPT2LMHeadModel") as err:
    load_hf_checkpoint(path)
  for name in ("Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen2ForTokenClassification",
               "LlamaForTokenClassification"):
    assert name in str(err.value)


def test_unsupported_features_are_reported(tmp_path):
  path = _copy_fixture("llama_untied", tmp_path)
  _edit_config(path, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                      "rope_theta": 500000.0})
  with pytest.raises(hfcfg.UnsupportedConfigError, match="linear"):
    load_hf_config(path)
  path = _copy_fixture("qwen2_tied", tmp_path / "act")
  _edit_config(path, hidden_act="gelu")
  with pytest.raises(hfcfg.UnsupportedConfigError, match="gelu"):
    load_hf_config(path)


def test_model_kind_mismatch_points_to_the_right_call():
  with pytest.raises(hfcfg.UnsupportedArchitectureError, match="scalar_params_from_causal"):
    load_hf_checkpoint(FIXTURES / "qwen2_tied", model="scalar")
  with pytest.raises(hfcfg.UnsupportedArchitectureError, match="model='scalar'"):
    load_hf_checkpoint(FIXTURES / "qwen2_scalar")


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
  path = _copy_fixture("llama_untied", tmp_path)

  def edit(tensors):
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.1.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
  _rewrite_weights(path, edit)
  with pytest.raises(hfcfg.TensorNamesError) as err:
    load_hf_checkpoint(path)
  message = str(err.value)
  assert "missing 1 tensor(s): model.layers.1.mlp.up_proj.weight" in message
  assert "unexpected 1 tensor(s): model.layers.1.mlp.extra.weight" in message


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
  path = _copy_fixture("qwen2_tied", tmp_path)
  _edit_config(path, intermediate_size=72)
  with pytest.raises(hfcfg.TensorShapeError,
                     match=r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \[64, 32\], "
                           r"expected \[72, 32\]"):
    load_hf_checkpoint(path)


def test_nonzero_llama_output_bias_is_rejected(tmp_path):
  path = _copy_fixture("llama_untied", tmp_path)
  _edit_config(path, attention_bias=True)

  def edit(tensors):
    for i in range(2):
      prefix = f"model.layers.{i}.self_attn."
      for proj, n in (("q_proj", 64), ("k_proj", 16), ("v_proj", 16), ("o_proj", 48)):
        tensors[prefix + proj + ".bias"] = np.full((n,), 0.5 if i else 0.0, np.float32)
  _rewrite_weights(path, edit)
  with pytest.raises(hfcfg.UnsupportedConfigError, match=r"layers\.1\.self_attn\.o_proj\.bias"):
    load_hf_checkpoint(path)


def test_saving_params_of_the_wrong_module_is_reported(tmp_path):
  cfg, params = load_hf_checkpoint(FIXTURES / "qwen2_tied")
  with pytest.raises(hfcfg.TensorNamesError, match="missing 2 tensor.*score/bias"):
    save_hf_checkpoint(tmp_path / "x", cfg, params, model="scalar")
  bad = jax.tree_util.tree_map(lambda x: x, params)
  bad["model"]["norm"]["scale"] = jnp.ones((7,))
  with pytest.raises(hfcfg.TensorShapeError, match=r"model/norm/scale has shape \[7\]"):
    save_hf_checkpoint(tmp_path / "y", cfg, bad)
