"""What each GPU burned, busy and idle (pure).

Per GPU, every sample adds the energy since the previous one to ``busy_j`` or
``idle_j``: idle as hibernation defines it (:mod:`clusterctl.hibernate.idle`),
utilization under ``[hibernate] gpu_usage_threshold``; a utilization that cannot be read
counts as busy, as it counts as activity there. The energy comes from NVML's counter
(``nvmlDeviceGetTotalEnergyConsumption``, mJ since the driver loaded) where the GPU has
it, else from the power draw integrated over time (``source: "power_integral"``,
the trapezoid between two samples).

The interval between two samples goes to the state of the later one: utilization is
what the GPU did over the last moments before it was read. An interval longer than
``max_gap_s`` (the agent stopped, the node slept, a hung driver) is not shared out:
nobody watched whether the GPU was busy. A counter that went down (the driver was
reloaded) restarted from zero: what it reads now is what was burned since. An interval
whose energy no GPU can burn (below zero, or over MAX_POWER_W: a broken driver's counter
that jumped or went back, a draw of megawatts) is not accounted either.

``idle_power_w`` is the mean draw while idle: the idle joules over the idle seconds.
Times are ``time.monotonic()`` seconds: one clock for the whole boot, whichever
process keeps the ledger.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from clusterctl.host.nvml import GpuSample

Source = Literal["counter", "power_integral"]
JOULES_PER_KWH = 3.6e6
MAX_GAP_S = 60.0  # the agent's default; it passes max(60 s, 10 sampling intervals)


@dataclass(frozen=True)
class GpuEnergy:
    """One GPU's account since boot (or since the agent first saw it)."""

    key: str  # the GPU's UUID, or "gpu-<index>" when it has none
    index: int
    busy_j: float = 0.0
    idle_j: float = 0.0
    busy_s: float = 0.0
    idle_s: float = 0.0
    source: Source | None = None  # how the last interval was measured; None: not yet
    total_mj: int | None = None  # the counter at the last sample (None: no counter)
    last_at: float | None = None  # monotonic seconds of the last sample accounted
    last_power_w: float | None = None  # the draw then

    @property
    def idle_power_w(self) -> float | None:
        """The mean draw while idle; None before any idle time was measured."""
        return self.idle_j / self.idle_s if self.idle_s > 0 else None


@dataclass(frozen=True)
class EnergyLedger:
    gpus: Mapping[str, GpuEnergy]  # by key
    boot_id: str | None = None  # the boot these totals belong to

    def of(self, sample: GpuSample) -> GpuEnergy | None:
        return self.gpus.get(key_of(sample))

    @property
    def busy_j(self) -> float:
        return sum(g.busy_j for g in self.gpus.values())

    @property
    def idle_j(self) -> float:
        return sum(g.idle_j for g in self.gpus.values())


EMPTY = EnergyLedger({})


def key_of(sample: GpuSample) -> str:
    return sample.uuid or f"gpu-{sample.index}"


def is_idle(sample: GpuSample, threshold_percent: float) -> bool:
    """Idle as hibernation has it: utilization read, and under the threshold."""
    util = sample.utilization_gpu_percent
    return not sample.lost and util is not None and util < threshold_percent


def account(ledger: EnergyLedger, samples: Iterable[GpuSample], at: float,
            threshold_percent: float, max_gap_s: float = MAX_GAP_S) -> EnergyLedger:
    """The ledger after the GPUs' samples taken at ``at`` (monotonic seconds)."""
    gpus = dict(ledger.gpus)
    for sample in samples:
        key = key_of(sample)
        gpus[key] = step(gpus.get(key) or GpuEnergy(key, sample.index), sample, at,
                         threshold_percent, max_gap_s)
    return replace(ledger, gpus=gpus)


def step(gpu: GpuEnergy, sample: GpuSample, at: float, threshold_percent: float,
         max_gap_s: float = MAX_GAP_S) -> GpuEnergy:
    """One GPU's account after one sample."""
    if sample.lost:  # nothing to go by; the next good sample starts afresh
        return replace(gpu, index=sample.index, last_at=None, total_mj=None,
                       last_power_w=None)
    total, power = sample.energy_total_mj, sample.power_draw_w
    source: Source | None = "counter" if total is not None else (
        "power_integral" if power is not None else None)
    after = replace(gpu, index=sample.index, last_at=at, total_mj=total, last_power_w=power,
                    source=source or gpu.source)
    dt = None if gpu.last_at is None else at - gpu.last_at
    if dt is None or not 0 < dt <= max_gap_s:
        return after  # the first look, a clock that went back, or nobody watched
    joules = _joules(gpu, total, power, dt)
    if joules is None:
        return after
    if is_idle(sample, threshold_percent):
        return replace(after, idle_j=gpu.idle_j + joules, idle_s=gpu.idle_s + dt)
    return replace(after, busy_j=gpu.busy_j + joules, busy_s=gpu.busy_s + dt)


