"""The HTTP API of `cbir serve` (FastAPI; OpenAPI at /docs and /openapi.json).

    GET  /                    the viewer (plain HTML and JavaScript, no build step)
    GET  /health              the collection, its size, the model and when they were loaded
    POST /query               multipart: `file` (DICOM, PNG or JPEG) + k, filter (repeatable key=value),
                              prefilter, hamming_radius, region ("x,y,w,h" in the image's pixels: search with
                              that crop) → the `cbir query --json` result, plus `timing_ms`, each neighbour's
                              `thumbnail` and `image` URLs, and `query.preview` (a PNG data URL)
    GET  /thumbnail/{id}      an archived case, downscaled (`size`, default 256), its boxes drawn, as a PNG
                              without any header data: from its image file where this machine has it (the
                              team that ingested), else from the thumbnail stored with the point (`cbir ingest
                              --thumbnails`; upscaled when `size` is larger than its 192 px)

The model and an in-memory copy of the collection (`cbir.search.warm.WarmSearcher`) are loaded once at start;
a query costs decoding, one forward pass and an in-memory search. The collection is reloaded when its alias
moves, its point count changes or its record changes (a new calibration; checked at most every
`REFRESH_SECONDS`, by one request at a time; searches wait for a reload). A collection rebuilt with another
model stops every answer with 409 (and /health with 503, `status: "stale"`) naming both models, until it matches
the served model again. Errors are 4xx with a one-line `detail`, never a 500 for bad input.

Who may ask, and how much (`cbir.serve.access`): a Host allow-list (this machine's names on a loopback
address), an optional bearer token (required on any other address), and the upload limit enforced while the
body streams in. Uploads are written to a private temporary folder under a fixed name ("upload" and its
extension), never under the name the client gave.

Concurrent queries (FastAPI runs each in a thread of its pool) overlap everywhere but in the in-memory search,
which takes turns (about 1 ms; `WarmSearcher`). Each forward pass gets its share of the cores as PyTorch
intra-op threads (`cbir.threads.CoreShare`): all of them for a lone request, one each for two requests on two
cores, so that the process does not run more compute threads than cores. Requests are not batched: a batch of
two changes resnet18's embeddings by up to 2e-8 (no longer bit-identical to `cbir query`'s for the same file)
and was no faster than two one-thread forwards side by side; the thread count leaves them bit-identical
(docs/performance.md, "`cbir serve` under two clients").
"""

from __future__ import annotations

import base64
import contextlib
import re
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response

from cbir.errors import BadInputError, CbirError, IndexError_, printable
from cbir.io import XrayImage
from cbir.report.montage import windowed_png
from cbir.search import parse_filters
from cbir.search.warm import WarmSearcher
from cbir.serve.access import FORM_OVERHEAD, Access, Guard
from cbir.threads import CoreShare, torch_threads

MAX_UPLOAD_BYTES = 64 * 2**20
REFRESH_SECONDS = 5.0
PREVIEW_SIZE = 512
MIN_REGION = 16
PAGE = Path(__file__).with_name("page.html")


