"""Size budgets for input and output, with the defaults a Mastodon server accepts."""

from __future__ import annotations

import os
from dataclasses import dataclass


_FIELDS = ("max_input_bytes", "max_input_pixels", "max_output_bytes", "max_output_pixels", "max_aspect_ratio")


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
        problems = _range_problems({name: getattr(self, name) for name in _FIELDS})
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Limits":
        """Read ``ANON_MAX_INPUT_BYTES`` etc.; unset variables keep their defaults.
        ``ValueError`` names every bad variable at once."""
        env = os.environ if environ is None else environ
        values: dict[str, int] = {}
        problems = []
        for name in _FIELDS:
            variable = "ANON_" + name.upper()
            raw = env.get(variable, "").strip()
            if not raw:
                continue
            try:
                values[name] = int(raw)
            except ValueError:
                problems.append(f"{variable} must be an integer, got {raw!r}")
        problems += _range_problems(values)
        if problems:
            raise ValueError("; ".join(problems))
        return cls(**values)


def _range_problems(values: dict[str, int]) -> list[str]:
    """Each budget that is not positive, named by its variable."""
    return [f"ANON_{name.upper()} must be positive, got {value}" for name, value in values.items() if value <= 0]
