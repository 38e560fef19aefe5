"""Retries with exponential backoff for a Qdrant server's transient failures.

Transient: the connection is refused, reset or dropped, a request times out, or the server answers 500, 502,
503 or 504 (or gRPC UNAVAILABLE). Anything else (a 4xx, a bad request) fails at once. After the last attempt
the error names the server, what went wrong and how often it was tried, in one line.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from cbir.errors import IndexError_

T = TypeVar("T")

TRANSIENT_STATUS = frozenset({500, 502, 503, 504})
#: Seconds before the first retry; it doubles each time, up to `MAX_DELAY`, with ±25 % jitter.
FIRST_DELAY = 0.25
MAX_DELAY = 4.0


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, UnexpectedResponse):
        return exc.status_code in TRANSIENT_STATUS
    if isinstance(exc, (ResponseHandlingException, httpx.TransportError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in TRANSIENT_STATUS
    code = getattr(exc, "code", None)  # grpc.RpcError, without importing grpc
    return callable(code) and getattr(code(), "name", "") == "UNAVAILABLE"


def call_with_retries(location: str, retries: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, retried up to `retries` times on transient failures."""
    delay, started = FIRST_DELAY, time.monotonic()
    for attempt in range(retries + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == retries:
                raise IndexError_(f"{location}: {describe(exc)}; gave up after {attempt + 1} attempt"
                                  f"{'s' if attempt else ''} in {time.monotonic() - started:.1f} s") from exc
            time.sleep(delay * random.uniform(0.75, 1.25))
            delay = min(2 * delay, MAX_DELAY)
    raise AssertionError("unreachable")


def describe(exc: BaseException) -> str:
    """One line on a transient failure."""
    if isinstance(exc, UnexpectedResponse):
        return f"the Qdrant server answered HTTP {exc.status_code} {exc.reason_phrase}".rstrip()
    source = exc.source if isinstance(exc, ResponseHandlingException) else exc
    kind = type(source).__name__
    text = (str(source).strip().splitlines() or [kind])[0][:160]
    if isinstance(source, httpx.TimeoutException):
        return f"the Qdrant server did not answer in time ({kind})"
    if isinstance(source, httpx.ConnectError):
        return f"cannot connect to the Qdrant server ({text})"
    return f"the connection to the Qdrant server failed ({kind}: {text})"


class RetryingClient:
    """Wraps a QdrantClient: each method call is retried on transient failures (`call_with_retries`)."""

    def __init__(self, client: Any, location: str, retries: int) -> None:
        self._client, self._location, self._retries = client, location, retries

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr) or name == "close":
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return call_with_retries(self._location, self._retries, attr, *args, **kwargs)
        return call
