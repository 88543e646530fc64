#!/usr/bin/env python3
"""The agent's cost: CPU time and peak RSS over a run, and API latency under load.

    scripts/bench/agent.py [--seconds 600] [--gpus 8] [--rate 200] [--load-seconds 30]

Runs `clusterctl agent run` (this checkout's .venv) at the default intervals against
the fake NVML with N GPUs (or the real NVML with --real-gpu), in a scratch config
(its own state dir, API port, no control plane). Then, from this second process,
GET /metrics and /api/v1/monitoring/gpu-metrics at --rate requests/s, measuring
p50/p99. The fake GPUs report every field the agent reads (energy, encoder/decoder,
memory temperature, PCIe replays, NVLink, GPM) and the XID thread runs, as on a Hopper
node. Goals: under 1 % of one core, RSS under 60 MiB; /metrics p99 under 2 ms (it is
rendered once per GPU sample), gpu-metrics p99 under 10 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(url: str, rate: float, seconds: float) -> list[float]:
    latencies = []
    interval = 1.0 / rate
    next_at = time.perf_counter()
    end = next_at + seconds
    while next_at < end:
        now = time.perf_counter()
        if now < next_at:
            time.sleep(next_at - now)
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=5) as response:
            response.read()
        latencies.append(time.perf_counter() - started)
        next_at += interval
    return latencies


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--load-seconds", type=float, default=30)
    parser.add_argument("--real-gpu", action="store_true")
    parser.add_argument("--python", default=str(REPO / ".venv/bin/python"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-agent."))
    port = free_port()
    conf = work / "clusterctl.toml"
    conf.write_text(f'[api]\nlisten = "127.0.0.1:{port}"\n[paths]\nstate_dir = "{work}/state"\n'
                    f'run_dir = "{work}/run"\n[swap]\ndir = "{work}/swap"\n'
                    '[ollama]\nurl = "http://127.0.0.1:9"\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO / "agent"), os.environ.get("PYTHONPATH", "")) if p)}
    if not args.real_gpu:
        scenario = work / "gpus.json"
        scenario.write_text(json.dumps({"gpus": [
            {"uuid": f"GPU-{i}", "pci_bus_id": f"00000000:{i:02x}:00.0",
             "temperature": 40 + i, "utilization_gpu": 5 * i,
             "energy_mj": 10**9 + i, "nvlink_tx_kib": 10**6, "nvlink_rx_kib": 10**6,
             "gpm": {"GRAPHICS_UTIL": 40, "SM_UTIL": 30, "SM_OCCUPANCY": 20,
                     "ANY_TENSOR_UTIL": 25, "DRAM_BW_UTIL": 10}}
            for i in range(args.gpus)]}))
        env["PYTHONPATH"] = f"{REPO / 'tests/fakes/nvml'}:{env['PYTHONPATH']}"
        env["FAKE_NVML_SCENARIO"] = str(scenario)
    agent = subprocess.Popen([args.python, "-m", "clusterctl", "agent", "run", "--config",
                              str(conf)], env=env, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{base}/healthz", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        started_cpu, started = cpu_seconds(agent.pid), time.monotonic()
        time.sleep(args.seconds)
        used = cpu_seconds(agent.pid) - started_cpu
        elapsed = time.monotonic() - started
        print(f"{'real GPU' if args.real_gpu else f'{args.gpus} fake GPUs'}, default "
              f"intervals, {elapsed:.0f} s: CPU {used:.2f} s = {100 * used / elapsed:.2f} % "
              f"of one core (goal < 1 %); peak RSS {peak_rss_mib(agent.pid):.1f} MiB "
              "(goal < 60)")
        text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
        series = sum(1 for x in text.splitlines() if x and x[0] != "#")
        gpm = "present" if "DCGM_FI_PROF_GR_ENGINE_ACTIVE{" in text else "ABSENT"
        print(f"/metrics: {len(text)} bytes, {series} series, GPM fractions {gpm}")
        for path, goal in (("/metrics", 2), ("/api/v1/monitoring/gpu-metrics", 10)):
            lat = load(base + path, args.rate, args.load_seconds)
            print(f"GET {path:32} {len(lat)} requests at {args.rate:g}/s: p50 "
                  f"{pct(lat, 50):.2f} ms, p99 {pct(lat, 99):.2f} ms, max {max(lat) * 1000:.1f}"
                  f" ms (goal p99 < {goal})  mean {statistics.mean(lat) * 1000:.2f} ms")
        print(f"peak RSS after the load: {peak_rss_mib(agent.pid):.1f} MiB")
    finally:
        agent.terminate()
        agent.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
