"""Who may ask `cbir serve`, and how much: a Host allow-list, an optional bearer token, and an upload limit
enforced while the body streams in (ASGI middleware, outermost first).

- **Host allow-list.** A request whose Host header names another host is refused (400) before anything else:
  a web page on another site cannot reach a server on 127.0.0.1 by DNS rebinding.
- **Token.** With one, every request but the viewer's page needs it, as ``Authorization: Bearer TOKEN`` (API
  clients) or the ``cbir_token`` cookie that ``GET /?token=TOKEN`` sets (HttpOnly, SameSite=Strict) before it
  redirects to the page, so the page's own requests and images carry it. Compared in constant time.
- **Upload limit.** A ``Content-Length`` over the limit is refused (413) before any byte is read; a body sent
  without one (chunked) is counted as it arrives and cut off at the limit, so a client cannot make the server
  buffer more than the limit.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

COOKIE = "cbir_token"
#: What a multipart body may carry beyond the file itself (the form fields and part headers).
FORM_OVERHEAD = 64 * 2**10
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Access:
    """`token`: the bearer token every request but the page needs (None: none). `hosts`: the host names (without
    port) the server answers to (None: any, for a server behind a proxy that checks them)."""

    token: str | None = None
    hosts: tuple[str, ...] | None = None


TOKEN_ENV = "CBIR_SERVE_TOKEN"
#: A token: URL- and cookie-safe characters (`secrets.token_urlsafe` makes one), long enough not to be guessed.
TOKEN = re.compile(r"[A-Za-z0-9_.~-]{16,512}")


def serve_token(path: Path | None) -> str | None:
    """The bearer token from the file `path`, else from $CBIR_SERVE_TOKEN (None: no token); a malformed one is a
    one-line `CbirError` that never shows it."""
    from cbir.errors import CbirError
    if path is not None:
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise CbirError(f"{path}: cannot read the token file ({exc.strerror})") from None
        where = str(path)
    else:
        token, where = os.environ.get(TOKEN_ENV, "").strip(), f"${TOKEN_ENV}"
    if not token:
        return None
    if not TOKEN.fullmatch(token):
        raise CbirError(f"{where}: a token is 16 to 512 of A-Z a-z 0-9 _ . ~ - (make one with: python3 -c "
                        "'import secrets; print(secrets.token_urlsafe(32))')")
    return token


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def access_for(bind: str, token: str | None, allow_hosts: list[str] | tuple[str, ...] = ()) -> Access:
    """The access rules of a server bound to `bind`: loopback answers to this machine's names (and
    `allow_hosts`); any other address needs a token (`cbir.errors.CbirError` otherwise) and answers to its own
    address and `allow_hosts`, or to any host when it is bound to all addresses and none is named."""
    from cbir.errors import CbirError
    names = tuple(h.lower().strip("[]") for h in allow_hosts)
    if is_loopback(bind):
        return Access(token, (*LOOPBACK_NAMES, *names))
    if not token:
        raise CbirError(f"--host {bind} serves the archive's images beyond this machine: set $CBIR_SERVE_TOKEN "
                        "(or --token-file FILE) to require a token, or bind 127.0.0.1")
    if bind in ("0.0.0.0", "::") and not names:
        return Access(token, None)
    return Access(token, (bind.lower().strip("[]"), *names))


def host_name(header: str) -> str:
    """The host of a Host header, without its port (IPv6 brackets kept off)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """The ASGI middleware of `Access` and the upload limit `max_body` (bytes, the whole request body)."""

    def __init__(self, app: ASGIApp, access: Access, max_body: int) -> None:
        self.app, self.access, self.max_body = app, access, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        hosts = self.access.hosts
        if hosts is not None and host_name(headers.get("host", "")) not in hosts:
            return await _reply(send, 400, f"host {headers.get('host', '')[:80]!r} is not one this server answers "
                                           "to (cbir serve --allow-host NAME)")
        token = self.access.token
        if token is not None:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if scope["path"] == "/" and "token" in query:
                if not _same(query["token"][0], token):
                    return await _reply(send, 401, "wrong token")
                return await _reply(send, 303, "", [(b"location", b"/"), (b"set-cookie", (
                    f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/").encode("latin-1"))])
            if scope["path"] != "/" and not _authorised(headers, token):
                return await _reply(send, 401, "this server needs its token: an Authorization: Bearer header, or "
                                               "open /?token=… once in the browser",
                                    [(b"www-authenticate", b"Bearer")])
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return await _reply(send, 400, "bad Content-Length")
            if int(length) > self.max_body:
                return await _reply(send, 413, self._too_large())
        return await self._limited(scope, receive, send)

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Count the body as it arrives; past the limit, answer 413 and tell the app the client left (so it stops
        reading), dropping whatever it then tries to send."""
        seen, started, refused = 0, False, False

        async def counted() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    refused = True
                    if not started:
                        await _reply(send, 413, self._too_large())
                    return {"type": "http.disconnect"}
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted, watched)

    def _too_large(self) -> str:
        return f"upload larger than {max(1, (self.max_body - FORM_OVERHEAD) // 2**20)} MiB"


def _same(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode(), token.encode())


def _authorised(headers: dict[str, str], token: str) -> bool:
    bearer = headers.get("authorization", "")
    if bearer.lower().startswith("bearer ") and _same(bearer[7:].strip(), token):
        return True
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE and _same(value, token):
            return True
    return False


async def _reply(send: Send, status: int, detail: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode() if detail else b""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(extra or [])]})
    await send({"type": "http.response.body", "body": body})
