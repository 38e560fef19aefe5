"""Commands write their own results into a Markdown document (docs/results.md): each owns one section
between ``<!-- cbir:NAME -->`` and ``<!-- /cbir:NAME -->``, replaced whole on every run, so no figure in the
document is typed by hand."""

from __future__ import annotations

import os
import re
from pathlib import Path

from cbir.errors import CbirError

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


def slug(text: str) -> str:
    """`text` lower-cased, every character but letters and digits a "-": a section's or a folder's name."""
    return "".join(c if c.isalnum() else "-" for c in text.lower())


def markers(name: str) -> tuple[str, str]:
    return f"<!-- cbir:{name} -->", f"<!-- /cbir:{name} -->"


def update_section(doc: Path, name: str, markdown: str) -> bool:
    """Replace section `name` of `doc` with `markdown` (appended at the end when the document has no such
    section yet; the document is created if missing). Written atomically. Returns whether it was replaced."""
    if not _NAME.match(name):
        raise CbirError(f"bad section name {name!r}")
    start, end = markers(name)
    text = doc.read_text() if doc.is_file() else ""
    block = f"{start}\n{markdown.strip()}\n{end}"
    found = start in text and end in text and text.index(start) < text.index(end)
    if found:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_name(f".{doc.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(doc)
    return found


def read_section(doc: Path, name: str) -> str | None:
    """The current text of section `name` (None when the document has none)."""
    start, end = markers(name)
    text = doc.read_text() if doc.is_file() else ""
    if start not in text or end not in text:
        return None
    return text.split(start, 1)[1].split(end, 1)[0].strip()
