"""Reaching a Qdrant server: settings from arguments or the environment, the connection, one-line errors, and
the shard-snapshot download (`GET /collections/{name}/shards/0/snapshot`, the format Qdrant Edge unpacks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from qdrant_client import QdrantClient
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from cbir.errors import IndexError_
from cbir.store.base import first_line
from cbir.store.edge_files import SHARE_HINT
from cbir.store.retry import RetryingClient, call_with_retries
from cbir.store.server_settings import ServerSettings


def connect(location: str, settings: ServerSettings, create: bool) -> QdrantClient:
    """A client for a server URL (with retries), `:memory:` or `local:PATH` (qdrant-client's local mode)."""
    if location.startswith(("http://", "https://")):
        extra: dict[str, Any] = {}
        if settings.ca_cert:
            if not Path(settings.ca_cert).is_file():
                raise IndexError_(f"{settings.ca_cert}: CA certificate file not found")
            extra["verify"] = settings.ca_cert  # passed on to httpx
        client = QdrantClient(url=location, api_key=settings.api_key, timeout=settings.timeout,
                              check_compatibility=False, **extra)
        return cast(QdrantClient, RetryingClient(client, location, settings.retries))  # a proxy with its methods
    if location == ":memory:":
        return QdrantClient(location=":memory:")
    if not location.startswith("local:"):
        raise IndexError_(f"{location}: not a qdrant-client location (http(s)://…, :memory:, local:PATH)")
    path = location.removeprefix("local:")
    if not create and not Path(path).is_dir():
        raise IndexError_(f"{location}: no index here (run `cbir ingest` first)")
    try:
        return QdrantClient(path=path)
    except RuntimeError as exc:  # portalocker: the folder is locked by another client
        raise IndexError_(f"{location}: the index is in use by another process "
                          f"(local mode allows one at a time); {SHARE_HINT}") from exc


def download_snapshot(location: str, settings: ServerSettings, collection: str, path: Path, where: str) -> None:
    """Stream the server's snapshot of the collection's only shard to `path`, with retries."""
    import httpx  # qdrant-client's own HTTP library

    url = f"{location.rstrip('/')}/collections/{collection}/shards/0/snapshot"
    headers = {"api-key": settings.api_key} if settings.api_key else {}

    def download() -> None:
        with httpx.stream("GET", url, headers=headers, timeout=settings.timeout or 300,
                          verify=settings.ca_cert or True) as response:
            if response.status_code in (500, 502, 503, 504):
                response.raise_for_status()  # transient: retried
            if response.status_code != 200:
                hint = " (snapshots need a full-access API key)" if response.status_code in (401, 403) else ""
                raise IndexError_(f"{where}: snapshot download failed: HTTP {response.status_code}{hint}")
            with open(path, "wb") as fh:
                for chunk in response.iter_bytes(1 << 20):
                    fh.write(chunk)

    call_with_retries(location, settings.retries, download)


def error_detail(exc: Exception) -> str:
    """One line on what went wrong, with the server's own error message where there is one."""
    if isinstance(exc, UnexpectedResponse):
        try:
            error = str(exc.structured()["status"]["error"])
        except (ValueError, KeyError, TypeError):
            error = exc.reason_phrase
        hint = " (check the API key)" if exc.status_code in (401, 403) else ""
        return f"HTTP {exc.status_code}: {error}{hint}"
    if isinstance(exc, ResponseHandlingException):
        return f"cannot reach the Qdrant server ({first_line(exc.source)})"
    return first_line(exc)
