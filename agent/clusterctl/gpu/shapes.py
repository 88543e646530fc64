"""The JSON shapes of the API, the CLI and heartbeats, built from monitor views (pure)."""

from __future__ import annotations

from typing import Any

from clusterctl.gpu.energy import EnergyLedger, heartbeat_energy
from clusterctl.gpu.history import Trend
from clusterctl.gpu.monitor import GpuView
from clusterctl.gpu.xid_ledger import Fatal, XidStatus, gpu_key
from clusterctl.host.nvml import GpuSnapshot
from clusterctl.units import iso_utc


def fleet_metrics(snapshot: GpuSnapshot, views: tuple[GpuView, ...],
                  energy: EnergyLedger | None = None, xids: XidStatus | None = None
                  ) -> dict[str, Any]:
    """``GET /api/v1/monitoring/gpu-metrics``: every GPU's gauges, with clusterctl's fields.

    Where a GPU does not report a field, it is null: never a made-up zero. ``energy``:
    the agent's accounting (busy and idle joules are null without it).
    """
    return {
        "timestamp": iso_utc(snapshot.sampled_at),
        "driver_version": snapshot.driver_version,
        "reason": snapshot.reason,
        "gpus": [_fleet_gpu(v, energy, xids) for v in views],
    }


def _fleet_gpu(view: GpuView, energy: EnergyLedger | None = None,
               xids: XidStatus | None = None) -> dict[str, Any]:
    g = view.sample
    seen = None if xids is None else xids.of(g.index, g.uuid)
    return {
        "id": f"gpu-{g.index}",
        "index": g.index,
        "name": g.name,
        "uuid": g.uuid,
        "pci_bus_id": g.pci_bus_id,
        "lost": g.lost,
        "utilization": g.utilization_gpu_percent,
        "memory_utilization": g.utilization_memory_percent,
        "memory": {"total": g.memory_total_mib, "used": g.memory_used_mib,
                   "free": g.memory_free_mib},
        "temperature": g.temperature_c,
        "power_usage": g.power_draw_w,
        "power_limit": {"current": g.power_limit_w, "default": g.power_default_limit_w,
                        "min": g.power_min_limit_w, "max": g.power_max_limit_w},
        "clock_speeds": {"graphics": g.clock_graphics_mhz, "sm": g.clock_sm_mhz,
                         "memory": g.clock_memory_mhz},
        "performance_state": None if g.performance_state is None else f"P{g.performance_state}",
        "fan": g.fan_percent,
        "clock_event_reasons": None if g.clock_event_reasons is None
        else list(g.clock_event_reasons),
        "ecc_uncorrected_volatile": g.ecc_uncorrected_volatile,
        "remapped_rows": {"uncorrectable": g.remapped_rows_uncorrectable,
                          "pending": g.remapped_rows_pending,
                          "correctable": g.remapped_rows_correctable,
                          "failure": g.remap_failure},
        "processes": None if g.processes is None else [
            {"pid": p.pid, "name": p.name, "used_memory": p.used_mib} for p in g.processes],
        "energy": heartbeat_energy(g, None if energy is None else energy.of(g)),
        "encoder_utilization": g.encoder_utilization_percent,
        "decoder_utilization": g.decoder_utilization_percent,
        "memory_temperature": g.memory_temperature_c,
        "pcie_replay_count": g.pcie_replay_count,
        "nvlink": {"tx_bytes": g.nvlink_tx_bytes, "rx_bytes": g.nvlink_rx_bytes},
        "gpm": {"graphics_activity": g.gpm_graphics_activity,
                "sm_activity": g.gpm_sm_activity, "sm_occupancy": g.gpm_sm_occupancy,
                "tensor_activity": g.gpm_tensor_activity, "dram_activity": g.gpm_dram_activity},
        "xid": {"last": None if seen is None else seen.last,
                "count": 0 if seen is None else seen.count},
        "state": view.state.value,
        "speed_multiplier": view.state.speed_multiplier,
        "should_throttle": view.state.should_throttle,
        "power_limited_by_clusterctl": view.throttled,
        "error": g.error,
    }


def manager_status(view: GpuView) -> dict[str, Any]:
    """``GET /api/gpu/status``'s ``data``."""
    g = view.sample
    return {
        "available": not g.lost,
        "gpu_id": g.index,
        "name": g.name,
        "state": view.state.value,
        "temperature_celsius": g.temperature_c,
        "load_percent": g.utilization_gpu_percent,
        "memory": {"used_mb": g.memory_used_mib, "total_mb": g.memory_total_mib,
                   "percent": None if g.memory_used_percent is None
                   else round(g.memory_used_percent, 1)},
        "throttling": {"is_throttled": view.throttled,
                       "should_throttle": view.state.should_throttle,
                       "speed_multiplier": view.state.speed_multiplier},
    }


def trend_dict(trend: Trend | None, gpu_id: int) -> dict[str, Any]:
    """The temperature trend (``get_temperature_trend``): current, average, min, max, trend."""
    if trend is None:
        return {"gpu_id": gpu_id, "samples": 0, "trend": "unknown"}
    return {"gpu_id": gpu_id, "current_temp": trend.current_c, "avg_temp": trend.average_c,
            "min_temp": trend.min_c, "max_temp": trend.max_c, "trend": trend.trend,
            "slope_c_per_min": trend.slope_c_per_min, "samples": trend.samples,
            "duration_minutes": trend.minutes}


def health(views: tuple[GpuView, ...], limit_c: int, reason: str | None,
           unrecovered: dict[str, Fatal] | None = None) -> dict[str, Any]:
    """The health check: every GPU answers, is below ``limit_c`` and has no unrecovered
    fatal XID (``unrecovered``, by ``gpu_key``)."""
    problems = []
    for v in views:
        g = v.sample
        fatal = (unrecovered or {}).get(gpu_key(g.index, g.uuid))
        if fatal is not None:
            problems.append(f"{fatal.problem}: {fatal.fix}")
        if g.lost:
            problems.append(f"GPU {g.index} is lost")
        elif g.temperature_c is None:
            problems.append(f"GPU {g.index} does not report its temperature")
        elif g.temperature_c >= limit_c:
            problems.append(f"GPU {g.index} is at {g.temperature_c} C (limit {limit_c} C)")
    if not views:
        return {"check": "gpu_status", "status": "degraded", "problems": [reason or "no GPU"]}
    return {"check": "gpu_status", "status": "unhealthy" if problems else "healthy",
            "problems": problems}
