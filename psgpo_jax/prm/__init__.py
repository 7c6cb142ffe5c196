"""Process reward model: binary-search line labels (the pure search `search`, one batch
through any probe `labeler`, row selection and balancing `select`, label shards `shards`,
the collection loop `collect`), PRM examples and batches (`batches`), training (`train`),
held-out metrics (`metrics`), line-end scores (`scoring`) and the trivial predictors it
must beat (`baselines`).

    from psgpo_jax import prm
    stats = prm.collect_labels(policy_params, model_cfg, tokenizer, problems,
                               prm.LabelingConfig.from_config(config),
                               from_pipeline_config(config, tokenizer, 1), out_dir, rng)
    rows = prm.load_labels(out_dir)
    params, metrics = prm.train_prm(policy_params, model_cfg, tokenizer, rows,
                                    prm.PRMTrainConfig.from_config(config), run_dir, pad_id)
    scores = prm.score(params, model_cfg, batch)      # [B, T], PRM output at line ends
"""
from psgpo_jax.prm.collect import PolicyProbe, collect_labels, run_collection
from psgpo_jax.prm.labeler import LabelingConfig, label_agreement_by_k, label_batch
from psgpo_jax.prm.search import (PrefixJob, SearchState, label_lines, new_search, next_probe,
                                  update)
from psgpo_jax.prm.select import balance_lines, select_rows
from psgpo_jax.prm.shards import load_labels
from psgpo_jax.prm.batches import make_prm_batches
from psgpo_jax.prm.metrics import auroc, evaluate_prm, prm_metrics
from psgpo_jax.prm.scoring import make_score_fn, score
from psgpo_jax.prm.train import PRMTrainConfig, make_prm_loss, prm_objective, train_prm

__all__ = [
    "LabelingConfig", "PRMTrainConfig", "PolicyProbe", "PrefixJob", "SearchState", "auroc",
    "balance_lines", "collect_labels", "evaluate_prm", "label_agreement_by_k", "label_batch",
    "label_lines", "load_labels", "make_prm_batches", "make_prm_loss", "make_score_fn",
    "new_search", "next_probe", "prm_metrics", "prm_objective", "run_collection", "score",
    "select_rows", "train_prm", "update",
]
