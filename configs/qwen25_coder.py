"""A real model: a Qwen2.5-Coder style checkpoint on MBPP (train) and HumanEval (eval).

    python -m experiments.train --config configs/qwen25_coder.py:0.5b \\
        --config.model.path=/models/Qwen2.5-Coder-0.5B-Instruct \\
        --config.data.train_path=/data/mbpp.jsonl

Variants set the mesh and batch sizes for 0.5b (one accelerator), 1.5b and 7b (a pod
slice: FSDP over 8 devices, tensor parallelism over 4); check a variant's memory first
with `python -m experiments.plan_memory --config configs/qwen25_coder.py:7b`.
`toy` is the same path at toy size for CPU tests: a directory written by
`python -m experiments.make_toy_checkpoint`, a few problems, 2-30 steps per stage.
Instruct checkpoints are prompted with their chat template (`data.prompt_format=chat`);
base checkpoints take `--config.data.prompt_format=plain`.
The model and tokenizer come from `model.path` (a local Hugging Face directory); nothing
is downloaded. Paper defaults: K = 20 completions per probed prefix, 4 baseline snapshots.
"""
from configs import base

TOY = (32, 64, 2, 4, 2, 1024, (-1, 1, 1), 2)     # experiments/make_toy_checkpoint.py
SIZES = {
    # hidden, intermediate, layers, heads, kv heads, vocab, mesh, prompts per RL step
    "0.5b": (896, 4864, 24, 14, 2, 151936, (-1, 1, 1), 32),
    "1.5b": (1536, 8960, 28, 12, 2, 151936, (-1, 1, 1), 32),
    "7b": (3584, 18944, 28, 28, 4, 152064, (-1, 8, 4), 64),
}


def get_config(size: str = "0.5b"):
  if size != "toy" and size not in SIZES:
    raise ValueError(f"Unknown size {size!r}; choose one of {sorted(SIZES) + ['toy']}.")
  hidden, inter, layers, heads, kv, vocab, mesh, prompts = TOY if size == "toy" else SIZES[size]
  c = base.get_config()
  c.workdir = f"runs/qwen25_coder_{size}"
  # The architecture fields describe the checkpoint (used for memory planning and for a
  # random-init smoke run); with model.path set, config.json is authoritative.
  c.model.path = ""
  c.model.architecture = "qwen2"
  c.model.vocab_size = vocab
  c.model.hidden_size, c.model.intermediate_size = hidden, inter
  c.model.num_hidden_layers = layers
  c.model.num_attention_heads, c.model.num_key_value_heads = heads, kv
  c.model.rope_theta = 1_000_000.0
  c.model.max_position_embeddings = 32768
  c.model.tie_word_embeddings = size != "7b"
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.data.source = "mbpp"
  c.data.prompt_format = "chat"              # Instruct: the tokenizer's chat template
  c.data.train_path = "mbpp.jsonl"          # the published MBPP JSONL (local file)
  c.data.max_prompt_tokens = 768
  c.sampling.max_new_tokens = 512
  c.sampling.temperature = 1.0
  c.sft.steps = 0                            # instruct checkpoints need no warm-up
  c.baseline.steps = 200
  c.collect.num_prompts = 374
  c.collect.completions = 20
  c.prm.steps = 1000
  c.prm.learning_rate = 1e-5
  c.rl.steps = 500
  c.rl.prompts_per_step = prompts
  c.rl.samples_per_prompt = 4
  c.rl.policy_lr = 1e-6
  c.rl.value_lr = 5e-6
  c.rl.num_minibatches = 8
  c.eval.num_samples = 20
  c.mesh.shape = mesh
  c.stages = "baseline,collect,prm,rl,eval"
  return _toy(c) if size == "toy" else c


def _toy(c):
  """Every stage at toy size on CPU: the path of a real run, seconds per stage."""
  c.workdir = "runs/qwen25_coder_toy"
  c.model.max_position_embeddings = 2048
  c.model.dtype = "float32"
  c.model.remat = False
  c.data.max_prompt_tokens = 384
  c.sandbox.num_workers = 2
  c.sampling.max_new_tokens = 32
  c.sampling.min_prompt_bucket = 512         # one prompt shape: fewer compilations
  c.sft.steps, c.sft.batch_size, c.sft.learning_rate, c.sft.warmup_steps = 30, 4, 3e-3, 3
  c.baseline.steps = 0                       # label with the SFT (or initial) policy
  c.collect.num_prompts = 3
  c.collect.responses_per_prompt = 2
  c.collect.completions = 2
  c.collect.selection = "all"                # a random model passes nothing
  c.prm.steps, c.prm.batch_size, c.prm.learning_rate = 3, 4, 1e-3
  c.rl.steps, c.rl.samples_per_prompt, c.rl.num_minibatches = 2, 2, 2
  c.rl.policy_lr, c.rl.value_lr = 1e-4, 1e-4
  c.rl.eval_every = 0
  c.eval.num_samples, c.eval.temperature = 2, 0.2    # eval.ks "": pass@1, pass@2
  c.checkpoint.every_steps = 1
  c.logging.progress = False
  c.stages = "sft,collect,prm,rl,eval"
  return c
