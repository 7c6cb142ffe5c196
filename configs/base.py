"""Base configuration of a PSGPO pipeline: every field, with its meaning.

Experiment configs import `get_config` from here and change only what differs, saying
why. Any field can be overridden on the command line, e.g. `--config.rl.kl_coef=0.02`.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "runs/default"           # everything of a run goes here (made absolute)
  c.seed = 0                           # one seed for data order, init, sampling
  c.compilation_cache = ""             # directory of XLA's compiled programs, reused by later
                                       # runs and resumptions ("" = off)
  # Stages to run, in order; a stage whose output exists is skipped (re-runs continue).
  c.stages = "sft,baseline,collect,prm,rl,eval"

  # --- policy model ---------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.path = ""                    # local Hugging Face dir; "" = random init from below
  c.model.architecture = "qwen2"       # qwen2 | llama
  c.model.vocab_size = 0               # 0 = the tokenizer's vocabulary size
  c.model.hidden_size = 128
  c.model.intermediate_size = 352
  c.model.num_hidden_layers = 2
  c.model.num_attention_heads = 4
  c.model.num_key_value_heads = 2      # < heads: grouped-query attention
  c.model.head_dim = 0                 # 0 = hidden_size // num_attention_heads
  c.model.rope_theta = 10000.0
  c.model.rms_norm_eps = 1e-6
  c.model.max_position_embeddings = 1024
  c.model.tie_word_embeddings = True
  c.model.attention_bias = True        # q/k/v bias (Qwen2 style)
  c.model.dtype = "float32"            # compute dtype: float32 | bfloat16
  c.model.param_dtype = "float32"
  c.model.remat = False                # rematerialise layers in backprop (saves memory)
  c.model.attention_query_block = 128  # causal attention in query blocks (0 = one block)

  # --- tokenizer --------------------------------------------------------------------
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = ""                # local dir; "" = the synthetic suite's BPE, built in workdir
  c.tokenizer.vocab_size = 512         # size of the synthetic suite's BPE when built

  # --- problems ---------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"          # synthetic | humaneval | mbpp | livecodebench | apps |
                                       # tfds (a set written by experiments/prepare_tfds.py)
  c.data.train_path = ""               # local file in the source's published format (tfds:
                                       # the TFDS data_dir)
  c.data.tfds_name = ""                # tfds: the problem set's name under data.train_path
  c.data.tfds_eval_split = "eval"      # tfds: the held-out split ("" = hold out
                                       # data.eval_fraction of train, by hash)
  c.data.eval_path = ""                # held-out problems ("" = a split of train, or built-in)
  c.data.on_bad_row = "skip"           # skip (with a report) | error
  c.data.eval_fraction = 0.2           # share held out when eval_path is empty (non-synthetic)
  c.data.num_train = 512               # synthetic: training problems
  c.data.num_eval = 64                 # synthetic: held-out problems
  c.data.min_horizon = 2               # synthetic: fewest solution lines
  c.data.max_horizon = 8               # synthetic: most solution lines
  c.data.max_prompt_tokens = 256       # longer prompts are dropped, with a count in the log
  c.data.prompt_format = "plain"       # plain (the benchmark's prompt, completed as is) |
                                       # chat (tokenizer's chat template; the program is
                                       # the answer's ```python block): data/prompts.py

  # --- sandbox ----------------------------------------------------------------------
  c.sandbox = ml_collections.ConfigDict()
  c.sandbox.num_workers = 0            # 0 = number of CPU cores
  c.sandbox.timeout_s = 6.0            # wall clock per program (all its tests)
  c.sandbox.memory_mb = 1024           # address-space limit per program
  c.sandbox.cache_size = 100_000       # results remembered by (program, tests, limits)

  # --- sampling (rollouts, labeling completions, evaluation) -------------------------
  c.sampling = ml_collections.ConfigDict()
  c.sampling.max_new_tokens = 128
  c.sampling.temperature = 1.0
  c.sampling.top_p = 1.0
  c.sampling.top_k = 0                 # 0 = off
  c.sampling.min_prompt_bucket = 16    # smallest padded prompt length (prompts are padded
                                       # to powers of two from here: fewer compiled shapes
                                       # when larger)
  c.sampling.stop_strings = "auto"      # comma-separated; auto = the data source's and
                                       # prompt format's own (data/prompts.py STOP_STRINGS)
  c.sampling.compact_halvings = 2      # decode on the live rows only once they fit in half
                                       # the batch, up to this many halvings (0 = never)
  c.sampling.decode_layout = "auto"    # feature_major | batch_major | auto (feature-major
                                       # on CPU without a mesh: faster skinny matmuls)

  # --- supervised warm-up ---------------------------------------------------------------
  c.sft = ml_collections.ConfigDict()
  c.sft.steps = 300
  c.sft.batch_size = 32
  c.sft.learning_rate = 1e-3
  c.sft.warmup_steps = 20
  c.sft.schedule = "cosine"            # cosine | wsd (stable, then linear decay over the last
                                       # 20%) | constant, after the warmup
  c.sft.weight_decay = 0.0
  c.sft.noise = 0.0                    # synthetic: share of corrupted lines in the corpus
  c.sft.checkpoint_every = 200         # steps between SFT checkpoints (a re-run resumes); 0 off
  c.sft.packed_rows = 0                # pack each batch's pairs into this many rows (0 = a
                                       # row per pair): same loss and gradient, less padding
  c.sft.length_grouping = 0            # batches per length-sorted group (0 = off): less
                                       # padding, but learned slower on the synthetic suite

  # --- PPO without PRM, whose checkpoints sample the responses to label -----------------
  c.baseline = ml_collections.ConfigDict()
  c.baseline.steps = 0                 # 0 = label with the SFT policy (quickstart)
  c.baseline.num_checkpoints = 4       # evenly spaced policies that sample responses

  # --- PRM label collection (binary search over line prefixes) --------------------------
  c.collect = ml_collections.ConfigDict()
  c.collect.num_prompts = 128          # training prompts whose responses are labeled
  c.collect.responses_per_prompt = 4
  c.collect.completions = 20           # K: completions sampled per probed prefix
  c.collect.labeler = "search"         # search (K completions per probe) | oracle (synthetic:
                                       # each probe answered exactly by the first-error oracle)
  c.collect.temperature = 1.0
  c.collect.batch_responses = 64       # responses whose searches advance together
  c.collect.skip_trivial_lines = True  # blank/comment-only lines are not search steps (label 0)
  c.collect.selection = "revised"      # revised (failed, recoverable prefix) | failed | all
  c.collect.drop_uniform_prompts = False   # drop prompts where all or no responses pass
  c.collect.balance = False            # subsample so positive and negative lines balance

  # --- PRM training ----------------------------------------------------------------------
  c.prm = ml_collections.ConfigDict()
  c.prm.steps = 300
  c.prm.checkpoint_every = 100         # steps between PRM checkpoints (a re-run resumes); 0 off
  c.prm.batch_size = 32
  c.prm.learning_rate = 5e-4
  c.prm.loss = "mse"                   # mse (regression to +1/-1) | bce
  c.prm.eval_fraction = 0.15           # held-out share of labeled responses (by prompt)
  c.prm.threshold = 0.0                # a line is predicted wrong below this score

  # --- PSGPO reinforcement learning -------------------------------------------------------
  c.rl = ml_collections.ConfigDict()
  c.rl.steps = 40                      # rollout + update iterations
  c.rl.seed = -1                       # RL's own seed (rollouts, problem order, value head);
                                       # -1 = seed. Lets seeds vary RL over one SFT + PRM
  c.rl.prompts_per_step = 16
  c.rl.samples_per_prompt = 4
  c.rl.ppo_epochs = 2
  c.rl.num_minibatches = 4
  c.rl.prompts_per_row = 1             # score and update rows holding this many prompts,
                                       # each once, with all their samples (0 = a row per
                                       # sample, each repeating its prompt); minibatches
                                       # then keep a prompt's samples together
  c.rl.micro_batches = 1               # accumulate each minibatch's gradient over this many
                                       # parts (same update; less memory, faster on CPU)
  c.rl.policy_lr = 2e-5
  c.rl.value_lr = 1e-4
  c.rl.grad_clip = 1.0
  c.rl.adam_eps = 1e-8                 # Adam's epsilon for policy and value
  c.rl.warmup_steps = 0                # RL steps of linear learning-rate warm-up
  c.rl.clip_eps = 0.2                  # policy ratio clipping
  c.rl.value_clip_eps = 0.2
  c.rl.vf_coef = 0.5
  c.rl.ent_coef = 0.0
  c.rl.gamma = 1.0
  c.rl.lam = 0.95
  c.rl.whiten_advantages = True
  c.rl.old_logprobs = "auto"           # recompute (a policy forward over the rollouts) |
                                       # sampler (reuse the sampler's log-probs: one
                                       # forward fewer, equal up to float rounding) |
                                       # auto (sampler in float32, recompute in bf16)
  c.rl.advantage = "gae"               # gae (value model) | rloo | grpo (critic-free: group
                                       # baseline over a prompt's samples, no value model) |
                                       # reinforce (returns-to-go, no baseline)
  c.rl.dense_reward = True             # PRM line scores as dense rewards
  c.rl.dense_source = "prm"            # prm | oracle (synthetic suite: the exact +-1 line
                                       # labels in place of the PRM's scores; an upper bound)
  c.rl.value_init = "prm"              # prm | policy | random
  c.rl.eval_every = 10                 # held-out pass@1 every N steps (0 = only at the end)
  c.rl.eval_samples = 0                # samples per problem for the sampled pass@1 of those
                                       # evaluations (at eval.temperature; 0 = greedy only)
  c.rl.max_nonfinite_steps = 3         # stop after this many skipped updates in a row
  c.rl.reward = ml_collections.ConfigDict()
  c.rl.reward.outcome = "binary"       # binary | fraction (share of tests passed)
  c.rl.reward.pass_reward = 1.0
  c.rl.reward.fail_reward = 0.0
  c.rl.reward.dense_coef_fail = 0.25   # λ for failing responses (paper)
  c.rl.reward.dense_coef_pass = 0.025  # λ for passing responses (paper)
  c.rl.reward.normalize_by_lines = True
  c.rl.reward.skip_trivial_lines = True
  c.rl.reward.penalty_only = False     # clip dense rewards to <= 0
  c.rl.reward.credit = "sum"           # sum | min (PURE min-form credit assignment) |
                                       # first_error (sum up to the first line scored < 0)
  c.rl.reward.shaping = "none"         # none | potential (PRM(after) - PRM(before); 0 after
                                       # the last line: Ng et al. potential shaping) |
                                       # progress (the same, the outcome +-1 after the last)
  c.rl.reward.shaping_baseline = 0.0   # potential / progress: PRM value before line 1
  c.rl.reward.kl_coef = 0.02
  c.rl.reward.kl_estimator = "k1"      # k1 | k3
  c.rl.reward.adaptive_kl = False
  c.rl.reward.kl_target = 0.05
  c.rl.reward.kl_horizon = 1000
  c.rl.reward.hack_penalty = 0.0       # off the outcome of responses the hack monitors flag

  # --- evaluation ----------------------------------------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.checkpoint = ""               # evaluate.py: a policy HF dir ("" = the run's latest)
  c.eval.split = "heldout"             # evaluate.py: heldout | train | all problems
  c.eval.output_dir = ""               # evaluate.py: report dir ("" = <workdir>/evaluate)
  c.eval.num_problems = 0              # 0 = all held-out problems
  c.eval.num_samples = 8               # n samples per problem for pass@k
  c.eval.ks = ""                       # k values of pass@k and Best-of-K, e.g. "1,4,8"
                                       # ("" = 1, 2, 4, ... up to num_samples; each <= it)
  c.eval.temperature = 0.8

  # --- devices --------------------------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)            # (data, fsdp, tensor); -1 fills the remaining devices
  c.mesh.distributed = False           # call jax.distributed.initialize() (multi-host)
  c.mesh.coordinator_address = ""      # host:port of process 0; "" = auto-detect (TPU pods)
  c.mesh.num_processes = 0             # 0 = auto-detect
  c.mesh.process_id = -1               # this process's index; -1 = auto-detect
  c.mesh.rules = ""                    # logical-axis rule overrides, e.g. "embed:fsdp,mlp:
                                       # tensor+fsdp,vocab:" ("" = sharding.DEFAULT_RULES)

  # --- checkpoints and logs -------------------------------------------------------------------
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 20
  c.checkpoint.max_to_keep = 2
  c.logging = ml_collections.ConfigDict()
  c.logging.every_steps = 1            # SFT, PRM and RL metrics rows every N steps (and
                                       # at evaluations and the last step)
  c.logging.progress = True            # tqdm bars
  return c
