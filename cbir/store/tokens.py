"""Per-team access tokens for a Qdrant server with JWT RBAC (`QDRANT__SERVICE__JWT_RBAC=true`).

Qdrant accepts, wherever it accepts its API key, a JWT signed (HS256) with that key whose `access` claim
lists collections with "r" (read) or "rw" (read and write). cbir sends a collection's alias (`TEAM.NAME`) with
every request and the server resolves it, so a token for the alias keeps working across reindexes.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import jwt

from cbir.errors import CbirError


def make_token(api_key: str, collections: list[str], write: bool = False, days: float = 90.0,
               now: float | None = None) -> str:
    """A JWT that grants read (or read and write) access to `collections` only, expiring after `days`."""
    if not api_key:
        raise CbirError("a token is signed with the server's API key: pass --api-key or set $CBIR_QDRANT_API_KEY")
    if not collections:
        raise CbirError("name at least one collection for the token")
    claims: dict[str, Any] = {
        "access": [{"collection": name, "access": "rw" if write else "r"} for name in collections],
        "exp": int((time.time() if now is None else now) + days * 86400),
    }
    with warnings.catch_warnings():   # PyJWT warns about short HMAC keys; the key is the server's, not ours
        warnings.simplefilter("ignore")
        return jwt.encode(claims, api_key, algorithm="HS256")
