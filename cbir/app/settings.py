"""The settings every use-case takes: one typed, frozen object, read from the environment once.

Nothing below the use-cases reads an environment variable for these, and nothing writes one: a command's
options become a `Settings` (`Settings.from_env(...).with_options(...)`), which the use-case passes down
explicitly (the reader policy reaches DataLoader workers inside their dataset, not through `os.environ`).

| setting | variable | default |
|---|---|---|
| `index` | `$CBIR_INDEX` | `./cbir-index` (a Qdrant Edge folder) |
| `collection` | `$CBIR_COLLECTION` | `cbir` |
| `reader.max_pixels` | `$CBIR_MAX_PIXELS` | 80,000,000 |
| `reader.any_modality` | `$CBIR_ANY_MODALITY` | off |
| `server.api_key` | `$CBIR_QDRANT_API_KEY` | none |
| `server.timeout`, `.ca_cert`, `.retries` | `$CBIR_QDRANT_TIMEOUT`, `…_CA_CERT`, `…_RETRIES` | client's, none, 3 |
| `state_dir` | `$CBIR_STATE_DIR`, else `$XDG_STATE_HOME/cbir` | `~/.local/state/cbir` |
| `model_dirs` | `$CBIR_MODEL_DIRS` (`os.pathsep`-separated) | none |
| `edge_flush` | `$CBIR_EDGE_FLUSH_POINTS`, `$CBIR_EDGE_FLUSH_SECONDS` | 4096 points, 5 s |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from cbir.errors import CbirError
from cbir.io.policy import DEFAULT_READER, ReaderPolicy
from cbir.store.edge_files import FlushPolicy
from cbir.store.files import default_state_dir
from cbir.store.location import DEFAULT_LOCATION
from cbir.store.server_settings import ServerSettings

DEFAULT_COLLECTION = "cbir"


@dataclass(frozen=True)
class Settings:
    """Where the index is, what the readers accept, how to reach a server and what stays on this machine."""

    index: str = DEFAULT_LOCATION
    collection: str = DEFAULT_COLLECTION
    reader: ReaderPolicy = DEFAULT_READER
    server: ServerSettings = field(default_factory=ServerSettings)
    state_dir: Path = field(default_factory=lambda: default_state_dir({}))
    model_dirs: tuple[Path, ...] = ()
    edge_flush: FlushPolicy = field(default_factory=FlushPolicy)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings the environment gives (`os.environ` when `env` is None), read once, here."""
        env = os.environ if env is None else env
        return cls(index=env.get("CBIR_INDEX") or DEFAULT_LOCATION,
                   collection=env.get("CBIR_COLLECTION") or DEFAULT_COLLECTION,
                   reader=ReaderPolicy.from_env(env),
                   server=ServerSettings.from_env(env),
                   state_dir=default_state_dir(env),
                   model_dirs=tuple(Path(p).expanduser() for p in env.get("CBIR_MODEL_DIRS", "").split(os.pathsep)
                                    if p),
                   edge_flush=FlushPolicy.from_env(env))

    def with_options(self, *, index: str | None = None, max_pixels: int | None = None, any_modality: bool = False,
                     api_key: str | None = None, timeout: int | None = None, ca_cert: str | None = None
                     ) -> Settings:
        """These settings with a command's options on top (None / False: keep the setting)."""
        server = replace(self.server, api_key=api_key or self.server.api_key,
                         timeout=self.server.timeout if timeout is None else timeout,
                         ca_cert=ca_cert or self.server.ca_cert)
        return replace(self, index=index or self.index, reader=self.reader.overridden(max_pixels, any_modality),
                       server=server)

    def allows_model_dir(self, path: Path) -> bool:
        """Whether `path` lies under one of `model_dirs` (a server record's model path needs it, or --model)."""
        target = path.expanduser().resolve()
        return any(target.is_relative_to(folder.resolve()) for folder in self.model_dirs)


def read_api_key_file(path: Path) -> str | None:
    """The Qdrant API key or JWT held in the file `path` (never taken from argv)."""
    try:
        return path.read_text().strip() or None
    except OSError as exc:
        raise CbirError(f"{path}: cannot read the API key file ({exc.strerror})") from None
