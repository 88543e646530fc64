#!/usr/bin/env python3
"""Cost of one full GPU status sample, per GPU, against the floor and the usual tools.

    scripts/bench/gpu_sample.py [--runs 200] [--smi-runs 20]

Run by hand on a machine with an NVIDIA GPU; figures go in closing notes. Reads only:
it never changes a GPU setting. Compares, per GPU and per sample (median):

- floor: the bare pynvml calls for the same gauges, handles cached, in a loop;
- clusterctl: ``Nvml.sample()`` (the same gauges, decoded into a GpuSample);
- nvidia-smi: ``nvidia-smi --query-gpu=... --format=csv`` as a subprocess (GPUtil's way);
- gpustat: ``gpustat --json`` as a subprocess, when installed.

Goal: clusterctl within 1.3x of the floor, and 50x or more faster than nvidia-smi.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent"))

from clusterctl.host.nvml import Nvml

SMI_FIELDS = ("index,uuid,name,utilization.gpu,utilization.memory,memory.total,memory.used,"
              "memory.free,temperature.gpu,power.draw,power.limit,clocks.gr,clocks.sm,"
              "clocks.mem,pstate,fan.speed,clocks_event_reasons.active")


def timed(fn: object, runs: int) -> float:
    """Median seconds of ``fn()`` over ``runs`` (after one warm-up)."""
    fn()  # type: ignore[operator]
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bare(nv: object, handles: list[object]) -> None:
    """The floor: the same NVML calls Nvml.sample makes, nothing else."""
    n = nv  # type: ignore[assignment]
    for h in handles:
        n.nvmlDeviceGetUtilizationRates(h)  # type: ignore[attr-defined]
        n.nvmlDeviceGetMemoryInfo(h)  # type: ignore[attr-defined]
        n.nvmlDeviceGetCurrentClocksEventReasons(h)  # type: ignore[attr-defined]
        for fn, args in ((n.nvmlDeviceGetRemappedRows, ()),  # type: ignore[attr-defined]
                         (n.nvmlDeviceGetTemperature, (0,)),  # type: ignore[attr-defined]
                         (n.nvmlDeviceGetPowerUsage, ()),  # type: ignore[attr-defined]
                         (n.nvmlDeviceGetPowerManagementLimit, ()),  # type: ignore[attr-defined]
                         (n.nvmlDeviceGetClockInfo, (0,)),  # type: ignore[attr-defined]
                         (n.nvmlDeviceGetClockInfo, (1,)),  # type: ignore[attr-defined]
                         (n.nvmlDeviceGetClockInfo, (2,)),  # type: ignore[attr-defined]
                         (n.nvmlDeviceGetPerformanceState, ()),  # type: ignore[attr-defined]
                         (n.nvmlDeviceGetFanSpeed, ()),  # type: ignore[attr-defined]
                         (n.nvmlDeviceGetTotalEccErrors, (1, 0))):  # type: ignore[attr-defined]
            with contextlib.suppress(n.NVMLError):  # type: ignore[attr-defined]
                fn(h, *args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--smi-runs", type=int, default=20)
    args = parser.parse_args()
    nvml = Nvml()
    snapshot = nvml.sample()
    if not snapshot.gpus:
        print(f"no GPU: {snapshot.reason}", file=sys.stderr)
        return 2
    count = len(snapshot.gpus)
    nv = nvml.module()
    handles = [nvml.handle(i) for i in range(count)]
    results = {
        "floor (bare pynvml calls)": timed(lambda: bare(nv, handles), args.runs),
        "clusterctl Nvml.sample()": timed(nvml.sample, args.runs),
        "clusterctl, with processes": timed(lambda: nvml.sample(processes=True), args.runs),
    }
    smi = shutil.which("nvidia-smi")
    if smi:
        results["nvidia-smi --query-gpu (subprocess)"] = timed(
            lambda: subprocess.run([smi, f"--query-gpu={SMI_FIELDS}",
                                    "--format=csv,noheader,nounits"], capture_output=True,
                                   check=True), args.smi_runs)
    gpustat = shutil.which("gpustat")
    if gpustat:
        results["gpustat --json (subprocess)"] = timed(
            lambda: subprocess.run([gpustat, "--json"], capture_output=True, check=True),
            args.smi_runs)
    floor = results["floor (bare pynvml calls)"]
    ours = results["clusterctl Nvml.sample()"]
    print(f"{count} GPU(s): {snapshot.gpus[0].name}, driver {snapshot.driver_version}")
    for name, seconds in results.items():
        per_gpu = seconds / count
        print(f"{name:38} {per_gpu * 1e6:10.1f} us per GPU   x{seconds / ours:7.2f} of clusterctl")
    print(f"clusterctl / floor = {ours / floor:.2f} (goal <= 1.3)")
    if smi:
        print(f"nvidia-smi / clusterctl = "
              f"{results['nvidia-smi --query-gpu (subprocess)'] / ours:.0f} (goal >= 50)")
    nvml.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
