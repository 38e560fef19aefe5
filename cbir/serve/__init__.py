"""`cbir serve`: a long-lived process that keeps the model and the collection warm and answers over HTTP."""

from cbir.serve.app import create_app

__all__ = ["create_app"]
