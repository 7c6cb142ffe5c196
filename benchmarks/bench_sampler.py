"""Sampler throughput: ours (jitted KV-cache loop) vs transformers' PyTorch `generate()`
and Google Tunix's JAX `Sampler`.

The same tiny Qwen2 architecture (hidden 512, 8 layers, 8 heads, 2 kv heads, intermediate
1408, vocab 4096, tied embeddings: about 25M parameters) with the same random weights in
all three: ours are exported with `save_hf_checkpoint` and loaded by each baseline in a
worker subprocess of its own interpreter, which must match ours on the logits of a test
sequence (1e-3). Batch 1, 16 and 64, prompts of 64 tokens, 128 new tokens, sampling at
temperature 1 (no top-k/top-p, no EOS, so every row makes all 128 tokens). Each figure is
the best of `--repeats` timed runs after one warm-up run (compilation excluded).

transformers: an interpreter with torch (`--torch-python`, this one if it has torch, or
TORCH_PYTHON=/path/to/venv/bin/python; skipped when none is found). It runs once with
OpenMP's default spin-waiting (ACTIVE) and once with PASSIVE waiting and the faster
counts: on a loaded machine spin-waiting slows torch down tenfold. A baseline worker lives
only while it is timed: an idle ACTIVE worker keeps its OpenMP threads spinning and would
take a core from our runs (it cost us ~30% when workers stayed up).

Tunix: an interpreter with `google-tunix` (tested with 0.1.7) and a CPU jax
(`--tunix-python` or TUNIX_PYTHON=/path/to/venv/bin/python; skipped when neither is set).
The worker builds a `tunix.models.qwen2.model.ModelConfig` from the checkpoint's
config.json, loads the weights with `create_model_from_safe_tensors` (of
tunix.models.qwen2.params) and times `tunix.generate.sampler.Sampler.__call__` on token
ids (a stub tokenizer passes them through; pad and EOS id -1, so no prompt token is masked
and no row stops early), top_p 1 and a KV cache of exactly prompt + new tokens.
It inherits our XLA_FLAGS and, like the torch one, lives only while it is timed. It also
checks that greedy decoding of 2 prompts x 16 new tokens gives the same tokens as ours
(printed, not enforced; random weights repeat tokens, so the check is a weak one).

Ours runs twice: as configured (`sampling.decode_layout=auto`, on CPU the feature-major
decode step of models/feature_major.py) and with the model's batch-major step, so the
layout's share of the gain is measured in the same run.

Also prints our achieved FLOP/s (prefill + decode model FLOPs over wall time) against a
jitted float32 matmul measured in the same run.

Usage: python benchmarks/bench_sampler.py [--batches 1,16,64] [--torch-python PATH]
  [--tunix-python PATH]
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
from psgpo_jax.models.feature_major import feature_major_decoding   # noqa: E402
from psgpo_jax.sampling import generate                      # noqa: E402
from psgpo_jax.sampling_config import SamplingConfig         # noqa: E402

MODEL = ModelConfig(architecture="qwen2", vocab_size=4096, hidden_size=512,
                    intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True,
                    max_position_embeddings=512, initializer_range=0.02)
GREEDY_PROMPTS, GREEDY_TOKENS = 2, 16       # size of the greedy comparison with Tunix

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


# Runs in the Tunix interpreter as a worker: argv = checkpoint dir, prompt length, new
# tokens. Each stdin line names a prompts .npy file (sampled at temperature 1), or is
# "PATH greedy N" (greedy, N new tokens: the reply also carries the tokens).
_TUNIX_WORKER = r"""
import importlib.metadata, json, sys, time
import numpy as np
import jax, jax.numpy as jnp
from tunix.generate import sampler as sampler_lib
from tunix.models.qwen2 import model as model_lib, params as params_lib
path, prompt_len, new_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
hf = json.load(open(path + "/config.json"))
cfg = model_lib.ModelConfig(
    num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"],
    embed_dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"],
    num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
    head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
    rope_theta=(hf.get("rope_parameters") or hf)["rope_theta"], norm_eps=hf["rms_norm_eps"],
    use_tied_embedding=hf["tie_word_embeddings"], dtype=jnp.float32, param_dtype=jnp.float32)
model = params_lib.create_model_from_safe_tensors(path, cfg)

