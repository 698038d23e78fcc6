"""What the anonymiser did to one image, for the CLI's JSON report, the bot's alt text and logs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class CoveredRegion:
    """One covered rectangle ``[x1, y1, x2, y2)`` in output pixels, and who asked for it."""

    box: tuple[int, int, int, int]
    sources: list[str]


@dataclass
class Report:
    """Per-image report. Contains no pixels and nothing that identifies the input file."""

    input_format: str
    input_size: tuple[int, int]
    input_bytes: int
    orientation: int
    had_alpha: bool
    output_format: str = ""
    output_size: tuple[int, int] = (0, 0)
    output_bytes: int = 0
    locators: list[str] = field(default_factory=list)
    #: raw detections per locator, before padding and merging
    detections: dict[str, int] = field(default_factory=dict)
    #: covered regions per source: each locator, "safeguard" and "residual"
    regions_by_source: dict[str, int] = field(default_factory=dict)
    #: number of heads covered (merged regions from the locators and the residual pass)
    heads_covered: int = 0
    covered_fraction: float = 0.0
    regions: list[CoveredRegion] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return asdict(self)
