"""Size budgets for input and output, with the defaults a Mastodon server accepts."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from .int_settings import IntSetting, range_problems, read_ints

_FIELDS = ("max_input_bytes", "max_input_pixels", "max_output_bytes", "max_output_pixels", "max_aspect_ratio")
#: every budget is a positive whole number, read from ``ANON_`` + its upper-case name
_SETTINGS = {name: IntSetting("ANON_" + name.upper(), 1) for name in _FIELDS}


@dataclass(frozen=True)
class Limits:
    """Byte and pixel budgets.

    Input budgets are checked before any pixel is decoded, so a decompression bomb or a huge
    upload is refused before it can exhaust memory. Output budgets default to what
    mastodon.social publishes in its instance API (16 MiB, 33,177,600 pixels).
    """

    max_input_bytes: int = 50 * 1024 * 1024
    max_input_pixels: int = 100_000_000
    max_output_bytes: int = 16 * 1024 * 1024
    max_output_pixels: int = 33_177_600
    #: longest side over shortest: a 1x100,000 strip is within the pixel budget, yet every
    #: locator pads or tiles it as if it were a photo
    max_aspect_ratio: int = 50

    def __post_init__(self) -> None:
        problems = range_problems(_SETTINGS, {name: getattr(self, name) for name in _FIELDS})
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Limits":
        """Read ``ANON_MAX_INPUT_BYTES`` etc.; unset variables keep their defaults.
        ``ValueError`` names every bad variable at once."""
        return cls(**read_ints(_SETTINGS, os.environ if environ is None else environ))
