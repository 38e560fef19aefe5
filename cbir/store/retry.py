"""Retries with exponential backoff for a Qdrant server's transient failures.

Transient: the connection is refused, reset or dropped, a request times out, or the server answers 500, 502,
503 or 504 (or gRPC UNAVAILABLE). Anything else (a 4xx, a bad request) fails at once. After the last attempt
the error names the server, what went wrong and how often it was tried, in one line.

Only idempotent calls are retried as they are (reads; upserts of points with fixed IDs; metadata updates;
deletes). A call that is not idempotent — creating a collection, moving aliases — may have been applied by
the server although its answer was lost, so before it is repeated the server's state is checked: if the
change is already there, the call is done.
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


#: qdrant-client methods that leave the same state however often they run.
IDEMPOTENT = frozenset({
    "get_collections", "get_collection", "collection_exists", "get_aliases", "get_collection_aliases", "count",
    "retrieve", "scroll", "query_points", "search", "upsert", "update_collection", "delete_collection",
    "create_payload_index", "info", "list_shard_snapshots", "list_snapshots",
})


def call_with_retries(location: str, retries: int, fn: Callable[..., T], *args: Any,
                      done: Callable[[], T | None] | None = None, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, retried up to `retries` times on transient failures. `done`, for a call that is
    not idempotent, is asked before each retry: a result other than None means the call was applied."""
    delay, started = FIRST_DELAY, time.monotonic()
    for attempt in range(retries + 1):
        try:
            if attempt and done is not None and (result := _ask(done)) is not None:
                return result
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


def _ask(done: Callable[[], T | None]) -> T | None:
    """`done()`, or None when the server cannot tell now (a transient failure: then the call is repeated)."""
    try:
        return done()
    except Exception as exc:
        if is_transient(exc):
            return None
        raise


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
    """Wraps a QdrantClient: idempotent calls are retried on transient failures (`call_with_retries`);
    `create_collection` and `update_collection_aliases` only after checking that they were not applied; any
    other call is made once (a transient failure is still one line)."""

    def __init__(self, client: Any, location: str, retries: int) -> None:
        self._client, self._location, self._retries = client, location, retries
        self._checks: dict[str, Callable[..., Callable[[], Any]]] = {
            "create_collection": self._created, "update_collection_aliases": self._aliases_moved}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr) or name == "close":
            return attr
        check = self._checks.get(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if name in IDEMPOTENT:
                return call_with_retries(self._location, self._retries, attr, *args, **kwargs)
            if check is not None:
                return call_with_retries(self._location, self._retries, attr, *args, done=check(*args, **kwargs),
                                         **kwargs)
            return call_with_retries(self._location, 0, attr, *args, **kwargs)
        return call

    def _created(self, collection_name: str, *args: Any, **kwargs: Any) -> Callable[[], bool | None]:
        """Done when the collection exists (it did not before: `ClientIndex` checks that first)."""
        return lambda: True if self._client.collection_exists(collection_name) else None

    def _aliases_moved(self, change_aliases_operations: list[Any], *args: Any, **kwargs: Any
                       ) -> Callable[[], bool | None]:
        """Done when every alias the (atomic) request names points where the request leaves it."""
        wanted: dict[str, str | None] = {}
        for operation in change_aliases_operations:
            if getattr(operation, "delete_alias", None) is not None:
                wanted[operation.delete_alias.alias_name] = None
            elif getattr(operation, "create_alias", None) is not None:
                wanted[operation.create_alias.alias_name] = operation.create_alias.collection_name
            else:
                return lambda: None                     # a rename: its outcome cannot be told apart; repeat

        def moved() -> bool | None:
            now = {a.alias_name: a.collection_name for a in self._client.get_aliases().aliases}
            return True if all(now.get(alias) == target for alias, target in wanted.items()) else None
        return moved
