"""The HTTP API of `cbir serve` (FastAPI; OpenAPI at /docs and /openapi.json).

    GET  /health   the collection, its size, the model and when they were loaded
    POST /query    multipart: `file` (DICOM, PNG or JPEG) + k, filter (repeatable key=value), prefilter,
                   hamming_radius → the `cbir query --json` result, plus `timing_ms`

The model and an in-memory copy of the collection (`cbir.search.warm.WarmSearcher`) are loaded once at start;
a query costs decoding, one forward pass and an in-memory search. The collection is reloaded when its alias
moves or its point count changes (checked at most every `REFRESH_SECONDS`). Errors are 4xx with a one-line
`detail`, never a 500 for bad input.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, HTTPException, UploadFile

from cbir.errors import BadInputError, CbirError, printable
from cbir.search import parse_filters
from cbir.search.warm import WarmSearcher

MAX_UPLOAD_BYTES = 64 * 2**20
REFRESH_SECONDS = 5.0


def create_app(searcher: WarmSearcher, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
    app = FastAPI(title="cbir", summary="Similar chest X-rays with their confirmed diagnoses",
                  version="1")
    lock = threading.Lock()   # one query at a time through the model and the in-memory copy
    state = {"checked": time.monotonic()}

    def maybe_refresh() -> None:
        if time.monotonic() - state["checked"] >= REFRESH_SECONDS:
            state["checked"] = time.monotonic()
            searcher.refresh()

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "collection": searcher.collection, "points": len(searcher.memory),
                "model_fingerprint": searcher.loaded.fingerprint, "backbone": searcher.loaded.config.backbone,
                "loaded_at": searcher.loaded_at}

    @app.post("/query")
    def query(file: Annotated[UploadFile, File(description="DICOM, PNG or JPEG")],
              k: Annotated[int, Form(ge=1, le=200)] = 10,
              filter: Annotated[list[str] | None, Form(description="key=value, repeatable")] = None,  # noqa: A002
              prefilter: Annotated[int | None, Form(ge=1)] = None,
              hamming_radius: Annotated[int | None, Form(ge=0)] = None) -> dict[str, Any]:
        started = time.perf_counter()
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload larger than {max_upload_bytes // 2**20} MiB")
        if not data:
            raise HTTPException(400, f"{file.filename or 'upload'}: empty file (0 bytes)")
        name = Path(file.filename or "upload").name
        try:
            flt = parse_filters(filter)
            with tempfile.TemporaryDirectory(prefix="cbir-upload-") as tmp:
                path = Path(tmp) / (name or "upload")
                path.write_bytes(data)
                with lock:
                    maybe_refresh()
                    result = searcher.query(path, k, flt or None, prefilter, hamming_radius)
        except BadInputError as exc:
            raise HTTPException(400, printable(f"{name}: {exc.reason}")) from None
        except CbirError as exc:
            raise HTTPException(422, printable(str(exc))) from None
        body = result.to_json()
        body["query"]["path"] = name
        body["timing_ms"] = round(1000 * (time.perf_counter() - started), 1)
        return body

    return app
