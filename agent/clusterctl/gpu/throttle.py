"""The power-limit controller (pure): what limit a GPU should have now, and why.

Only when ``[gpu] throttle_enabled``. At or over ``temp_throttle`` the limit steps
down by ``throttle_step`` % of the default every ``throttle_step_interval``
seconds; CRITICAL drops it to the floor at once (``throttle_floor`` % of the
default, never below the GPU's own minimum). Once the GPU has stayed below
``temp_throttle`` for ``throttle_cooldown_seconds``, the limit steps back up, one
step per cool-down, to the original, which was saved before the first change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from clusterctl.config import GpuConfig
from clusterctl.gpu.states import GpuState
from clusterctl.host.nvml import GpuSample

Move = Literal["lower", "floor", "raise", "restore", "hold"]


@dataclass(frozen=True)
class Throttled:
    """One GPU whose limit clusterctl changed: what to give back."""

    uuid: str
    original_limit_w: float
    limit_w: float  # what clusterctl set last
    changed_at: float
    cool_since: float | None = None  # below temp_throttle since


@dataclass(frozen=True)
class Decision:
    uuid: str
    index: int
    move: Move
    limit_w: float | None  # the limit to set (None for hold)
    reason: str
    record: Throttled | None  # the record after this decision (None: not throttled)


def floor_w(sample: GpuSample, config: GpuConfig) -> float | None:
    default = sample.power_default_limit_w or sample.power_max_limit_w
    if default is None:
        return None
    floor = default * config.throttle_floor_percent / 100
    return max(floor, sample.power_min_limit_w or 0.0)


def decide(sample: GpuSample, state: GpuState, record: Throttled | None, config: GpuConfig,
           now: float) -> Decision:
    uuid = sample.uuid or f"index-{sample.index}"
    current = sample.power_limit_w
    floor = floor_w(sample, config)
    default = sample.power_default_limit_w or sample.power_max_limit_w
    temp = sample.temperature_c

    def hold(reason: str, rec: Throttled | None = record) -> Decision:
        return Decision(uuid, sample.index, "hold", None, reason, rec)

    if sample.lost or current is None or floor is None or default is None:
        return hold("no power limit to work with (lost, or not reported)")
    step = default * config.throttle_step_percent / 100
    original = record.original_limit_w if record else current
    hot = temp is not None and temp >= config.temp_throttle_c
    if state is GpuState.CRITICAL and temp is not None and temp >= config.temp_critical_c:
        if current <= floor + 0.5:
            return hold(f"critical ({temp} C) and already at the floor ({floor:.0f} W)")
        return Decision(uuid, sample.index, "floor", floor,
                        f"critical: {temp} C (from {config.temp_critical_c} C): to the floor",
                        Throttled(uuid, original, floor, now))
    if hot:
        if record and now - record.changed_at < config.throttle_step_interval_s:
            return hold(f"hot ({temp} C); next step after {config.throttle_step_interval_s:g} s",
                        Throttled(uuid, original, record.limit_w, record.changed_at))
        target = max(floor, current - step)
        if target >= current - 0.5:
            return hold(f"hot ({temp} C) and at the floor ({floor:.0f} W)")
        return Decision(uuid, sample.index, "lower", target,
                        f"hot: {temp} C (from {config.temp_throttle_c} C): one step down",
                        Throttled(uuid, original, target, now))
    if record is None:
        return hold("cool, at its own limit")
    cool_since = record.cool_since if record.cool_since is not None else now
    waiting = Throttled(uuid, original, record.limit_w, record.changed_at, cool_since)
    if now - max(cool_since, record.changed_at) < config.throttle_cooldown_s:
        return hold(f"cooling ({temp} C); one step up after "
                    f"{config.throttle_cooldown_s:g} s cool", waiting)
    target = min(original, current + step)
    if target >= original - 0.5:
        return Decision(uuid, sample.index, "restore", original,
                        f"cool for {config.throttle_cooldown_s:g} s: back to its original "
                        f"{original:.0f} W", None)
    return Decision(uuid, sample.index, "raise", target,
                    f"cool for {config.throttle_cooldown_s:g} s: one step up",
                    Throttled(uuid, original, target, now, now))