MAX_POWER_W = 10_000.0  # more than any GPU draws: energy beyond it over an interval is not


def _joules(gpu: GpuEnergy, total_mj: int | None, power_w: float | None, dt: float
            ) -> float | None:
    """The joules of one interval; None where a broken driver's figures (a counter that
    jumped, went back without a restart, a draw no GPU has) cannot be a GPU's."""
    if total_mj is not None and gpu.total_mj is not None:
        spent = total_mj - gpu.total_mj
        joules = (total_mj if spent < 0 else spent) / 1000  # < 0: the counter restarted
    elif power_w is None:
        return None
    else:
        before = power_w if gpu.last_power_w is None else gpu.last_power_w
        joules = (power_w + before) / 2 * dt  # the trapezoid (a rectangle after a missed read)
    return joules if 0 <= joules <= MAX_POWER_W * dt else None


def kwh(joules: float) -> float:
    return joules / JOULES_PER_KWH


# -- as heartbeats, metrics and the state file carry it -------------------------------------


def heartbeat_energy(sample: GpuSample, gpu: GpuEnergy | None) -> dict[str, Any]:
    """The heartbeat GPU's ``energy``: the counter now, joules busy and idle, the idle
    draw, how it is measured."""
    source: Source | None = gpu.source if gpu is not None else None
    if source is None:
        source = "counter" if sample.energy_total_mj is not None else "power_integral"
    return {"total_mj": sample.energy_total_mj,
            "busy_j": None if gpu is None else round(gpu.busy_j, 3),
            "idle_j": None if gpu is None else round(gpu.idle_j, 3),
            "idle_power_w": None if gpu is None or gpu.idle_power_w is None
            else round(gpu.idle_power_w, 3),
            "source": source}


MAX_GPUS_COUNTED = 256  # per node: a heartbeat listing more is not believed past that


def heartbeat_joules(beat: object) -> tuple[float, float]:
    """(idle, busy) joules a node's heartbeat reports over its GPUs, for the control
    plane: whatever it holds, what is not a finite non-negative number counts as 0."""
    gpus = beat.get("gpus") if isinstance(beat, dict) else None
    idle = busy = 0.0
    for gpu in gpus[:MAX_GPUS_COUNTED] if isinstance(gpus, list) else ():
        spent = gpu.get("energy") if isinstance(gpu, dict) else None
        if isinstance(spent, dict):
            idle += _reported(spent.get("idle_j"))
            busy += _reported(spent.get("busy_j"))
    return idle, busy


MAX_JOULES_BELIEVED = 1e13  # 10 kW for 30 years: a larger figure is not a GPU's


def _reported(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    return float(value) if 0 < value < MAX_JOULES_BELIEVED else 0.0  # NaN fails too


def to_dict(ledger: EnergyLedger) -> dict[str, Any]:
    return {"boot_id": ledger.boot_id,
            "gpus": [{"key": g.key, "index": g.index, "busy_j": g.busy_j, "idle_j": g.idle_j,
                      "busy_s": g.busy_s, "idle_s": g.idle_s, "source": g.source,
                      "total_mj": g.total_mj, "last_at": g.last_at,
                      "last_power_w": g.last_power_w} for g in ledger.gpus.values()]}


def from_dict(data: Mapping[str, Any]) -> EnergyLedger:
    """The ledger a file holds; ValueError/TypeError/KeyError for one that is damaged."""
    boot_id = data.get("boot_id")
    if boot_id is not None and not isinstance(boot_id, str):
        raise TypeError("boot_id is not a string")
    gpus = {}
    for item in data["gpus"]:
        source = item.get("source")
        if source not in (None, "counter", "power_integral"):
            raise ValueError(f"unknown energy source {source!r}")
        gpu = GpuEnergy(key=str(item["key"]), index=_index(item["index"]),
                        busy_j=_number(item["busy_j"]), idle_j=_number(item["idle_j"]),
                        busy_s=_number(item["busy_s"]), idle_s=_number(item["idle_s"]),
                        source=source, total_mj=_optional_int(item.get("total_mj")),
                        last_at=_optional_number(item.get("last_at")),
                        last_power_w=_optional_number(item.get("last_power_w")))
        gpus[gpu.key] = gpu
    return EnergyLedger(gpus, boot_id)


def _index(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"not a GPU index: {value!r}")
    return value


def _number(value: object) -> float:
    number = _optional_number(value)
    if number is None or number < 0:
        raise ValueError(f"not a non-negative number: {value!r}")
    return number


def _optional_number(value: object) -> float | None:
    """A finite number (NaN, Infinity and integers beyond a float are damage)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not a number: {value!r}")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError("a number beyond a float") from None
    if not math.isfinite(number):
        raise ValueError(f"not a finite number: {value!r}")
    return number


def _optional_int(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"not an integer: {value!r}")
    return value
