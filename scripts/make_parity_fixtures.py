"""Builds the Hugging Face parity fixtures in `tests/fixtures/parity/`.

Each fixture is a tiny random model made with `transformers` + PyTorch, saved as a
Hugging Face directory (`config.json` + fp32 safetensors), and a reference file
`<case>.npz` holding a left-padded batch and the model's outputs on it:

  input_ids       [B, T] int32, pad positions hold `PAD_ID`
  attention_mask  [B, T] int32, 1 for real tokens (left padding)
  position_ids    [B, T] int32, `max(cumsum(mask) - 1, 0)` (what our models use)
  logits          [B, T, V] float32 (causal LMs) or [B, T] float32 (token classifier)

The test suite (`tests/test_hf_io.py`) loads each directory with our loader, runs our
Flax model on the same inputs and compares the outputs at the non-pad positions.

torch is NOT a dependency of psgpo_jax. Run this script by hand, once, from a separate
virtual environment outside the repository (a CPU-only torch wheel is enough):

  python3 -m venv /path/to/torchenv
  /path/to/torchenv/bin/pip install torch==2.13.0 transformers==5.24.0 safetensors numpy
  HF_HUB_OFFLINE=1 /path/to/torchenv/bin/python scripts/make_parity_fixtures.py

The output is deterministic for a given torch/transformers version (fixed seeds).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil

if __name__ == "__main__":       # --help answers before torch (not our dependency) loads
  argparse.ArgumentParser(description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch  # pylint: disable=g-import-not-at-top,wrong-import-position
import transformers  # pylint: disable=g-import-not-at-top,wrong-import-position

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "parity"
VOCAB = 128
PAD_ID = 0
LENGTHS = (11, 7, 3)     # real tokens per row of the batch; the batch is left-padded to 11

COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=64,
              bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID)

CASES = {
    # GQA (4 heads, 2 kv heads), q/k/v bias, tied embeddings.
    "qwen2_tied": dict(
        cls=transformers.Qwen2ForCausalLM, config_cls=transformers.Qwen2Config,
        config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0,
                    rms_norm_eps=1e-6)),
    # GQA (4 heads, 1 kv head), head_dim 16 != hidden/heads, untied head, rope_theta 5e5.
    "llama_untied": dict(
        cls=transformers.LlamaForCausalLM, config_cls=transformers.LlamaConfig,
        config=dict(hidden_size=48, intermediate_size=80, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=16, tie_word_embeddings=False,
                    rope_theta=500000.0, rms_norm_eps=1e-5, attention_bias=False)),
    # The scalar head (value model / PRM): Qwen2ForTokenClassification, one label.
    "qwen2_scalar": dict(
        cls=transformers.Qwen2ForTokenClassification, config_cls=transformers.Qwen2Config,
        config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0,
                    rms_norm_eps=1e-6, num_labels=1)),
}
SHARDED = ("llama_sharded", "llama_untied")   # the same model saved in 2 shards


def randomize_(model: torch.nn.Module, seed: int) -> None:
  """Replaces the default (tiny, std 0.02) init with O(1) weights.

  Near-uniform logits would let a wrong weight mapping pass a tolerance check; with
  these scales the logits are O(1-10) and every tensor matters: norm scales around 1,
  biases around 0.3, matrices with std 1/sqrt(fan_in), embeddings with std 1.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * noise)
      elif name.endswith(".bias"):
        p.copy_(0.3 * noise)
      elif "embed_tokens" in name:
        p.copy_(noise)
      else:
        p.copy_(noise / np.sqrt(p.shape[-1]))


def make_batch(seed: int) -> dict[str, np.ndarray]:
  """A left-padded batch of random tokens with the lengths in `LENGTHS`."""
  rng = np.random.default_rng(seed)
  t = max(LENGTHS)
  ids = np.full((len(LENGTHS), t), PAD_ID, np.int64)
  mask = np.zeros((len(LENGTHS), t), np.int64)
  for row, n in enumerate(LENGTHS):
    ids[row, t - n:] = rng.integers(3, VOCAB, size=n)
    mask[row, t - n:] = 1
  positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
  return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def reference_outputs(model: torch.nn.Module, batch: dict[str, np.ndarray]) -> np.ndarray:
  """Full-sequence outputs in float32: [B,T,V] logits or [B,T] scores."""
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(batch["input_ids"]),
                attention_mask=torch.from_numpy(batch["attention_mask"]),
                position_ids=torch.from_numpy(batch["position_ids"]), use_cache=False)
  logits = out.logits.float().numpy()
  if logits.shape[-1] == 1:                 # token classifier, num_labels=1
    logits = logits[..., 0]
  if not np.isfinite(logits).all():
    raise RuntimeError("reference outputs hold NaN/inf; check the masking of pad rows")
  return logits


def build(name: str, spec: dict, seed: int) -> torch.nn.Module:
  """Creates, randomizes and saves one fixture model (fp32) with its reference file."""
  torch.manual_seed(seed)
  config = spec["config_cls"](**COMMON, **spec["config"])
  config._attn_implementation = "eager"
  model = spec["cls"](config).eval().float()
  randomize_(model, seed)
  save_model(model, OUT / name)
  batch = make_batch(seed)
  np.savez_compressed(OUT / f"{name}.npz",
                      **{k: v.astype(np.int32) for k, v in batch.items()},
                      logits=reference_outputs(model, batch).astype(np.float32))
  return model


def save_model(model: torch.nn.Module, path: pathlib.Path, **kwargs) -> None:
  """save_pretrained into a fresh directory, keeping only config + weights."""
  shutil.rmtree(path, ignore_errors=True)
  model.save_pretrained(path, safe_serialization=True, **kwargs)
  for extra in path.iterdir():
    if extra.name == "generation_config.json":
      extra.unlink()


def main() -> None:
  OUT.mkdir(parents=True, exist_ok=True)
  models = {}
  for seed, (name, spec) in enumerate(CASES.items()):
    models[name] = build(name, spec, seed)
  # Sharded copy: a max shard size of a bit over half the weights gives 2 shards.
  shard_name, source = SHARDED
  model = models[source]
  total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
  save_model(model, OUT / shard_name, max_shard_size=int(total * 0.6))
  shutil.copy(OUT / f"{source}.npz", OUT / f"{shard_name}.npz")
  index = json.loads((OUT / shard_name / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  if len(shards) != 2:
    raise RuntimeError(f"expected 2 shards, got {shards}")
  size = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
  print(f"wrote {sorted(p.name for p in OUT.iterdir())} ({size / 1024:.0f} KiB) to {OUT}")


if __name__ == "__main__":
  main()
