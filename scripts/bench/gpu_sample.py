#!/usr/bin/env python3
"""Cost of one full GPU status sample, per GPU, against the floor and the usual tools.

    scripts/bench/gpu_sample.py [--runs 200] [--smi-runs 20]

Run by hand on a machine with an NVIDIA GPU; figures go in closing notes. Reads only:
it never changes a GPU setting. Compares, per GPU and per sample (median):

- floor: the bare pynvml calls for the same gauges, handles cached, in a loop, at the
  same cadence as the sample (energy, encoder/decoder, memory temperature and GPM every
  run; the counters, PCIe replays, remapped rows and NVLink, every 30 s);
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

from clusterctl.host.nvml import COUNTERS_EVERY_S, GPM_METRICS, Nvml

SMI_FIELDS = ("index,uuid,name,utilization.gpu,utilization.memory,memory.total,memory.used,"
              "memory.free,temperature.gpu,power.draw,power.limit,clocks.gr,clocks.sm,"
              "clocks.mem,pstate,fan.speed,clocks_event_reasons.active")


Calls = list[tuple[Any, Any, tuple[Any, ...]]]
ALL_LINKS = 0xFFFFFFFF


def counter_calls(nv: Any, handles: list[Any]) -> Calls:
    """The counters Nvml.sample reads every COUNTERS_EVERY_S, less the unsupported."""
    fields = ((nv.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, ALL_LINKS),
              (nv.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, ALL_LINKS))
    return supported(nv, handles, ((nv.nvmlDeviceGetRemappedRows, ()),
                                   (nv.nvmlDeviceGetPcieReplayCounter, ()),
                                   (nv.nvmlDeviceGetFieldValues, (fields,))))


def supported(nv: Any, handles: list[Any], candidates: tuple[tuple[Any, tuple[Any, ...]], ...]
              ) -> Calls:
    calls = []
    for h in handles:
        for fn, args in candidates:
            try:
                answer = fn(h, *args)
            except nv.NVMLError:
                continue
            if fn is nv.nvmlDeviceGetFieldValues and all(v.nvmlReturn for v in answer):
                continue  # every field NotSupported: Nvml.sample stops asking
            calls.append((fn, h, args))
    return calls


class BareGpm:
    """GPM as Nvml.sample reads it, bare: per supporting GPU two samples taken in turn
    and the metrics between them."""

    def __init__(self, nv: Any, handles: list[Any]) -> None:
        self.nv = nv
        self.gpus: list[tuple[Any, list[Any], Any]] = []
        if not hasattr(nv, "nvmlGpmQueryDeviceSupport"):
            return
        for h in handles:
            try:
                if not nv.nvmlGpmQueryDeviceSupport(h).isSupportedDevice:
                    continue
                samples = [nv.nvmlGpmSampleAlloc(), nv.nvmlGpmSampleAlloc()]
            except nv.NVMLError:
                continue
            request = nv.c_nvmlGpmMetricsGet_t()
            request.version = nv.NVML_GPM_METRICS_GET_VERSION
            request.numMetrics = len(GPM_METRICS)
            for i, (metric, _) in enumerate(GPM_METRICS):
                request.metrics[i].metricId = metric
            nv.nvmlGpmSampleGet(h, samples[0])
            self.gpus.append((h, samples, request))

    def __call__(self) -> None:
        for h, samples, request in self.gpus:
            samples.reverse()
            self.nv.nvmlGpmSampleGet(h, samples[0])
            request.sample1, request.sample2 = samples[1], samples[0]
            self.nv.nvmlGpmMetricsGet(request)

    def close(self) -> None:
        for _, samples, _ in self.gpus:
            for sample in samples:
                self.nv.nvmlGpmSampleFree(sample)


def bare_calls(nv: Any, handles: list[Any]) -> Calls:
    """The NVML calls Nvml.sample makes every sample, less those a GPU answers NotSupported
    (as it does)."""
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
                          (nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC))):
            try:
                fn(h, *args)
            except nv.NVMLError:
                continue
            calls.append((fn, h, args))
    return calls + supported(nv, handles, (
        (nv.nvmlDeviceGetTotalEnergyConsumption, ()),
        (nv.nvmlDeviceGetEncoderUtilization, ()),
        (nv.nvmlDeviceGetDecoderUtilization, ()),
        (nv.nvmlDeviceGetFieldValues, ((nv.NVML_FI_DEV_MEMORY_TEMP,),))))


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
    counters = counter_calls(nv, handles)
    gpm = BareGpm(nv, handles)
    counted_at = [-COUNTERS_EVERY_S]

    def floor_fn() -> None:
        for fn, h, fn_args in calls:
            fn(h, *fn_args)
        gpm()
        if time.monotonic() - counted_at[0] >= COUNTERS_EVERY_S:
            counted_at[0] = time.monotonic()
            for fn, h, fn_args in counters:
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
          f"calls, {2 * len(gpm.gpus)} GPM calls, {len(counters)} counters every "
          f"{COUNTERS_EVERY_S:g} s")
    if smi:
        print(f"nvidia-smi / clusterctl = "
              f"{results['nvidia-smi --query-gpu (subprocess)'] / ours:.0f} (goal >= 50)")
    gpm.close()
    nvml.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
