"""What the readers accept, as one value passed to every reader (no pydicom here: `cbir.app.settings` holds one)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: Images with more pixels than this (per frame) are refused before decoding (`ReaderPolicy.max_pixels`).
MAX_PIXELS = 80_000_000
ANY_MODALITY_ENV = "CBIR_ANY_MODALITY"
MAX_PIXELS_ENV = "CBIR_MAX_PIXELS"


@dataclass(frozen=True)
class ReaderPolicy:
    """What the readers accept: images up to `max_pixels` per frame (`--max-pixels`), and only radiographs of
    the chest unless `any_modality` (`--any-modality`). Passed explicitly to every reader, so it reaches
    DataLoader workers with the dataset and never travels through the environment."""

    max_pixels: int = MAX_PIXELS
    any_modality: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ReaderPolicy:
        """$CBIR_MAX_PIXELS and $CBIR_ANY_MODALITY (read once, by `cbir.app.settings.Settings.from_env`)."""
        value = env.get(MAX_PIXELS_ENV, "").strip()
        return cls(int(value) if value.isdigit() and int(value) > 0 else MAX_PIXELS,
                   env.get(ANY_MODALITY_ENV, "").strip().lower() in ("1", "true", "yes", "on"))

    def overridden(self, max_pixels: int | None = None, any_modality: bool = False) -> ReaderPolicy:
        """This policy with a command's options applied (None / False: keep this policy's value)."""
        return ReaderPolicy(max_pixels or self.max_pixels, any_modality or self.any_modality)


#: What a reader accepts when nobody says otherwise.
DEFAULT_READER = ReaderPolicy()
