"""What the local server's handlers share, apart from HTTP: the loaded anonymiser, the gate,
the page's files, and the turning of requests' fields and the image core's errors into answers."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from .. import emoji  # importing the package switches ONNX Runtime telemetry off first
from ..cover import STYLES, CoverStyle
from ..errors import (
    AnimatedImage,
    AnonymiserError,
    BadRegions,
    CorruptImage,
    EmptyImage,
    ImageTooLarge,
    ImageTooNarrow,
    OutputTooLarge,
    UnsupportedImage,
    WeightsError,
)
from ..limits import Limits
from ..pipeline import Anonymiser, Result, Settings, cover_given
from . import openapi
from .gate import BodyBudget, Gate
from .hosts import HostPolicy

#: bytes allowed on top of the image byte budget for the form's boundaries, headers and fields
FORM_ALLOWANCE = 1024 * 1024
#: the most regions a reviewed image may carry (a dense crowd has a few thousand)
MAX_REGIONS = 10_000
#: what a busy server tells clients to wait, in seconds
RETRY_AFTER_S = 3
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
#: HTTP status for each typed error of the image core (the most specific class wins)
STATUS_FOR_ERROR: dict[type[AnonymiserError], int] = {
    UnsupportedImage: 415,
    ImageTooLarge: 413,
    BadRegions: 400,
    CorruptImage: 422,
    AnimatedImage: 422,
    ImageTooNarrow: 422,
    EmptyImage: 422,
    OutputTooLarge: 422,
    WeightsError: 500,
}


class HttpError(Exception):
    """An error answer: HTTP status, stable code and a sentence, as ``{"error", "message"}``.

    ``close`` is set when the request body was (or may have been) left unread: the connection
    cannot be reused and is closed after the answer.
    """

    def __init__(self, status: int, code: str, message: str, *, close: bool = False,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.close = close
        self.headers = headers or {}


def http_error_for(exc: AnonymiserError) -> HttpError:
    """The one place where typed errors of the image core become HTTP answers."""
    for cls in type(exc).__mro__:
        if cls in STATUS_FOR_ERROR:
            return HttpError(STATUS_FOR_ERROR[cls], exc.code, str(exc))
    return HttpError(422, exc.code, str(exc))


def busy() -> HttpError:
    """503 with Retry-After; the body was not read, so the connection is closed."""
    return HttpError(
        503, "busy", "The anonymiser is busy with other photos; please try again in a few seconds.",
        close=True, headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def _load_static() -> dict[str, tuple[bytes, str]]:
    """Every file of ``static/`` by URL path, read once (they ship inside the package)."""
    files: dict[str, tuple[bytes, str]] = {}
    folder = resources.files(__package__) / "static"
    for entry in folder.iterdir():
        suffix = Path(entry.name).suffix
        if entry.is_file() and suffix in CONTENT_TYPES:
            files["/static/" + entry.name] = (entry.read_bytes(), CONTENT_TYPES[suffix])
    files["/"] = files["/static/index.html"]
    return files


def parse_regions(text: str) -> list[tuple[int, int, int, int]]:
    """A JSON array of ``[x1, y1, x2, y2]`` (or ``{"box": [...]}``) as integer boxes; 400 if bad."""
    def bad(why: str) -> HttpError:
        return HttpError(400, "bad_regions", f"'regions' must be a JSON array of [x1, y1, x2, y2] boxes: {why}.")

    try:
        value = json.loads(text)
    except ValueError:
        raise bad("it is not valid JSON") from None
    except RecursionError:  # "[[[[...]]]]" nested deeper than the parser goes
        raise bad("it is nested too deeply") from None
    if not isinstance(value, list):
        raise bad("it is not an array")
    if len(value) > MAX_REGIONS:
        raise bad(f"more than {MAX_REGIONS:,} boxes")
    boxes: list[tuple[int, int, int, int]] = []
    for item in value:
        if isinstance(item, dict):
            item = item.get("box")
        if not isinstance(item, list) or len(item) != 4:
            raise bad("each box has four numbers")
        # abs() first: a JSON integer past a float's range makes math.isfinite raise OverflowError
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= 1e6 and math.isfinite(v) for v in item):
            raise bad("each coordinate is a finite number")
        # outwards, as every region is rounded: a pixel partly inside the box is covered
        x1, y1, x2, y2 = math.floor(item[0]), math.floor(item[1]), math.ceil(item[2]), math.ceil(item[3])
        if x2 <= x1 or y2 <= y1:
            raise bad("each box has x2 > x1 and y2 > y1")
        boxes.append((x1, y1, x2, y2))
    return boxes


def result_json(result: Result) -> dict[str, Any]:
    """The JSON form of a result: the report, the image as base64 and the covered regions."""
    report = result.report
    return {
        "image": base64.b64encode(result.data).decode("ascii"),
        "mime": result.mime,
        "heads_covered": report.heads_covered,
        "width": report.output_size[0],
        "height": report.output_size[1],
        "regions": [{"box": list(r.box), "sources": list(r.sources)} for r in report.regions],
        "report": report.to_dict(),
    }


#: locators that find heads seen from behind or from above; CenterFace finds faces only
HEAD_LOCATORS = frozenset({"heads", "lsccnn"})


def coverage_warning(locators: Sequence[str]) -> str | None:
    """What the page and the console say when no locator finds heads that show no face."""
    if HEAD_LOCATORS & set(locators):
        return None
    return (
        "Only faces are looked for: the head model is not installed, so heads seen from behind, "
        "from above or far away are often not covered (on the team's crowd photos about one head "
        "in twenty was missed, against one in seventy-five with the head model). Check every photo and cover "
        "what was missed with Review covers, or install the head model (weights/README.md) and "
        "restart."
    )


class WebApp:
    """What the handlers share: one loaded ``Anonymiser``, the gate, the page's files."""

    def __init__(self, anonymiser: Anonymiser, gate: Gate, version: str = "0.1.0") -> None:
        self.anonymiser = anonymiser
        self.settings: Settings = anonymiser.settings
        self.limits: Limits = anonymiser.settings.limits
        self.gate = gate
        #: every place in the gate's queue may hold a whole body, and no more is held than that
        self.bodies = BodyBudget(gate.capacity * self.max_request_bytes)
        self.static = _load_static()
        self.openapi = json.dumps(openapi.document(self.limits, version), indent=2).encode()
        #: the names requests must be addressed to (None: any), set by make_server once bound
        self.hosts: HostPolicy | None = None

    @property
    def max_request_bytes(self) -> int:
        return self.limits.max_input_bytes + FORM_ALLOWANCE

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "locators": [l.name for l in self.anonymiser.locators],
            "style": self.settings.style.style,
            "skin_tone": self.settings.style.skin_tone,
            "styles": list(STYLES),
            "skin_tones": list(emoji.SKIN_TONES),
            "max_input_bytes": self.limits.max_input_bytes,
            "max_request_bytes": self.max_request_bytes,
            "max_concurrent": self.gate.max_concurrent,
            "warning": coverage_warning([l.name for l in self.anonymiser.locators]),
        }

    def style_for(self, style: str | None, skin_tone: str | None) -> CoverStyle:
        """The server's default style with the request's choices; 400 for unknown values."""
        base = self.settings.style
        if style is not None and style not in STYLES:
            raise HttpError(400, "bad_parameter", f"Unknown style {style!r}; choose one of {', '.join(STYLES)}.")
        if skin_tone is not None and skin_tone not in emoji.SKIN_TONES:
            raise HttpError(400, "bad_parameter", f"Unknown skin_tone {skin_tone!r}; choose one of {', '.join(emoji.SKIN_TONES)}.")
        return dataclasses.replace(base, style=style or base.style, skin_tone=skin_tone or base.skin_tone)

    def anonymise(self, data: bytes, style: CoverStyle) -> Result:
        """Anonymise with the shared, already loaded locators and this request's style."""
        anonymiser = self.anonymiser
        if style != self.settings.style:
            # A shallow copy shares the loaded models (ONNX Runtime sessions are safe to run
            # from several threads) and only swaps the frozen settings for this one request.
            anonymiser = copy.copy(self.anonymiser)
            anonymiser.settings = dataclasses.replace(self.settings, style=style)
        return anonymiser.anonymise(data)

    def cover(self, data: bytes, regions: list[tuple[int, int, int, int]], style: CoverStyle) -> Result:
        return cover_given(data, regions, dataclasses.replace(self.settings, style=style))
