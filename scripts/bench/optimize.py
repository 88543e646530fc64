#!/usr/bin/env python3
"""Wall time of `clusterctl optimize plan` and of a no-change `optimize apply` (median).

    sudo scripts/bench/optimize.py [--runs 15] [--binary .venv/bin/clusterctl]

Run by hand as root; figures go in closing notes (goal: both under 0.5 s). It runs in a
private mount namespace with overlays over /etc and /var/lib, so the files apply writes
never reach this machine; the sysctls it sets are kernel-wide and are put back by
`optimize revert` (and, if that fails, from the values read before).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SYSCTLS = ("/proc/sys/vm/swappiness", "/proc/sys/vm/vfs_cache_pressure")


def time_runs(argv: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs + 1):  # one warm-up run, not counted
        started = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - started)
    return times[1:]


def inside(binary: str, runs: int) -> None:
    conf = Path(tempfile.mkdtemp()) / "clusterctl.toml"
    conf.write_text('[ollama]\nurl = "http://127.0.0.1:9"\n')
    base = [binary, "optimize"]
    cases = {"optimize plan": [*base, "plan", "--config", str(conf)]}
    subprocess.run([*base, "apply", "--config", str(conf)], stdout=subprocess.DEVNULL,
                   check=True)
    cases["optimize apply (no change)"] = [*base, "apply", "--config", str(conf)]
    try:
        for name, argv in cases.items():
            times = time_runs(argv, runs)
            print(f"{name:28} median {statistics.median(times) * 1000:6.0f} ms  "
                  f"min {min(times) * 1000:6.0f} ms  ({runs} runs)")
    finally:
        subprocess.run([*base, "revert", "--config", str(conf)], stdout=subprocess.DEVNULL,
                       check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--binary", default=".venv/bin/clusterctl")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        inside(str(Path(args.binary).resolve()), args.runs)
        return 0
    if os.geteuid() != 0:
        print("run as root: apply sets sysctls", file=sys.stderr)
        return 2
    saved = {p: Path(p).read_text() for p in SYSCTLS}
    work = Path(tempfile.mkdtemp(prefix="bench-optimize."))
    mounts = " && ".join(
        f"mkdir -p {work}{d}/u {work}{d}/w && mount -t overlay overlay -o lowerdir={d},"
        f"upperdir={work}{d}/u,workdir={work}{d}/w {d}" for d in ("/etc", "/var/lib", "/run"))
    try:
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f"{mounts} && exec {sys.executable} {__file__} --inside --runs {args.runs} "
             f"--binary {Path(args.binary).resolve()}"], check=False).returncode
    finally:
        for path, value in saved.items():
            Path(path).write_text(value)


if __name__ == "__main__":
    sys.exit(main())
