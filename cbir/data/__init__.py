"""Datasets: label readers for the RSNA, NIH and folder layouts, splits, and synthetic data."""
