"""What the labels of a collection mean: its target, its negative label and its vocabulary, decided once.

A `LabelSpace` is stored with each collection (`label_space` in its metadata) and every dataset that meets the
collection, on ingest and on evaluate, is reconciled with it (`LabelSpace.reconcile`):

* a label matches a name of the vocabulary ignoring case and separators ("PNEUMONIA" is "Pneumonia");
* in a binary space, a class named like normal ("NORMAL", "No Finding", "healthy"; `is_normal_name`) is the
  negative label, so a folder of NORMAL/PNEUMONIA images meets an RSNA collection without a map;
* RSNA's challenge calls the target "Lung Opacity" (Target = 1 in stage_2_train_labels.csv); cbir calls it
  "Pneumonia", and `RSNA_ALIASES` says so;
* anything else ("COVID" in a Pneumonia collection) is refused in one line that names both vocabularies, unless
  the user maps it (`--label-map COVID="No Pneumonia"`): it is never silently a positive or a negative.

The reconciled dataset carries the collection's names (`Records.relabelled`), so payloads, filters, the montage and
the vote all read one spelling.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cbir.errors import DatasetError

_NORMAL_NAME = re.compile(r"(^| )(normal|no finding|nofinding|negative|healthy)( |$)")
#: How RSNA's challenge names the classes that cbir calls "Pneumonia" and its negative.
RSNA_ALIASES = {"lung opacity": "Pneumonia"}


def is_normal_name(name: str) -> bool:
    """Whether a class name reads as normal / no finding / negative / healthy (any case or separator)."""
    return bool(_NORMAL_NAME.search(key(name)))


def key(name: str) -> str:
    """A label name compared ignoring case and separators: "No_Finding" and "no finding" are one label."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", str(name).lower()).split())


def negative_label(label_names: Sequence[str], target: str) -> str:
    """The name of "not the target": the other class of a two-class space, else "No <target>"."""
    others = [name for name in label_names if name != target]
    return others[0] if len(label_names) == 2 and others else f"No {target}"


def parse_label_map(items: Iterable[str] | None) -> dict[str, str]:
    """`--label-map FROM=TO` items → {FROM: TO}; a malformed item is a one-line error."""
    out: dict[str, str] = {}
    for item in items or []:
        source, sep, target = item.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise DatasetError(f"bad --label-map {item!r}: use FROM=TO, e.g. --label-map COVID='No Pneumonia'")
        out[source.strip()] = target.strip()
    return out


@dataclass(frozen=True)
class LabelSpace:
    """A target, its negative label and the vocabulary (the names payloads may carry, negative included)."""

    target: str
    negative: str
    vocabulary: tuple[str, ...]
    #: Extra spellings (compared by `key`) → a name of the vocabulary.
    aliases: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, label_names: Sequence[str], target: str, negative: str | None = None) -> LabelSpace:
        """The space of a model or dataset: its label names, target and negative label (RSNA's aliases when the
        target is Pneumonia)."""
        negative = negative or negative_label(label_names, target)
        vocabulary = tuple(dict.fromkeys([*label_names, negative]))
        aliases = {alias: name for alias, name in RSNA_ALIASES.items() if name in vocabulary}
        return cls(target, negative, vocabulary, aliases)

    @property
    def binary(self) -> bool:
        """A target and its negative only (RSNA, a two-class folder), as opposed to a multilabel vocabulary."""
        return set(self.vocabulary) <= {self.target, self.negative}

    def canonical(self, name: str) -> str | None:
        """The vocabulary's name for `name` (case and separators ignored; aliases; a normal-like name is the
        negative label of a binary space), or None."""
        wanted = key(name)
        for known in self.vocabulary:
            if key(known) == wanted:
                return known
        for alias, known in self.aliases.items():
            if key(alias) == wanted:
                return known
        if (self.binary or is_normal_name(self.negative)) and is_normal_name(name):
            return self.negative
        return None

    def reconcile(self, label_names: Sequence[str], where: str, label_map: dict[str, str] | None = None
                  ) -> dict[str, str]:
        """Each of a dataset's label names → this space's name for it (after `label_map`, whose keys match
        ignoring case); DatasetError, naming both vocabularies, when a label has none or none is the target."""
        wanted = {key(k): v for k, v in (label_map or {}).items()}
        mapping: dict[str, str] = {}
        unknown: list[str] = []
        for name in label_names:
            mapped = self.canonical(wanted.get(key(name), name))
            if mapped is None:
                unknown.append(name)
            else:
                mapping[name] = mapped
        theirs = ", ".join(label_names)
        ours = f"target {self.target}; vocabulary {', '.join(self.vocabulary)}"
        if unknown:
            example = f"{unknown[0]}={self.negative!r}"
            raise DatasetError(f"{where}: labels {', '.join(unknown)} are not in the collection's label space "
                               f"({ours}; the data has {theirs}); map them, e.g. --label-map {example}")
        if label_names and self.target not in mapping.values():
            raise DatasetError(f"{where}: none of its labels ({theirs}) is the collection's target {self.target!r} "
                               f"({ours}); map one to it with --label-map")
        return mapping

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "negative": self.negative, "vocabulary": list(self.vocabulary),
                "aliases": dict(self.aliases)}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], model_labels: Sequence[str] = ()) -> LabelSpace:
        """A collection's stored space; collections made before it was stored derive it from their target and
        negative label (and the model's label names)."""
        body = meta.get("label_space")
        if body:
            return cls(str(body["target"]), str(body["negative"]), tuple(body["vocabulary"]),
                       dict(body.get("aliases") or {}))
        target = str(meta.get("target") or (model_labels[0] if model_labels else ""))
        names = list(model_labels) if target in model_labels else [target]
        return cls.of(names, target, meta.get("negative_label"))
