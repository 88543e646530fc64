"""The fleet over the last day, in memory: GPU utilization and time asleep per step.

Time series belong in Prometheus; this is the little the fleet page draws without one.
The liveness loop feeds ``History.sample`` every ``SAMPLE_S``; a point is one ``STEP_S``
step (the newest one still filling), and points older than ``KEEP_S`` are dropped. It
starts empty when the server starts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from clusterctl.fleet.nodes import ASLEEP, Node
from clusterctl.units import iso_utc

STEP_S = 300
KEEP_S = 86400
SAMPLE_S = 15.0
MAX_GAP_S = 2 * SAMPLE_S  # a longer gap (a stopped clock, a stall) is not counted asleep


@dataclass
class Point:
    start: float  # wall clock, a multiple of STEP_S
    nodes: int = 0
    utilization_sum: float = 0.0  # of the fleet means, one per sample with a value
    utilization_samples: int = 0
    asleep: int = 0
    asleep_node_s: float = 0.0

    def shown(self) -> dict[str, Any]:
        mean = None if not self.utilization_samples else \
            round(self.utilization_sum / self.utilization_samples, 1)
        return {"t": iso_utc(self.start), "nodes": self.nodes, "gpu_utilization": mean,
                "nodes_hibernated": self.asleep,
                "hibernated_hours": round(self.asleep_node_s / 3600, 3)}


class History:
    def __init__(self) -> None:
        self.points: deque[Point] = deque(maxlen=KEEP_S // STEP_S)
        self.last_sample: float | None = None

    def due(self, now: float) -> bool:
        return self.last_sample is None or not 0 <= now - self.last_sample < SAMPLE_S

    def sample(self, now: float, nodes: Iterable[Node]) -> None:
        """Add what the fleet looks like at ``now``."""
        utils: list[float] = []
        count = asleep = 0
        for node in nodes:
            count += 1
            if node.state in ASLEEP:
                asleep += 1
            elif node.state in ("running", "idle", "hibernating") and \
                    node.gpu_utilization is not None and 0 <= node.gpu_utilization <= 100:
                # a node's 1e308 % would add up to inf (and "Infinity" is not JSON)
                utils.append(node.gpu_utilization)
        start = now - now % STEP_S
        if not self.points or self.points[-1].start != start:
            if self.points and start < self.points[-1].start:  # the clock went back
                self.points.clear()
            self.points.append(Point(start))
        point = self.points[-1]
        point.nodes, point.asleep = count, asleep
        if utils:
            point.utilization_sum += sum(utils) / len(utils)
            point.utilization_samples += 1
        if self.last_sample is not None and 0 < now - self.last_sample <= MAX_GAP_S:
            point.asleep_node_s += asleep * (now - self.last_sample)
        self.last_sample = now

    def shown(self, now: float) -> dict[str, Any]:
        kept = [p.shown() for p in self.points if now - p.start < KEEP_S]
        return {"step_s": STEP_S, "points": kept}
