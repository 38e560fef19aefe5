"""The values every index layer passes around: payload filters, points, hits and collection schemas."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Payload `target` of an image whose label is unknown (plain layout); its `label` is None and `labels` [].
#: Such points are found and shown, but never vote and never enter an evaluation.
UNKNOWN_TARGET = -1
SCHEMA_VERSION = 2

FilterValue = str | int | bool | Sequence[str]


def has_label(payload: dict[str, Any]) -> bool:
    """Whether a payload's label is known (see `UNKNOWN_TARGET`)."""
    return payload.get("target") != UNKNOWN_TARGET


@dataclass(frozen=True)
class Filter:
    """Payload filter: every `must` condition holds and no `must_not` condition holds.

    A value matches a field exactly; a list matches any of its items. For list-valued payload fields
    (such as `labels`) a condition holds when any element matches.
    """

    must: dict[str, FilterValue] = field(default_factory=dict)
    must_not: dict[str, FilterValue] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.must or self.must_not)


@dataclass(frozen=True)
class Schema:
    """A collection's vector sizes and schema version."""

    dim: int
    bits: int
    version: int = SCHEMA_VERSION


@dataclass
class Point:
    id: str                      # UUID string
    embedding: np.ndarray        # float32 (dim,), L2-normalised
    code: np.ndarray             # uint8 (bits,) of 0/1
    payload: dict[str, Any]


@dataclass
class Hit:
    id: str
    score: float                 # cosine similarity to the query embedding
    payload: dict[str, Any]
    hamming: int | None = None   # Hamming distance of the codes, when the code was compared
