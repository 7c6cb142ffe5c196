"""One process of multi-process label collection and evaluation (`tests/test_multihost.py`).

Every process runs this same program, as on a pod: it joins the distributed runtime,
builds the same tiny policy, tokenizer and synthetic problems, and then, on its own
devices (`multihost.sampling_mesh`) and its own sandbox,

  * calls `prm.collect.collect_labels`: each process labels its share of the batches into
    the shared `--out` directory;
  * calls `evaluation.evaluate_policy` with its process shard: each samples and tests its
    share of the problems, and the samples of all are gathered (`multihost.allgather_json`);
    process 0 writes them and the summary to `--out`/eval.json.

Two processes must write the labels and the evaluation one process writes.

    python -m tests.multihost_collect_job --num_processes 2 --process_id 0 --port 12355 \\
        --out DIR
"""
from __future__ import annotations

import tempfile

from tests.multihost_job import parse_and_join


def main() -> None:
  args = parse_and_join(__doc__.splitlines()[0])

  import jax                                                  # pylint: disable=import-outside-toplevel

  from configs import quickstart                              # pylint: disable=import-outside-toplevel
  from psgpo_jax import evaluation, multihost, sandbox, sharding  # pylint: disable=import-outside-toplevel
  from psgpo_jax.data import synthetic, synthetic_corpus      # pylint: disable=import-outside-toplevel
  from psgpo_jax.models import CausalLM, ModelConfig, init_params  # pylint: disable=import-outside-toplevel
  from psgpo_jax.jsonio import write_json                     # pylint: disable=import-outside-toplevel
  from psgpo_jax.prm import collect                           # pylint: disable=import-outside-toplevel
  from psgpo_jax.prm.labeler import LabelingConfig            # pylint: disable=import-outside-toplevel
  from psgpo_jax.sampling_config import from_pipeline_config  # pylint: disable=import-outside-toplevel
  from psgpo_jax.tokenization import load_tokenizer           # pylint: disable=import-outside-toplevel

  assert jax.process_count() == args.num_processes and jax.device_count() == 2
  mesh = sharding.make_mesh((-1, 1, 1))
  tokenizer = load_tokenizer(synthetic_corpus.build_tokenizer(tempfile.mkdtemp()))
  cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id)
  params = init_params(CausalLM(cfg), jax.random.PRNGKey(0))
  problems = synthetic.make_split(0, 12, range(3, 10))
  config = quickstart.get_config()
  config.collect.responses_per_prompt = 2
  config.collect.completions = 2
  config.collect.batch_responses = 4          # 2 prompts per batch: 4 batches
  config.collect.selection = "failed"
  config.sampling.max_new_tokens = 16
  with sandbox.Sandbox(1) as pool:
    stats = collect.collect_labels(params, cfg, tokenizer, problems[:8],
                                   LabelingConfig.from_config(config),
                                   from_pipeline_config(config, tokenizer, 1), args.out,
                                   jax.random.PRNGKey(3), run_many_fn=pool.run_many,
                                   agreement_ks=(1, 2), mesh=multihost.sampling_mesh(mesh))
  sampling = from_pipeline_config(config, tokenizer, num_samples=2, temperature=1.0)
  with sandbox.Sandbox(1) as pool:        # 3 sampler calls of 2 problems, split by process
    report = evaluation.evaluate_policy(
        params, cfg, tokenizer, problems[:6], pool, sampling, seed=5, show_progress=False,
        rows_per_call=4, mesh=multihost.sampling_mesh(mesh), ks=(1, 2),
        shard=(jax.process_index(), jax.process_count()), gather=multihost.allgather_json)
  if multihost.is_main_process():
    write_json(f"{args.out}/eval.json", report)
  print(f"process {jax.process_index()} of {jax.process_count()}: ok, "
        f"{stats['batches_run_now']} batches", flush=True)


if __name__ == "__main__":
  main()
