"""Embedding: images → (L2-normalised embedding, binary code, model probability)."""

from cbir.embed.embedder import Embedded, detect_image, embed_and_detect, embed_batches, embed_image

__all__ = ["Embedded", "detect_image", "embed_and_detect", "embed_batches", "embed_image"]
