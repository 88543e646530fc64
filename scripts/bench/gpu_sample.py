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
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent"))

from clusterctl.host.nvml import Nvml

SMI_FIELDS = ("index,uuid,name,utilization.gpu,utilization.memory,memory.total,memory.used,"
              "memory.free,temperature.gpu,power.draw,power.limit,clocks.gr,clocks.sm,"
              "clocks.mem,pstate,fan.speed,clocks_event_reasons.active")


def bare_calls(nv: Any, handles: list[Any]) -> list[tuple[Any, Any, tuple[Any, ...]]]:
    """The NVML calls Nvml.sample makes, less those a GPU answers NotSupported (as it does)."""
    version = getattr(nv, "nvmlMemory_v2", None)
    calls = []
    for h in handles:
        for fn, args in ((nv.nvmlDeviceGetUtilizationRates, ()),
                         (nv.nvmlDeviceGetMemoryInfo, (version,) if version else ()),
                         (nv.nvmlDeviceGetTemperature, (nv.NVML_TEMPERATURE_GPU,)),
                         (nv.nvmlDeviceGetPowerUsage, ()),
                         (nv.nvmlDeviceGetPowerManagementLimit, ()),
                         (nv.nvmlDeviceGetClockInfo, (nv.NVML_CLOCK_GRAPHICS,)),
                         (nv.nvmlDeviceGetClockInfo, (nv.NVML_CLOCK_SM,)),
                         (nv.nvmlDeviceGetClockInfo, (nv.NVML_CLOCK_MEM,)),
                         (nv.nvmlDeviceGetPerformanceState, ()),
                         (nv.nvmlDeviceGetFanSpeed, ()),
                         (nv.nvmlDeviceGetCurrentClocksEventReasons, ()),
                         (nv.nvmlDeviceGetTotalEccErrors,
                          (nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC)),
                         (nv.nvmlDeviceGetRemappedRows, ())):
            try:
                fn(h, *args)
            except nv.NVMLError:
                continue
            calls.append((fn, h, args))
    return calls


def interleaved(cases: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median seconds of each case, the cases taking turns so drift hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn()  # warm-up
    for i in range(runs):
        names = list(cases)
        for name in names[i % len(names):] + names[:i % len(names)]:
            started = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


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
    calls = bare_calls(nv, handles)

    def floor_fn() -> None:
        for fn, h, fn_args in calls:
            fn(h, *fn_args)

    results = interleaved({"floor (bare pynvml calls)": floor_fn,
                           "clusterctl Nvml.sample()": nvml.sample,
                           "clusterctl, with processes": lambda: nvml.sample(processes=True)},
                          args.runs)
    tools: dict[str, Callable[[], object]] = {}
    smi = shutil.which("nvidia-smi")
    if smi:
        tools["nvidia-smi --query-gpu (subprocess)"] = lambda: subprocess.run(
            [smi, f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader,nounits"],
            capture_output=True, check=True)
    gpustat = shutil.which("gpustat")
    if gpustat:
        tools["gpustat --json (subprocess)"] = lambda: subprocess.run(
            [gpustat, "--json"], capture_output=True, check=True)
    for name, fn in list(tools.items()):
        try:
            fn()
        except (OSError, subprocess.CalledProcessError) as err:
            print(f"{name}: skipped ({err})", file=sys.stderr)
            del tools[name]
    if tools:
        results.update(interleaved(tools, args.smi_runs))
    floor = results["floor (bare pynvml calls)"]
    ours = results["clusterctl Nvml.sample()"]
    print(f"{count} GPU(s): {snapshot.gpus[0].name}, driver {snapshot.driver_version}")
    for name, seconds in results.items():
        per_gpu = seconds / count
        print(f"{name:38} {per_gpu * 1e6:10.1f} us per GPU   x{seconds / ours:7.2f} of clusterctl")
    print(f"clusterctl / floor = {ours / floor:.2f} (goal <= 1.3); floor = {len(calls)} NVML "
          "calls")
    if smi:
        print(f"nvidia-smi / clusterctl = "
              f"{results['nvidia-smi --query-gpu (subprocess)'] / ours:.0f} (goal >= 50)")
    nvml.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
