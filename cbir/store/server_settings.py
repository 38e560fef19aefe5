"""How to reach a Qdrant server, as plain values (no qdrant-client import: `cbir.app.settings` holds one)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cbir.errors import IndexError_


@dataclass(frozen=True)
class ServerSettings:
    """How to reach a Qdrant server: API key (or JWT), request timeout in seconds (qdrant-client's own
    setting; None keeps its default), and a CA bundle for TLS with a private certificate authority."""

    api_key: str | None = None
    timeout: int | None = None
    ca_cert: str | None = None
    retries: int = 3

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ServerSettings:
        """$CBIR_QDRANT_API_KEY, $CBIR_QDRANT_TIMEOUT, $CBIR_QDRANT_CA_CERT and $CBIR_QDRANT_RETRIES (read once,
        by `cbir.app.settings.Settings.from_env`)."""
        return cls(env.get("CBIR_QDRANT_API_KEY") or None, _env_int(env, "CBIR_QDRANT_TIMEOUT", None),
                   env.get("CBIR_QDRANT_CA_CERT") or None, int(_env_int(env, "CBIR_QDRANT_RETRIES", 3) or 0))


def _env_int(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    value = env.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise IndexError_(f"${name}={value!r}: not a whole number") from None
