"""Sizes as operators write them ("512M", "2G", "1.5G") and as people read them."""

from __future__ import annotations

import re

KIB = 1024
MIB = 1024**2
GIB = 1024**3
TIB = 1024**4

_MULTIPLIERS = {"": 1, "K": KIB, "M": MIB, "G": GIB, "T": TIB}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in a size string. Binary units: 1K = 1024 bytes, 1G = 1024**3.

    Accepts "512M", "2G", "1.5G", "2GiB", "2gb", "4096" (bytes).
    Raises ValueError with a readable reason otherwise.
    """
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f'expected a size like "512M", "2G" or "1.5G", got "{text}"')
    number, unit = match.groups()
    size = float(number) * _MULTIPLIERS[unit.upper()]
    if not size.is_integer() and unit == "":
        raise ValueError(f'a size in bytes must be a whole number, got "{text}"')
    return int(size)


def format_size(size_bytes: int | float) -> str:
    """Short human form: 1536 MiB -> "1.5G", 2 GiB -> "2G", 300 -> "300B"."""
    value = float(size_bytes)
    for unit, mult in (("T", TIB), ("G", GIB), ("M", MIB), ("K", KIB)):
        if abs(value) >= mult:
            scaled = value / mult
            text = f"{scaled:.1f}".rstrip("0").rstrip(".")
            return f"{text}{unit}"
    return f"{int(value)}B"


def percent(part: float, whole: float) -> float | None:
    """part / whole in percent, None when the whole is unknown or zero."""
    if whole <= 0:
        return None
    return 100.0 * part / whole
