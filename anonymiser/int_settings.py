"""Whole numbers read from text: settings from environment variables (every problem reported at
once), and numbers in headers and messages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


def is_decimal(text: str) -> bool:
    """Whether ``text`` is one or more ASCII digits. ``str.isdigit`` also accepts "²" or "٣" (a
    header decoded as Latin-1 can hold "²"), which ``int()`` then refuses or a platform takes
    for an id."""
    return text.isascii() and text.isdigit()


#: the largest number a header or message is read as (a size or a port never comes near it)
DECIMAL_CEILING = 10**18


def decimal_value(text: str, ceiling: int = DECIMAL_CEILING) -> int | None:
    """The number ``text`` spells in ASCII digits, at most ``ceiling``; None if it is not one.

    ``int()`` refuses more than 4,300 digits with a ValueError (Python's guard against
    quadratic conversion), which a client's ``Content-Length`` of 5,000 nines turned into a 500
    or a dropped connection: a longer number is read as ``ceiling``, which every limit refuses.
    """
    if not is_decimal(text):
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(ceiling)):
        return ceiling
    return min(int(digits), ceiling)


@dataclass(frozen=True)
class IntSetting:
    """A setting's variable and the values it allows (``high`` None: no upper bound)."""

    variable: str
    low: int
    high: int | None = None

    def problem(self, value: int) -> str | None:
        """Why ``value`` is refused, or None."""
        if value >= self.low and (self.high is None or value <= self.high):
            return None
        if self.high is not None:
            allowed = f"between {self.low} and {self.high}"
        else:
            allowed = "positive" if self.low == 1 else f"at least {self.low}"
        return f"{self.variable} must be {allowed}, got {value}"


def range_problems(settings: Mapping[str, IntSetting], values: Mapping[str, int | None]) -> list[str]:
    """Each value out of its range, named by its variable; None (left unset) passes."""
    found = (settings[key].problem(value) for key, value in values.items() if value is not None)
    return [problem for problem in found if problem]


def read_ints(settings: Mapping[str, IntSetting], environ: Mapping[str, str]) -> dict[str, int]:
    """The settings whose variables are set, by key. ``ValueError`` names every variable that
    is not a whole number or is out of range, at once."""
    values: dict[str, int] = {}
    problems = []
    for key, setting in settings.items():
        raw = environ.get(setting.variable, "").strip()
        if raw:
            try:
                values[key] = int(raw)
            except ValueError:
                problems.append(f"{setting.variable} must be an integer, got {raw!r}")
    problems += range_problems(settings, values)
    if problems:
        raise ValueError("; ".join(problems))
    return values