class Ids:                                   # prompts are token ids already: pass them on
  def encode(self, ids): return [int(t) for t in ids]
  def decode(self, ids): return ""
  def bos_id(self): return None
  def eos_id(self): return -1                # no EOS, and no prompt token counts as padding
  def pad_id(self): return -1

cache = sampler_lib.CacheConfig(cache_size=prompt_len + new_tokens, num_layers=cfg.num_layers,
                                num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
sampler = sampler_lib.Sampler(model, Ids(), cache)
# Its jitted state keeps a jnp int32 scalar as a static field; a cache hit compares it, and
# compiles that `==` in the second call: compile it now, so that only the warm-up compiles.
bool(jnp.int32(1) == jnp.int32(1))
causal = jnp.tril(jnp.ones((16, 16), bool))[None]   # logits of a fixed sequence: same weights?
check = model(jnp.arange(16)[None] * 7, jnp.arange(16)[None], None, causal)[0][0, -1]
print(json.dumps({"ready": True, "tunix": importlib.metadata.version("google-tunix"),
                  "jax": jax.__version__, "platform": jax.devices()[0].platform,
                  "check_logits": np.asarray(check).tolist()}), flush=True)
for seed, line in enumerate(sys.stdin):
  fields = line.split()
  prompts, greedy = np.load(fields[0]), len(fields) > 1
  steps = int(fields[2]) if greedy else new_tokens
  mode = {} if greedy else dict(temperature=1.0, top_p=1.0, top_k=None, seed=seed)
  start = time.perf_counter()
  out = sampler(list(prompts), max_generation_steps=steps, max_prompt_length=prompts.shape[1],
                **mode)
  elapsed = time.perf_counter() - start
  assert all(len(t) == steps for t in out.tokens), [len(t) for t in out.tokens]
  reply = {"seconds": elapsed}
  if greedy:
    reply["tokens"] = np.stack(out.tokens).tolist()
  print(json.dumps(reply), flush=True)
"""


class Worker:
  """A baseline in a worker process of another interpreter (its imports stay out of ours):
  one JSON line when ready (`info`), then one JSON reply per prompts file sent."""

  def __init__(self, argv: list, env: dict, workdir: str, tag: str):
    self.workdir, self.tag = workdir, tag
    self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, env=env)
    self.info = self._reply()

  def _reply(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the {self.tag} baseline worker exited with code {self.proc.wait()}")
    return json.loads(line)

  def _send(self, prompts: np.ndarray, suffix: str = "") -> dict:
    path = os.path.join(self.workdir, f"prompts_{prompts.shape[0]}_{self.tag}.npy")
    np.save(path, prompts.astype(np.int64))
    self.proc.stdin.write(path + suffix + "\n")
    self.proc.stdin.flush()
    return self._reply()

  def run(self, prompts: np.ndarray) -> float:
    """Seconds for one generation call on `prompts` [B, T]."""
    return self._send(prompts)["seconds"]

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


class TorchBaseline(Worker):
  """transformers' `generate()` in a worker process (torch stays out of ours)."""

  def __init__(self, python: str, ckpt: str, new_tokens: int, workdir: str, omp_policy: str):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_WAIT_POLICY=omp_policy)
    env.pop("XLA_FLAGS", None)
    self.omp_policy = omp_policy
    super().__init__([python, "-c", _TORCH_WORKER, ckpt, str(new_tokens)], env, workdir,
                     omp_policy)


