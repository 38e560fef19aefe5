"""Evaluation of a trained model and its index on a query set."""

from cbir.evaluation.summary import summarize, to_json_safe

__all__ = ["summarize", "to_json_safe"]
