"""Evaluation of a trained model and its index on a query set."""

from cbir.evaluate.summary import summarize, to_json_safe

__all__ = ["summarize", "to_json_safe"]
