"""Structured (JSON) logs with ids and timings. Never image bytes or full media URLs."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}
#: a URL's path, query and fragment, after its scheme and host
_URL_REST = re.compile(r"(?i)(\b[a-z][a-z0-9+.\-]*://[^/\s?#'\"<>]+)[^\s'\"<>)]*")


def without_url_paths(text: str) -> str:
    """``text`` with every URL cut back to its scheme and host: a library's own log line (urllib3
    warns "Failed to parse headers (url=...)" with the whole media URL) must not carry a
    capability link into the log."""
    return _URL_REST.sub(r"\1/…", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "t": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": without_url_paths(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                value = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
                entry[key] = without_url_paths(value) if isinstance(value, str) else value
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = record.exc_info[0].__name__
        return json.dumps(entry)


def setup(level: int = logging.INFO) -> None:
    """JSON lines on stderr for the whole process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def host_only(url: str) -> str:
    """A URL reduced to its host, for logs (full media URLs can be capability links)."""
    from urllib.parse import urlparse

    return urlparse(url).netloc or "?"


class Timer:
    """Seconds since creation, rounded, for log fields."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.start, 3)
