"""The embedded default: a tiny model on the synthetic long-horizon suite.

Runs every stage on 2 CPU cores in minutes: `python -m experiments.train
--config configs/quickstart.py`. Differences from base, and why:
- labels are collected with the SFT policy (`baseline.steps = 0`) to fit the time budget;
- K = 8 completions per probed prefix instead of the paper's 20, for the same reason;
- SFT on a noisy corpus (20% of the solution lines replaced by plausible wrong ones) with
  a warmup-stable-decay schedule: the policy learns the task (held-out greedy pass@1
  about 0.9) but, sampled, writes wrong lines at about the corpus's rate, and the errors
  compound with the horizon (sampled pass@1 about 0.75 at 2 lines, 0.3 at 8). That is
  the regime RL from unit tests is for, and where line-level credit should help.

`--config configs/quickstart.py:tiny` shrinks every stage to seconds (tests, CI, the
notebook's smoke run); it checks that the pipeline runs, not that it learns.
"""
from configs import base


def get_config(variant: str = ""):
  c = base.get_config()
  c.workdir = "runs/quickstart"
  c.compilation_cache = "runs/xla_cache"   # a rerun or an ablation arm skips ~1 min of compiles
  c.data.num_train = 2000     # enough distinct specs that SFT generalises, not memorises
  c.sft.steps = 1000
  c.sft.noise = 0.2
  c.sft.schedule = "wsd"      # 1000 steps: loss 0.04 vs 0.15 with cosine (copying forms late)
  c.sft.packed_rows = 16      # 32 pairs in 16 rows: the same loss, 1.4x faster steps
  c.baseline.steps = 0
  c.collect.completions = 8
  c.collect.num_prompts = 192
  c.rl.steps = 60
  c.rl.policy_lr = 3e-5       # 1e-4 rises, then drifts and falls (docs/rl_tuning.md)
  c.rl.value_lr = 1e-4
  c.rl.prompts_per_row = 2    # rows of two prompts, each with its 4 samples: 2.6x fewer slots
  c.rl.reward.kl_coef = 0.01
  # The learning curve: held-out greedy and sampled pass@1 (8 samples) every 10 steps;
  # the eval stage's before/after figures use 16 samples per problem.
  c.rl.eval_samples = 8
  c.eval.num_samples = 16
  if variant == "tiny":
    c.workdir = "runs/quickstart_tiny"
    c.compilation_cache = ""
    c.model.hidden_size = 32
    c.model.intermediate_size = 64
    c.data.num_train = 32
    c.data.num_eval = 8
    c.data.max_horizon = 4
    c.sft.steps = 20
    c.sft.batch_size = 8
    c.sft.packed_rows = 4
    c.sft.checkpoint_every = 10
    c.rl.prompts_per_row = 1   # 4 rows: an 8-device test mesh splits them 4 ways
    c.collect.num_prompts = 8
    c.collect.responses_per_prompt = 2
    c.collect.completions = 2
    c.collect.batch_responses = 8    # two label shards: a crash between them is tested
    c.collect.selection = "all"
    c.prm.steps = 5
    c.prm.checkpoint_every = 2       # a crash mid-PRM resumes from step 2 or 4 (tested)
    c.prm.batch_size = 4
    c.rl.steps = 2
    c.rl.prompts_per_step = 4
    c.rl.samples_per_prompt = 2
    c.rl.num_minibatches = 2
    c.rl.eval_every = 1
    c.eval.num_samples = 2
    c.rl.eval_samples = 0
    c.sampling.max_new_tokens = 48
    c.checkpoint.every_steps = 1
    c.logging.progress = False
  elif variant:
    raise ValueError(f"Unknown quickstart variant {variant!r}; use 'tiny' or nothing.")
  return c
