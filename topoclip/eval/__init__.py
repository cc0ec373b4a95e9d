"""Evaluation: zero-shot classification, retrieval, linear probes and analyses, for any topology."""
from topoclip.eval.arithmetic import arithmetic_metrics, arithmetic_options, arithmetic_set
from topoclip.eval.attribution import Attribution, explain_pair, gradcam, save_overlay_png, save_text_relevance_png
from topoclip.eval.convergence import temperature_convergence_step
from topoclip.eval.embed import embed_images, embed_labelled_images, embed_texts, eval_mode
from topoclip.eval.embedded import EmbeddedSet, embed_dataset
from topoclip.eval.evaluation import TASKS, EvalEntry, EvalRecord, flat_metrics, nest_records, run_evaluation
from topoclip.eval.linear_probe import fit_logistic_regression, linear_probe_metrics, probe_accuracy, probe_features, run_linear_probe
from topoclip.eval.map_at_r import evaluate_map_at_r, map_at_r_metrics, map_at_r_scores, retrieval_map_at_r
from topoclip.eval.retrieval import evaluate_retrieval, rank_of_best_positive, retrieval_metrics, retrieval_recall
from topoclip.eval.robustness import evaluate_robustness, robustness_metrics
from topoclip.eval.shift import EmbeddingShiftModel, estimate_modality_gap
from topoclip.eval.token_subsets import evaluate_token_subsets, token_subset_accuracy
from topoclip.eval.zeroshot import (
    embed_class_texts,
    topk_accuracy,
    zeroshot_accuracy,
    zeroshot_classify,
    zeroshot_logits,
    zeroshot_metrics,
)

__all__ = [
    "TASKS",
    "arithmetic_metrics",
    "arithmetic_options",
    "arithmetic_set",
    "Attribution",
    "EmbeddedSet",
    "EvalEntry",
    "EvalRecord",
    "embed_dataset",
    "nest_records",
    "flat_metrics",
    "run_evaluation",
    "map_at_r_metrics",
    "retrieval_metrics",
    "robustness_metrics",
    "zeroshot_metrics",
    "EmbeddingShiftModel",
    "estimate_modality_gap",
    "embed_class_texts",
    "embed_images",
    "embed_labelled_images",
    "embed_texts",
    "eval_mode",
    "evaluate_map_at_r",
    "evaluate_token_subsets",
    "evaluate_retrieval",
    "evaluate_robustness",
    "explain_pair",
    "fit_logistic_regression",
    "linear_probe_metrics",
    "probe_features",
    "gradcam",
    "run_linear_probe",
    "retrieval_map_at_r",
    "map_at_r_scores",
    "probe_accuracy",
    "rank_of_best_positive",
    "retrieval_recall",
    "save_overlay_png",
    "save_text_relevance_png",
    "temperature_convergence_step",
    "token_subset_accuracy",
    "topk_accuracy",
    "zeroshot_accuracy",
    "zeroshot_classify",
    "zeroshot_logits",
]
