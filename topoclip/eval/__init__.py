"""Evaluation: zero-shot classification and image-text retrieval, for any topology."""
from topoclip.eval.embed import embed_images, embed_labelled_images, embed_texts, eval_mode
from topoclip.eval.retrieval import evaluate_retrieval, rank_of_best_positive, retrieval_recall
from topoclip.eval.zeroshot import (
    embed_class_texts,
    topk_accuracy,
    zeroshot_accuracy,
    zeroshot_classify,
    zeroshot_logits,
)

__all__ = [
    "embed_class_texts",
    "embed_images",
    "embed_labelled_images",
    "embed_texts",
    "eval_mode",
    "evaluate_retrieval",
    "rank_of_best_positive",
    "retrieval_recall",
    "topk_accuracy",
    "zeroshot_accuracy",
    "zeroshot_classify",
    "zeroshot_logits",
]
