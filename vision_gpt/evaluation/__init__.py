"""Scoring captions: the COCO caption metrics, caption statistics, perplexity, BERTScore, CLIPScore, near-duplicate
captions, and the `vision-gpt evaluate` job that runs them on a dataset split."""

from .metrics import (CAPTION_METRICS_PATH, caption_statistics, compute_caption_metrics, format_metrics_table,
                      perplexity)

__all__ = ["CAPTION_METRICS_PATH", "caption_statistics", "compute_caption_metrics", "format_metrics_table",
           "perplexity"]
