"""`clusterctl check`: the resource checker.

``run_check`` reads the host, reads what optimize reads and plans as optimize
plans (so the recommendations are what `clusterctl optimize apply` would
write), optionally runs the measured write test, and judges the result;
``report_dict`` is the one JSON shape (`check --json`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clusterctl.check.report import (
    Finding,
    Mode,
    Report,
    ScorePart,
    build_report,
)
from clusterctl.config import Config
from clusterctl.errors import HostError
from clusterctl.host import HostFacts, Nvml, read_host
from clusterctl.host.disk_speed import WriteTestResult, measure_sequential_write
from clusterctl.optimize.executor import read_facts
from clusterctl.optimize.plan import OptimizePlan, plan, setting_dict
from clusterctl.swap.filesystems import swapfile_support
from clusterctl.units import GIB, MIB, format_size

__all__ = ["Finding", "Report", "ScorePart", "report_dict", "run_check"]

WRITE_TEST_BYTES = 256 * MIB
WRITE_TEST_HEADROOM_BYTES = 1 * GIB


def run_check(
    config: Config,
    *,
    root: Path,
    mode: Mode,
    nvml: Nvml,
    progress: Callable[[int], None] | None = None,
    write_test_bytes: int = WRITE_TEST_BYTES,
) -> tuple[HostFacts, Report]:
    facts = read_host(
        root, swap_dir=config.swap.dir, ollama_url=config.ollama.url, nvml=nvml
    )
    the_plan, extra = _optimize_plan(config, root, nvml)
    write_test: WriteTestResult | None = None
    if mode == "full":
        write_test, tested = _write_test(facts, root, write_test_bytes, progress)
        extra += tested
    return facts, build_report(facts, config, plan=the_plan, mode=mode, write_test=write_test,
                               extra_findings=extra)


def _optimize_plan(config: Config, root: Path, nvml: Nvml
                   ) -> tuple[OptimizePlan | None, tuple[Finding, ...]]:
    """What `clusterctl optimize plan` shows: the same reader, the same planner."""
    try:
        return plan(read_facts(config, root=root, nvml=nvml), config), ()
    except HostError as err:
        return None, (Finding("warn", "optimize.unreadable",
                              f"no recommendations: {err.message}",
                              err.fix or "`clusterctl optimize plan` stops on the same read"),)


def _write_test(
    facts: HostFacts, root: Path, size: int, progress: Callable[[int], None] | None
) -> tuple[WriteTestResult | None, tuple[Finding, ...]]:
    fs = facts.swap_dir
    if not swapfile_support(fs.fstype).supported:
        return None, ()  # the filesystem finding already explains
    room = fs.available_bytes or 0
    if room < size + WRITE_TEST_HEADROOM_BYTES:
        return None, (
            Finding(
                "warn",
                "disk.write_test",
                f"write test skipped: {format_size(room)} free on {fs.mountpoint}, "
                f"it needs {format_size(size + WRITE_TEST_HEADROOM_BYTES)}",
                "free space on that filesystem",
            ),
        )
    directory = root / fs.existing_path.lstrip("/")
    try:
        return measure_sequential_write(directory, size_bytes=size, progress=progress), ()
    except HostError as err:
        return None, (Finding("warn", "disk.write_test", err.message, err.fix),)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def report_dict(facts: HostFacts, report: Report) -> dict[str, Any]:
    """The `check --json` object."""
    memory = facts.memory
    fs = facts.swap_dir
    verdict = swapfile_support(fs.fstype)
    return {
        "mode": report.mode,
        "ready": report.ready,
        "tier": report.tier,
        "score": report.score,
        "score_parts": [
            {**_plain(p), "points": round(p.points, 1)} for p in report.score_parts
        ],
        "system": _plain(facts.system),
        "cpu": _plain(facts.cpu),
        "memory": {
            **_plain(memory),
            "used_bytes": memory.used_bytes,
            "used_percent": _round(memory.used_percent),
        },
        "swap": {
            "total_bytes": memory.swap_total_bytes,
            "used_bytes": memory.swap_used_bytes,
            "used_percent": _round(memory.swap_used_percent),
            "areas": [{**_plain(a), "zram": a.is_zram} for a in facts.swaps],
        },
        "pressure": {**_plain(facts.pressure), "available": facts.pressure.available},
        "disks": [{**_plain(d), "media": d.media} for d in facts.disks],
        "swap_dir": {
            **_plain(fs),
            "media": fs.media,
            "swapfile_supported": verdict.supported,
            "swapfile_reason": verdict.reason,
        },
        "gpus": [_plain(g) for g in facts.gpus.gpus],
        "gpu_reason": facts.gpus.reason,
        "gpu_fix": facts.gpus.fix,
        "driver_version": facts.gpus.driver_version,
        "cuda_driver_version": facts.gpus.cuda_driver_version,
        "ollama": {**_plain(facts.ollama), "installed": facts.ollama.installed,
                   "running": facts.ollama.running},
        "dask": _plain(facts.dask),
        "write_test": (
            {**_plain(report.write_test),
             "bytes_per_s": round(report.write_test.bytes_per_s)}
            if report.write_test else None
        ),
        "findings": [_plain(f) for f in report.findings],
        "recommendations": [setting_dict(s) for s in report.recommendations],
        "recommendations_skipped": list(report.recommendations_skipped),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
