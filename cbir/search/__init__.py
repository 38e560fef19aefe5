"""Search: embed a query image, filter, prefilter by Hamming distance, rank by exact cosine, vote."""

from cbir.search.query import QueryResult, parse_filters, query_image, search_embedding

__all__ = ["QueryResult", "parse_filters", "query_image", "search_embedding"]
