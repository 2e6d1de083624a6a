"""Sizes as pipeline files and the CLI write them: "6GiB", "512MB", "2G", or plain bytes."""

from __future__ import annotations

import re

from pydantic import ByteSize, TypeAdapter, ValidationError

__all__ = ["parse_size"]

_BYTES: TypeAdapter[ByteSize] = TypeAdapter(ByteSize)
# pydantic's ByteSize reads "5 GiB extra" as 5 GiB and knows bit units; a size here is one number and a byte unit.
_SHAPE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*([a-z]*)")
# A bare K, M, G, T, P or E is binary, as in `docker --memory 2g`; pydantic would read it as decimal.
_BARE_BINARY = {letter: letter + "ib" for letter in "kmgtpe"}
_UNITS_HINT = "units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB; a bare K, M, G or T is binary"


def parse_size(value: str | int) -> int:
    """Return a byte count from an int or a size like "6GiB", "512MB" or "2G" (bare K/M/G/T are binary)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"invalid size {value}: must be more than 0 bytes")
        return value
    if not isinstance(value, str):  # a wrong type is a bad value here, as pydantic expects
        raise ValueError(f"invalid size {value!r}: expected bytes or a size like '6GiB'")
    match = _SHAPE.fullmatch(value.strip().lower())
    try:
        if match is None or match.group(2).endswith("bit"):
            raise ValueError(value)
        number, unit = match.groups()
        size = int(_BYTES.validate_python(number + _BARE_BINARY.get(unit, unit)))
    except (ValueError, ValidationError):
        raise ValueError(
            f"invalid size {value!r}: use bytes or a number with a unit like '512MB', '6GiB' ({_UNITS_HINT})"
        ) from None
    if size <= 0:
        raise ValueError(f"invalid size {value!r}: must be more than 0 bytes")
    return size