def create_app(searcher: WarmSearcher, max_upload_bytes: int = MAX_UPLOAD_BYTES, cores: int | None = None,
               access: Access | None = None) -> FastAPI:
    """The app over a warm searcher; `cores` (default: PyTorch's thread count) are shared among the forward passes
    of the requests in flight; `access`: who may ask (`cbir.serve.access`; default: anyone who reaches it)."""
    import torch

    app = FastAPI(title="cbir", summary="Similar chest X-rays with their confirmed diagnoses",
                  version="1")
    app.add_middleware(Guard, access=access or Access(), max_body=max_upload_bytes + FORM_OVERHEAD)
    share = CoreShare(cores or torch.get_num_threads())
    refreshing = threading.Lock()
    state = {"checked": time.monotonic()}

    def maybe_refresh() -> None:
        """At most every REFRESH_SECONDS, by one request; the others meanwhile answer from the current copy. A
        collection rebuilt with another model stops every answer (409) until it matches the model again."""
        if time.monotonic() - state["checked"] >= REFRESH_SECONDS and refreshing.acquire(blocking=False):
            try:
                state["checked"] = time.monotonic()
                searcher.refresh()
            finally:
                refreshing.release()
        if searcher.stale:
            raise HTTPException(409, printable(f"{searcher.stale} (restart cbir serve with the collection's model)"))

    thumbnails: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE.read_text()

    @app.get("/thumbnail/{point_id}", responses={200: {"content": {"image/png": {}}}})
    def thumbnail(point_id: str, size: Annotated[int, Query(ge=32, le=1024)] = 256) -> Response:
        maybe_refresh()
        key = (point_id, size)
        png = thumbnails.get(key)   # read once: another request's thread may evict it meanwhile
        if png is None:
            try:
                picture = searcher.picture(point_id)
            except IndexError_ as exc:
                raise HTTPException(503, printable(str(exc))) from None
            if picture is None:
                raise HTTPException(404, f"no archived image or stored thumbnail for point {point_id!r}")
            png = thumbnails[key] = windowed_png(picture.pixels, size, picture.boxes)
            if len(thumbnails) > 1024:
                thumbnails.popitem(last=False)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/health")
    def health() -> JSONResponse:
        """200 while the server answers; 503 (`status`: "stale", `detail`: why) when the collection no longer
        matches the served model."""
        with contextlib.suppress(HTTPException):   # stale: said in the body
            maybe_refresh()
        body = {"status": "stale" if searcher.stale else "ok", "collection": searcher.collection,
                "points": len(searcher.memory), "model_fingerprint": searcher.loaded.fingerprint,
                "backbone": searcher.loaded.config.backbone, "loaded_at": searcher.loaded_at,
                **({"detail": printable(searcher.stale)} if searcher.stale else {})}
        return JSONResponse(body, status_code=503 if searcher.stale else 200)

    @app.post("/query")
    def query(file: Annotated[UploadFile, File(description="DICOM, PNG or JPEG")],
              k: Annotated[int, Form(ge=1, le=200)] = 10,
              filter: Annotated[list[str] | None, Form(description="key=value, repeatable")] = None,  # noqa: A002
              prefilter: Annotated[int | None, Form(ge=1)] = None,
              hamming_radius: Annotated[int | None, Form(ge=0)] = None,
              region: Annotated[str | None, Form(description="x,y,w,h in the image's pixels")] = None
              ) -> dict[str, Any]:
        with share.request():
            return answer_query(file, k, filter, prefilter, hamming_radius, region)

    def answer_query(file: UploadFile, k: int, filter: list[str] | None, prefilter: int | None,  # noqa: A002
                     hamming_radius: int | None, region: str | None) -> dict[str, Any]:
        started = time.perf_counter()
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload larger than {max_upload_bytes // 2**20} MiB")
        if not data:
            raise HTTPException(400, f"{file.filename or 'upload'}: empty file (0 bytes)")
        name = printable(Path(file.filename or "upload").name)[:200] or "upload"
        maybe_refresh()
        try:
            flt = parse_filters(filter, searcher.pseudonymize)
            with tempfile.TemporaryDirectory(prefix="cbir-upload-") as tmp:
                path = Path(tmp) / upload_name(name)
                path.write_bytes(data)
                image = searcher.read(path)
            preview = windowed_png(image.pixels, PREVIEW_SIZE)
            shape = list(image.shape)
            box = parse_region(region) if region else None
            if box:
                image = crop(image, box)
            with torch_threads(share.share()):
                result = searcher.query_image(image, name, k, flt or None, prefilter, hamming_radius)
        except BadInputError as exc:
            raise HTTPException(400, printable(f"{name}: {exc.reason}")) from None
        except CbirError as exc:
            raise HTTPException(422, printable(str(exc))) from None
        body = result.to_json()
        body["query"]["preview"] = "data:image/png;base64," + base64.b64encode(preview).decode()
        body["query"]["shape"] = shape   # of the whole uploaded image, which `region` is a part of
        body["query"]["region"] = list(box) if box else None
        for neighbor in body["neighbors"]:
            neighbor["thumbnail"] = f"/thumbnail/{neighbor['id']}"
            neighbor["image"] = f"/thumbnail/{neighbor['id']}?size=1024"
        body["timing_ms"] = round(1000 * (time.perf_counter() - started), 1)
        return body

    return app


def upload_name(name: str) -> str:
    """The temporary file's name for an upload called `name`: "upload" with the upload's extension when it is a
    plain one (the reader tells PNG and JPEG by it), never a path ("..", "/", NUL and the like)."""
    suffix = Path(name).suffix.lower()
    return "upload" + (suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else "")


def parse_region(region: str) -> tuple[int, int, int, int]:
    """"x,y,w,h" in pixels, integers or not (a browser sends fractions), rounded; CbirError when malformed."""
    try:
        x, y, w, h = (int(round(float(v))) for v in region.split(","))
    except (ValueError, OverflowError):
        raise CbirError(f"region {region[:80]!r}: give x,y,w,h in pixels, four finite numbers") from None
    return x, y, w, h


def crop(image: XrayImage, box: tuple[int, int, int, int]) -> XrayImage:
    """The part of `image` inside the (x, y, w, h) box in original pixels; CbirError for a too small one."""
    x, y, w, h = box
    region = ",".join(map(str, box))
    height, width = image.shape
    x0, y0, x1, y1 = max(0, x), max(0, y), min(width, x + w), min(height, y + h)
    if x1 - x0 < MIN_REGION or y1 - y0 < MIN_REGION:
        raise CbirError(f"region {region!r}: at least {MIN_REGION}×{MIN_REGION} pixels inside the "
                        f"{width}×{height} image")
    if image.full_shape is None:
        return XrayImage(image.pixels[y0:y1, x0:x1], image.meta, image.instance_key, image.kind, image.colour)
    rows, cols = image.pixels.shape   # decoded at reduced resolution: the box in its pixels, rounded outwards
    r0, c0, r1, c1 = y0 * rows // height, x0 * cols // width, -(-y1 * rows // height), -(-x1 * cols // width)
    return XrayImage(image.pixels[r0:r1, c0:c1], image.meta, image.instance_key, image.kind, image.colour,
                     (y1 - y0, x1 - x0))