class TunixBaseline(Worker):
  """Tunix's `Sampler` in a worker process; its jax sees our XLA_FLAGS."""

  def __init__(self, python: str, ckpt: str, prompt_len: int, new_tokens: int, workdir: str):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    super().__init__([python, "-c", _TUNIX_WORKER, ckpt, str(prompt_len), str(new_tokens)],
                     env, workdir, "tunix")

  def greedy(self, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy tokens [B, new_tokens] for `prompts` [B, T]."""
    return np.asarray(self._send(prompts, f" greedy {new_tokens}")["tokens"])


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


def find_tunix_python(flag: str | None) -> str | None:
  """The interpreter for the Tunix baseline: the flag ('none' skips it), else the one the
  TUNIX_PYTHON environment variable names (a virtualenv with google-tunix), if it exists."""
  if flag:
    return None if flag == "none" else flag
  venv = os.environ.get("TUNIX_PYTHON", "")
  return venv if venv and os.path.exists(venv) else None


def check_same_model(name: str, info: dict, ours_check) -> float:
  """Max |logit difference| between a worker's check logits and ours; raises over 1e-3."""
  diff = float(np.abs(np.asarray(ours_check) - np.asarray(info["check_logits"])).max())
  if diff > 1e-3:
    raise RuntimeError(f"The {name} baseline's logits differ from ours by {diff}: "
                       "not the same model.")
  return diff


def greedy_match(ours: np.ndarray, theirs: np.ndarray) -> str:
  """'yes', or where two [B, N] greedy token arrays first differ."""
  if ours.shape == theirs.shape and (ours == theirs).all():
    return "yes"
  if ours.shape != theirs.shape:
    return f"no (shapes {ours.shape} vs {theirs.shape})"
  col = int(np.nonzero((ours != theirs).any(0))[0][0])
  rows = np.nonzero(ours[:, col] != theirs[:, col])[0].tolist()
  return f"no (first difference at new token {col}, rows {rows})"


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


def ours_greedy(params, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
  """Our greedy tokens [B, new_tokens] for `prompts` [B, T] (no EOS)."""
  config = SamplingConfig(max_new_tokens=new_tokens, greedy=True, eos_ids=(),
                          min_prompt_bucket=prompts.shape[1])
  out = generate(params, MODEL, prompts.tolist(), jax.random.PRNGKey(0), config)
  return np.asarray(out.tokens)


def probe_tunix(start_tunix, params, prompt_len: int, new_tokens: int, ours_check) -> tuple:
  """(worker info, max |logit difference|, greedy match text) of a Tunix worker, checked on
  GREEDY_PROMPTS prompts x `new_tokens` greedy tokens."""
  prompts = np.random.RandomState(1).randint(0, MODEL.vocab_size, (GREEDY_PROMPTS, prompt_len))
  worker = start_tunix()
  try:
    diff = check_same_model("Tunix", worker.info, ours_check)
    theirs = worker.greedy(prompts, new_tokens)
  finally:
    worker.close()
  return worker.info, diff, greedy_match(ours_greedy(params, prompts, new_tokens), theirs)


def time_worker(start_worker, prompts: np.ndarray, repeats: int) -> list:
  """Seconds of `repeats` + 1 runs (run 0 warms up) in a fresh worker, alive only meanwhile."""
  worker = start_worker()
  try:
    return [worker.run(prompts) for _ in range(repeats + 1)]
  finally:
    worker.close()


def fmt(value, spec: str) -> str:
  """`value` formatted with `spec`, or '-' for a skipped baseline."""
  return "-" if value is None else format(value, spec)


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
  parser.add_argument("--tunix-python", default=None,
                      help="interpreter with google-tunix (default: $TUNIX_PYTHON); 'none' "
                           "skips the Tunix baseline")
  args = parser.parse_args()
  batches = [int(b) for b in args.batches.split(",")]

  params = jax.jit(lambda key: init_params(CausalLM(MODEL), key))(jax.random.PRNGKey(0))
  config = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0, eos_ids=(),
                          min_prompt_bucket=args.prompt_len)
  python = find_torch_python(args.torch_python)
  tunix_python = find_tunix_python(args.tunix_python)
  workdir = tempfile.mkdtemp(prefix="bench_sampler_")
  policies, start_tunix, greedy = [], None, None
  try:
    if python or tunix_python:
      ckpt = os.path.join(workdir, "model")
      save_hf_checkpoint(ckpt, MODEL, jax.device_get(params))
      ours_check = CausalLM(MODEL).apply({"params": params}, jnp.arange(16)[None] * 7)[0, -1]
    if python:
      policies = args.omp_policies.split(",")
      start_worker = lambda policy: TorchBaseline(python, ckpt, args.new_tokens, workdir, policy)
      probe = start_worker(policies[0])
      info = probe.info
      probe.close()
      diff = check_same_model("transformers", info, ours_check)
    if tunix_python:
      start_tunix = lambda: TunixBaseline(tunix_python, ckpt, args.prompt_len, args.new_tokens,
                                          workdir)
      greedy_tokens = min(GREEDY_TOKENS, args.new_tokens)
      tunix_info, tunix_diff, greedy = probe_tunix(start_tunix, params, args.prompt_len,
                                                   greedy_tokens, ours_check)
    print(f"model: {MODEL.num_params() / 1e6:.1f}M params; prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, temperature 1; jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, {os.cpu_count()} CPUs")
    if policies:
      print(f"baseline: transformers generate(), torch {info['torch']}, {info['threads']} threads, "
            f"OMP_WAIT_POLICY best of {args.omp_policies} ({python}); same weights: max |logit "
            f"difference| on a test sequence {diff:.1e}")
    else:
      print("baseline: skipped (no Python with torch found)")
    if start_tunix:
      print(f"tunix baseline: Sampler, tunix {tunix_info['tunix']}, jax {tunix_info['jax']} on "
            f"{tunix_info['platform']} ({tunix_python}); same weights: max |logit difference| "
            f"{tunix_diff:.1e}; greedy tokens ({GREEDY_PROMPTS} prompts x {greedy_tokens}) "
            f"match ours: {greedy}")
    else:
      print("tunix baseline: skipped (set TUNIX_PYTHON or --tunix-python)")
    layouts = {b: "feature_major" if feature_major_decoding("auto", False, b) else
               "batch_major" for b in batches}
    print(f"ours: sampling.decode_layout=auto, here by batch {layouts}; 'batch-major' is "
          "ours with decode_layout=batch_major (the model's [B, D] step)")
    print(f"{'batch':>5} {'ours tok/s':>11} {'batch-major':>11} {'hf tok/s':>9} {'ratio':>6} {'tunix tok/s':>11} "
          f"{'ratio vs tunix':>14} {'ours GFLOP/s':>12} {'matmul':>7} {'of matmul':>9}  "
          "hf tok/s by OMP policy")
    by_batch, matmul = {}, 0.0
    rng = np.random.RandomState(0)
    for batch in batches:
      prompts = rng.randint(0, MODEL.vocab_size, (batch, args.prompt_len))
      matmul = max(matmul, matmul_flops_per_s())
      base_s = {policy: time_worker(lambda: start_worker(policy), prompts, args.repeats)
                for policy in policies}      # only the timed worker is alive
      tunix_s = time_worker(start_tunix, prompts, args.repeats) if start_tunix else None
      ours_s = [run_ours(params, prompts, config, seed=i) for i in range(args.repeats + 1)]
      batch_major_s = [run_ours(params, prompts, config.replace(decode_layout="batch_major"),
                                seed=i) for i in range(args.repeats + 1)]
      tokens = batch * args.new_tokens
      ours = tokens / min(ours_s[1:])
      batch_major = tokens / min(batch_major_s[1:])
      by_policy = {k: round(tokens / min(v[1:]), 1) for k, v in base_s.items()}
      base = max(by_policy.values()) if policies else None
      tunix = tokens / min(tunix_s[1:]) if tunix_s else None
      flops = model_flops(MODEL, batch, args.prompt_len, args.new_tokens) / min(ours_s[1:])
      by_batch[str(batch)] = {
          "ours": round(ours, 1), "ours_batch_major": round(batch_major, 1), "baseline": None if base is None else round(base, 1),
          "ratio": None if base is None else round(ours / base, 3),
          "baseline_by_omp_policy": by_policy,
          "tunix": None if tunix is None else round(tunix, 1),
          "ratio_tunix": None if tunix is None else round(ours / tunix, 3),
          "gflops": round(flops / 1e9, 2), "mfu_vs_matmul": round(flops / matmul, 4)}
      print(f"{batch:>5} {ours:11.1f} {batch_major:11.1f} {fmt(base, '.1f'):>9} "
            f"{fmt(base and ours / base, '.2f'):>6} {fmt(tunix, '.1f'):>11} "
            f"{fmt(tunix and ours / tunix, '.2f'):>14} {flops / 1e9:12.2f} {matmul / 1e9:7.1f} "
            f"{flops / matmul:9.1%}  {by_policy}", flush=True)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  head = by_batch.get("16") or next(iter(by_batch.values()))
  print(json.dumps({"benchmark": "sampler", "metric": "new tokens/s", "ours": head["ours"],
                    "baseline": head["baseline"], "ratio": head["ratio"],
                    "tunix": head["tunix"], "ratio_tunix": head["ratio_tunix"],
                    "tunix_greedy_match": None if greedy is None else greedy == "yes",
                    "by_batch": by_batch, "mfu_vs_matmul": head["mfu_vs_matmul"],
                    "matmul_gflops": round(matmul / 1e9, 1)}))


if __name__ == "__main__":
  main()
