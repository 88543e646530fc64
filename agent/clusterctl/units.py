"""Sizes as operators write them ("512M", "2G", "1.5G") and as people read them.

A parsed size is always a whole number of bytes from 0 to ``MAX_SIZE_BYTES`` (1 PiB):
no size clusterctl handles is larger, and a bound keeps absurd input from overflowing.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone

KIB = 1024
MIB = 1024**2
GIB = 1024**3
TIB = 1024**4
PIB = 1024**5
MAX_SIZE_BYTES = PIB

_MULTIPLIERS = {"": 1, "K": KIB, "M": MIB, "G": GIB, "T": TIB}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in a size string. Binary units: 1K = 1024 bytes, 1G = 1024**3.

    Accepts "512M", "2G", "1.5G", "2GiB", "2gb", "4096" (bytes), up to 1024T.
    Raises ValueError with a readable reason otherwise.
    """
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f'expected a size like "512M", "2G" or "1.5G", got {quoted(text)}')
    number, unit = match.groups()
    size = float(number) * _MULTIPLIERS[unit.upper()]
    if not math.isfinite(size) or size > MAX_SIZE_BYTES:
        raise ValueError(f"a size must be at most {format_size(MAX_SIZE_BYTES)} (1 PiB), "
                         f"got {quoted(text)}")
    if not size.is_integer() and unit == "":
        raise ValueError(f"a size in bytes must be a whole number, got {quoted(text)}")
    return int(size)


def quoted(text: str) -> str:
    """``text`` in double quotes on one line (control characters escaped), cut when long."""
    shown = json.dumps(text, ensure_ascii=False)
    return shown if len(shown) <= 120 else f"{shown[:120]}..."


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


def iso_utc(ts: float) -> str:
    """A Unix time as ISO-8601 UTC to the second: ``2026-11-23T21:00:00Z``."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
