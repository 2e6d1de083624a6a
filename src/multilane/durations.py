"""Durations as pipeline files write them: "5m", "30s", "1h30m", "250ms", or plain seconds."""

from __future__ import annotations

import math
import re

_UNITS: dict[str, float] = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}

_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|s|m|h|d)")
_NUMBER = re.compile(r"[+-]?(\d+(?:\.\d*)?|\.\d+)")


def parse_duration(value: str | float) -> float | None:
    """Return a duration in seconds, or None for a negative value (meaning forever).

    Raises ValueError for anything that is not a number or a run of number-unit pairs like "1h30m".
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        if math.isnan(value):
            raise ValueError("invalid duration nan: expected a number of seconds")
        if value < 0 or math.isinf(value):
            return None
        return float(value)
    if not isinstance(value, str):  # callers expect ValueError for any bad value
        raise ValueError(
            f"invalid duration {value!r}: expected a number of seconds or a string like '5m'"
        )
    text = value.strip().lower().replace(" ", "")
    if not text:
        raise ValueError("invalid duration '': expected a number of seconds or a string like '5m'")
    if _NUMBER.fullmatch(text):
        return parse_duration(float(text))
    negative = text[0] == "-"
    body = text[1:] if text[0] in "+-" else text
    pos = 0
    total = 0.0
    for match in _PART.finditer(body):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(body) or not body:
        raise ValueError(
            f"invalid duration {value!r}: use a number of seconds or number-unit pairs "
            "like '250ms', '30s', '5m', '1h30m' (units: ms, s, m, h, d)"
        )
    if negative:
        return None if total > 0 else 0.0
    return total


def format_duration(seconds: float | None) -> str:
    """Format seconds the way a pipeline file would write them; None reads "forever"."""
    if seconds is None or math.isinf(seconds) or seconds < 0:
        return "forever"
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{round(seconds * 1000, 3):g}ms"
    whole = int(seconds)
    frac = seconds - whole
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts: list[str] = []
    if days:
        parts.append(f"{days}d")
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if secs or frac > 1e-9:
        parts.append(f"{round(secs + frac, 3):g}s")
    return "".join(parts)
