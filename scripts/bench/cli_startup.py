#!/usr/bin/env python3
"""Wall time of `clusterctl --help` and `clusterctl check quick` (median of N runs).

    scripts/bench/cli_startup.py [--runs 15] [--binary .venv/bin/clusterctl]

Run by hand; figures go in closing notes. check quick includes its 0.2 s CPU
sampling window, which overlaps the other reads.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "--help": ["--help"],
    "--version": ["--version"],
    "check quick": ["check", "quick"],
    "check quick --json": ["check", "quick", "--json"],
    "config validate": ["config", "validate"],
}


def time_runs(argv: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs + 1):  # one warm-up run, not counted
        started = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - started)
    return times[1:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--binary", default=str(Path(sys.prefix) / "bin" / "clusterctl"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "c.toml"
        conf.write_text("")
        print(f"{'command':22} {'median':>8} {'min':>8} {'max':>8}   ({args.runs} runs)")
        for name, extra in CASES.items():
            argv = [args.binary, *extra]
            if extra[0] not in ("--help", "--version"):
                argv += ["--config", str(conf)]
            times = time_runs(argv, args.runs)
            print(f"{name:22} {statistics.median(times) * 1000:7.0f}ms "
                  f"{min(times) * 1000:7.0f}ms {max(times) * 1000:7.0f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
