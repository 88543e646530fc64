"""GPU states from temperature and VRAM use (one table), with hysteresis (pure).

| state     | temperature                   | VRAM in use            | speed |
|-----------|-------------------------------|------------------------|-------|
| OPTIMAL   | below temp_optimal (65)       | below memory_optimal   | 1.0   |
| NORMAL    | below temp_normal (75)        | below memory_normal    | 0.8   |
| THROTTLED | below temp_critical (90)      | below memory_critical  | 0.5   |
| CRITICAL  | from temp_critical            | from memory_critical   | 0.0   |

The worse of the two decides. A GPU enters a worse state at once, and leaves a
state only when it is ``hysteresis`` degrees (or ``memory_hysteresis`` percent)
past that state's lower edge, so one on the boundary does not flap.
"""

from __future__ import annotations

import enum

from clusterctl.config import GpuConfig


class GpuState(enum.Enum):
    OPTIMAL = "optimal"
    NORMAL = "normal"
    THROTTLED = "throttled"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _ORDER.index(self)

    @property
    def speed_multiplier(self) -> float:
        return _SPEED[self]

    @property
    def should_throttle(self) -> bool:
        return self in (GpuState.THROTTLED, GpuState.CRITICAL)


_ORDER = [GpuState.OPTIMAL, GpuState.NORMAL, GpuState.THROTTLED, GpuState.CRITICAL]
_SPEED = {GpuState.OPTIMAL: 1.0, GpuState.NORMAL: 0.8, GpuState.THROTTLED: 0.5,
          GpuState.CRITICAL: 0.0}


def _by(value: float | None, edges: tuple[float, float, float]) -> GpuState:
    if value is None:
        return GpuState.OPTIMAL  # not reported: the other measure decides
    for state, edge in zip(_ORDER, edges, strict=False):
        if value < edge:
            return state
    return GpuState.CRITICAL


def raw_state(temperature_c: float | None, memory_percent: float | None, config: GpuConfig,
              *, temp_margin: float = 0.0, memory_margin: float = 0.0) -> GpuState:
    """The table's state; margins raise the readings (used to test leaving a state)."""
    by_temp = _by(None if temperature_c is None else temperature_c + temp_margin,
                  (config.temp_optimal_c, config.temp_normal_c, config.temp_critical_c))
    by_memory = _by(None if memory_percent is None else memory_percent + memory_margin,
                    (config.memory_optimal_percent, config.memory_normal_percent,
                     config.memory_critical_percent))
    return max(by_temp, by_memory, key=lambda s: s.rank)


def next_state(previous: GpuState | None, temperature_c: float | None,
               memory_percent: float | None, config: GpuConfig) -> GpuState:
    """The state after one sample, given the state before it."""
    now = raw_state(temperature_c, memory_percent, config)
    if previous is None or now.rank >= previous.rank:
        return now
    # better: leave only as far as the readings are clear of the edges by the margins
    clear = raw_state(temperature_c, memory_percent, config, temp_margin=config.hysteresis_c,
                      memory_margin=config.hysteresis_percent)
    return clear if clear.rank < previous.rank else previous
