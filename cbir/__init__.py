"""cbir: content-based image retrieval for chest X-rays."""

__version__ = "0.1.0"
