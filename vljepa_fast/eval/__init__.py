"""Evaluation of VL-JEPA models: metrics on similarity matrices (:mod:`.metrics`), a model-level
evaluator (:func:`evaluate_model`) and the CLI ``python -m vljepa_fast.eval``."""

from vljepa_fast.eval.evaluate import DEFAULT_QUERY, EvalData, Question, Stream, evaluate_model
from vljepa_fast.eval.metrics import (
    boundary_recall,
    classification_accuracy,
    decoding_efficiency,
    gt_ranks,
    rank_summary,
    retrieval_metrics,
    selective_decoding_efficiency,
    text_to_video_metrics,
    uniform_segment_starts,
    video_to_text_metrics,
    vqa_accuracy,
)

__all__ = [
    "DEFAULT_QUERY",
    "EvalData",
    "Question",
    "Stream",
    "boundary_recall",
    "classification_accuracy",
    "decoding_efficiency",
    "evaluate_model",
    "gt_ranks",
    "rank_summary",
    "retrieval_metrics",
    "selective_decoding_efficiency",
    "text_to_video_metrics",
    "uniform_segment_starts",
    "video_to_text_metrics",
    "vqa_accuracy",
]
