"""Sampler throughput: ours (jitted KV-cache loop) vs transformers' PyTorch `generate()`.

The same tiny Qwen2 architecture (hidden 512, 8 layers, 8 heads, 2 kv heads, intermediate
1408, vocab 4096, tied embeddings: about 25M parameters) with the same random weights in
both: ours are exported with `save_hf_checkpoint` and loaded by transformers in a
subprocess whose Python has torch (`--torch-python`; skipped when none is found).
Batch 1, 16 and 64, prompts of 64 tokens, 128 new tokens, sampling at temperature 1
(no top-k/top-p, no EOS, so every row makes all 128 tokens). Each figure is the best of
`--repeats` timed runs after one warm-up run (compilation excluded). The baseline runs
once with OpenMP's default spin-waiting (ACTIVE) and once with PASSIVE waiting and the
faster counts: on a loaded machine spin-waiting slows torch down tenfold. A baseline
worker lives only while it is timed: an idle ACTIVE worker keeps its OpenMP threads
spinning and would take a core from our runs (it cost us ~30% when workers stayed up).

Also prints our achieved FLOP/s (prefill + decode model FLOPs over wall time) against a
jitted float32 matmul measured in the same run.

Usage: python benchmarks/bench_sampler.py [--batches 1,16,64] [--torch-python PATH]
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax                                                   # noqa: E402
import jax.numpy as jnp                                      # noqa: E402
import numpy as np                                           # noqa: E402

from benchmarks.common import matmul_flops_per_s             # noqa: E402
from psgpo_jax.models import CausalLM, ModelConfig, init_params   # noqa: E402
from psgpo_jax.models.hf_io import save_hf_checkpoint        # noqa: E402
from psgpo_jax.sampling import SamplingConfig, generate      # noqa: E402

MODEL = ModelConfig(architecture="qwen2", vocab_size=4096, hidden_size=512,
                    intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True,
                    max_position_embeddings=512, initializer_range=0.02)

# Runs in the torch interpreter as a worker: argv = checkpoint dir, new tokens. Each stdin
# line names a prompts .npy file; it answers with one JSON line {"seconds": ...} per run.
_TORCH_WORKER = r"""
import json, sys, time
import numpy as np
import torch
from transformers import AutoModelForCausalLM
path, new_tokens = sys.argv[1], int(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
with torch.inference_mode():                 # logits of a fixed sequence: same weights?
  check = model(torch.arange(16)[None] * 7).logits[0, -1].tolist()
print(json.dumps({"ready": True, "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "check_logits": check}), flush=True)
for seed, line in enumerate(sys.stdin):
  prompts = torch.from_numpy(np.load(line.strip())).long()
  torch.manual_seed(seed)
  with torch.inference_mode():
    start = time.perf_counter()
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                         temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    elapsed = time.perf_counter() - start
  assert out.shape[1] == prompts.shape[1] + new_tokens, out.shape
  print(json.dumps({"seconds": elapsed}), flush=True)
"""


class TorchBaseline:
  """transformers' `generate()` in a worker process (torch stays out of ours)."""

  def __init__(self, python: str, ckpt: str, new_tokens: int, workdir: str, omp_policy: str):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_WAIT_POLICY=omp_policy)
    env.pop("XLA_FLAGS", None)
    self.workdir, self.omp_policy = workdir, omp_policy
    self.proc = subprocess.Popen([python, "-c", _TORCH_WORKER, ckpt, str(new_tokens)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=env)
    self.info = self._reply()

  def _reply(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the baseline worker exited with code {self.proc.wait()}")
    return json.loads(line)

  def run(self, prompts: np.ndarray) -> float:
    """Seconds for one `generate()` call on `prompts` [B, T]."""
    path = os.path.join(self.workdir, f"prompts_{prompts.shape[0]}_{self.omp_policy}.npy")
    np.save(path, prompts.astype(np.int64))
    self.proc.stdin.write(path + "\n")
    self.proc.stdin.flush()
    return self._reply()["seconds"]

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


def find_torch_python(flag: str | None) -> str | None:
  """The interpreter for the baseline: the flag, this one if it has torch, or the one
  the TORCH_PYTHON environment variable names (a virtualenv with torch)."""
  if flag:
    return None if flag == "none" else flag
  try:
    import torch  # noqa: F401
    return sys.executable
  except ImportError:
    pass
  venv = os.environ.get("TORCH_PYTHON", "")
  return venv if venv and os.path.exists(venv) else None


def model_flops(cfg: ModelConfig, batch: int, prompt: int, new: int) -> float:
  """Forward FLOPs of prefill (last-position logits only) + `new` decode steps.

  2 FLOPs per weight per token for the matmuls (tied head counted as a matmul), plus
  attention scores and weighted sums (4 * Dh * H per visible key per layer).
  """
  d, f, v, dh = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.kv_head_dim
  h, kv, layers = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
  per_layer = 2 * (d * h * dh * 2 + d * kv * dh * 2 + 3 * d * f)
  attn = lambda keys: 4 * dh * h * keys * layers
  head = 2 * d * v
  prefill = prompt * layers * per_layer + sum(attn(t + 1) for t in range(prompt)) + head
  decode = new * (layers * per_layer + head) + sum(attn(prompt + t + 1) for t in range(new))
  return batch * (prefill + decode)


def run_ours(params, prompts: np.ndarray, config: SamplingConfig, seed: int) -> float:
  """Seconds for one `generate` call (compiled on the first call per shape)."""
  start = time.perf_counter()
  out = generate(params, MODEL, prompts.tolist(), jax.random.PRNGKey(seed), config)
  elapsed = time.perf_counter() - start
  assert int(out.lengths.min()) == config.max_new_tokens, out.lengths
  return elapsed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", default="1,16,64")
  parser.add_argument("--prompt-len", type=int, default=64)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--torch-python", default=None,
                      help="interpreter with torch + transformers; 'none' skips the baseline")
  parser.add_argument("--omp-policies", default="ACTIVE,PASSIVE",
                      help="OMP_WAIT_POLICY values for baseline workers; the best counts")
  args = parser.parse_args()
  batches = [int(b) for b in args.batches.split(",")]

  params = jax.jit(lambda key: init_params(CausalLM(MODEL), key))(jax.random.PRNGKey(0))
  config = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0, eos_ids=(),
                          min_prompt_bucket=args.prompt_len)
  python = find_torch_python(args.torch_python)
  workdir = tempfile.mkdtemp(prefix="bench_sampler_")
  policies: list = []
  try:
    if python:
      ckpt = os.path.join(workdir, "model")
      save_hf_checkpoint(ckpt, MODEL, jax.device_get(params))
      policies = args.omp_policies.split(",")
      start_worker = lambda policy: TorchBaseline(python, ckpt, args.new_tokens, workdir, policy)
      probe = start_worker(policies[0])
      info = probe.info
      probe.close()
      ours_check = CausalLM(MODEL).apply({"params": params}, jnp.arange(16)[None] * 7)[0, -1]
      diff = float(np.abs(np.asarray(ours_check) - np.asarray(info["check_logits"])).max())
      if diff > 1e-3:
        raise RuntimeError(f"The baseline's logits differ from ours by {diff}: not the same model.")
    print(f"model: {MODEL.num_params() / 1e6:.1f}M params; prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, temperature 1; jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, {os.cpu_count()} CPUs")
    if policies:
      print(f"baseline: transformers generate(), torch {info['torch']}, {info['threads']} threads, "
            f"OMP_WAIT_POLICY best of {args.omp_policies} ({python}); same weights: max |logit "
            f"difference| on a test sequence {diff:.1e}")
    else:
      print("baseline: skipped (no Python with torch found)")
    print(f"{'batch':>5} {'ours tok/s':>11} {'hf tok/s':>9} {'ratio':>6} {'ours GFLOP/s':>12} "
          f"{'matmul':>7} {'of matmul':>9}  hf tok/s by OMP policy")
    by_batch, matmul = {}, 0.0
    rng = np.random.RandomState(0)
    for batch in batches:
      prompts = rng.randint(0, MODEL.vocab_size, (batch, args.prompt_len))
      matmul = max(matmul, matmul_flops_per_s())
      base_s = {}
      for policy in policies:                # run 0 warms up; only this worker is alive
        worker = start_worker(policy)
        try:
          base_s[policy] = [worker.run(prompts) for _ in range(args.repeats + 1)]
        finally:
          worker.close()
      ours_s = [run_ours(params, prompts, config, seed=i) for i in range(args.repeats + 1)]
      tokens = batch * args.new_tokens
      ours = tokens / min(ours_s[1:])
      by_policy = {k: round(tokens / min(v[1:]), 1) for k, v in base_s.items()}
      base = max(by_policy.values()) if policies else None
      flops = model_flops(MODEL, batch, args.prompt_len, args.new_tokens) / min(ours_s[1:])
      by_batch[str(batch)] = {
          "ours": round(ours, 1), "baseline": None if base is None else round(base, 1),
          "ratio": None if base is None else round(ours / base, 3),
          "baseline_by_omp_policy": by_policy,
          "gflops": round(flops / 1e9, 2), "mfu_vs_matmul": round(flops / matmul, 4)}
      base_txt = "-" if base is None else f"{base:.1f}"
      ratio_txt = "-" if base is None else f"{ours / base:.2f}"
      print(f"{batch:>5} {ours:11.1f} {base_txt:>9} {ratio_txt:>6} {flops / 1e9:12.2f} "
            f"{matmul / 1e9:7.1f} {flops / matmul:9.1%}  {by_policy}", flush=True)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  head = by_batch.get("16") or next(iter(by_batch.values()))
  print(json.dumps({"benchmark": "sampler", "metric": "new tokens/s", "ours": head["ours"],
                    "baseline": head["baseline"], "ratio": head["ratio"],
                    "by_batch": by_batch, "mfu_vs_matmul": head["mfu_vs_matmul"],
                    "matmul_gflops": round(matmul / 1e9, 1)}))


if __name__ == "__main__":
  main()
