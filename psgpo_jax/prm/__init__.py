"""Process reward model: binary-search line labels (`labeling`), PRM examples and batches
(`batches`), training (`train`), held-out metrics (`metrics`), line-end scores (`scoring`)
and the trivial predictors it must beat (`baselines`).

    from psgpo_jax import prm
    stats = prm.collect_labels(policy_params, model_cfg, tokenizer, problems, config,
                               out_dir, rng)
    rows = prm.load_labels(out_dir)
    params, metrics = prm.train_prm(policy_params, model_cfg, tokenizer, rows,
                                    prm.PRMTrainConfig.from_config(config), run_dir, pad_id)
    scores = prm.score(params, model_cfg, batch)      # [B, T], PRM output at line ends
"""
from psgpo_jax.prm.labeling import (LabelingConfig, PolicyProbe, PrefixJob, SearchState,
                                    balance_lines, collect_labels, label_agreement_by_k,
                                    label_batch, label_lines, load_labels, new_search,
                                    next_probe, run_collection, select_rows, update)
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
