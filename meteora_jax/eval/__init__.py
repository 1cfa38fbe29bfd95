"""Evaluation: MeteoRA's metrics and cleaners (``metrics``)."""

from meteora_jax.eval.metrics import (
    METRICS,
    TASK_METRICS,
    clean_output,
    default_metric_for_task,
    get_metric,
    score_task,
)

__all__ = ["METRICS", "TASK_METRICS", "clean_output", "default_metric_for_task", "get_metric", "score_task"]
