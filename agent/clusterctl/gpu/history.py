"""A ring of recent samples per GPU, and the temperature trend over a window (pure)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

Direction = Literal["rising", "falling", "stable"]
SLOPE_C_PER_MIN = 0.5  # a trend steeper than this is rising or falling


@dataclass(frozen=True)
class Point:
    at: float  # time.time()
    temperature_c: int | None
    utilization_percent: int | None
    memory_used_percent: float | None


@dataclass(frozen=True)
class Trend:
    current_c: int
    average_c: float
    min_c: int
    max_c: int
    trend: Direction
    slope_c_per_min: float
    samples: int
    minutes: float


class History:
    def __init__(self, size: int) -> None:
        self._points: deque[Point] = deque(maxlen=size)

    def add(self, point: Point) -> None:
        self._points.append(point)

    def __len__(self) -> int:
        return len(self._points)

    def points(self) -> tuple[Point, ...]:
        return tuple(self._points)

    def trend(self, minutes: float, now: float) -> Trend | None:
        """Temperatures of the last ``minutes``; None when there are none."""
        window = [p for p in self.points()  # a copy: the GPU thread appends meanwhile
                  if p.at >= now - minutes * 60 and p.temperature_c is not None]
        if not window:
            return None
        temps = [p.temperature_c for p in window if p.temperature_c is not None]
        slope = _slope([(p.at, float(p.temperature_c)) for p in window
                        if p.temperature_c is not None]) * 60
        direction: Direction = ("rising" if slope >= SLOPE_C_PER_MIN else
                                "falling" if slope <= -SLOPE_C_PER_MIN else "stable")
        return Trend(temps[-1], round(sum(temps) / len(temps), 1), min(temps), max(temps),
                     direction, round(slope, 2), len(temps), minutes)


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope, per second; 0 with fewer than two distinct times."""
    if len(points) < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / len(points)
    mean_v = sum(v for _, v in points) / len(points)
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var
