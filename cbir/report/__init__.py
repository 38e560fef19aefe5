"""Human-readable reports (Markdown, JSON and plots)."""

from cbir.report.evaluation import render_markdown, write_report

__all__ = ["render_markdown", "write_report"]
