#!/usr/bin/env python3
"""Time to bring 1 GiB of swap online, against its floors (root; loop ext4 of its own).

    sudo .venv/bin/python scripts/bench/swap_online.py [--runs 7] [--binary PATH]

Measures, on one fresh loop-mounted ext4 filesystem (median of N runs):
  bare      fallocate -l 1G && mkswap && swapon, in one shell
  startup   clusterctl --version (the CLI's own start-up)
  expand    clusterctl swap expand --size 1G           goal: <= 1.5 x (bare + startup)
  zeros     the same with [swap] allocation = "zeros"   (the fallback, for scale)
  inproc    swapfiles.create() in this process          goal: <= 1.5 x bare
  tick      clusterctl swap auto with nothing to do     goal: well under 0.3 s
Every swap area it makes is swapped off and removed before the next run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from clusterctl.system import swapfiles

GIB = 2**30


@contextlib.contextmanager
def loop_ext4(workdir: Path, size_gib: int = 4) -> Iterator[Path]:
    image, mount = workdir / "bench.img", workdir / "mnt"
    mount.mkdir()
    with image.open("wb") as handle:
        handle.truncate(size_gib * GIB)
    device = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                            capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True)
        subprocess.run(["mount", device, str(mount)], check=True)
        yield mount
    finally:
        swapoff_all(mount)
        subprocess.run(["umount", str(mount)], check=False)
        subprocess.run(["losetup", "-d", device], check=False)


def swapoff_all(directory: Path) -> None:
    for line in Path("/proc/swaps").read_text().splitlines()[1:]:
        path = line.split()[0]
        if path.startswith(f"{directory}/"):
            subprocess.run(["swapoff", path], check=False)
            Path(path).unlink(missing_ok=True)


def timed(runs: int, action: Callable[[], None], reset: Callable[[], None]) -> list[float]:
    times = []
    for _ in range(runs):
        reset()
        subprocess.run(["sync"], check=True)
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    reset()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--binary", default=str(Path(sys.prefix) / "bin" / "clusterctl"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("swap_online.py: needs root (loop devices, swapon)", file=sys.stderr)
        return 2
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp, loop_ext4(Path(tmp)) as mount:
        work, swap_dir = Path(tmp), mount / "swap"
        swap_dir.mkdir(mode=0o700)

        def config(extra: str = "") -> Path:
            conf = work / "c.toml"
            conf.write_text(f'[swap]\ndir = "{swap_dir}"\nmin_size = "1G"\nmax_size = "8G"\n'
                            f'increment = "1G"\n{extra}\n[paths]\nstate_dir = "{work}/state"\n'
                            f'run_dir = "{work}/run"\n')
            return conf

        def reset() -> None:
            swapoff_all(swap_dir)
            for leftover in swap_dir.iterdir():
                leftover.unlink()
            (work / "state" / "swap.json").unlink(missing_ok=True)

        bare = f"f={swap_dir}/bare; fallocate -l 1G $f && chmod 600 $f && mkswap -q $f && swapon $f"
        results["bare"] = timed(args.runs, lambda: subprocess.run(["sh", "-c", bare],
                                                                 check=True), reset)
        results["startup"] = timed(args.runs, lambda: subprocess.run(
            [args.binary, "--version"], check=True, capture_output=True), lambda: None)
        conf = config()
        expand = [args.binary, "swap", "expand", "--size", "1G", "--config", str(conf)]
        results["expand"] = timed(args.runs, lambda: subprocess.run(
            expand, check=True, capture_output=True), reset)
        zeros = config('allocation = "zeros"')
        results["zeros"] = timed(max(2, args.runs // 3), lambda: subprocess.run(
            [*expand[:-1], str(zeros)], check=True, capture_output=True), reset)

        def inproc() -> None:
            dfd = swapfiles.open_dir(swap_dir, create=False)
            try:
                swapfiles.create(dfd, swap_dir, "swap-0001", GIB)
            finally:
                os.close(dfd)

        results["inproc"] = timed(args.runs, inproc, reset)
        conf = config()
        subprocess.run([args.binary, "swap", "auto", "--config", str(conf)], check=True,
                       capture_output=True)
        results["tick"] = timed(args.runs, lambda: subprocess.run(
            [args.binary, "swap", "auto", "--config", str(conf)], check=True,
            capture_output=True), lambda: None)
        reset()
    med = {name: statistics.median(times) for name, times in results.items()}
    print(f"{'case':8} {'median':>9} {'min':>9} {'max':>9}")
    for name, times in results.items():
        print(f"{name:8} {med[name] * 1000:8.1f}ms {min(times) * 1000:8.1f}ms "
              f"{max(times) * 1000:8.1f}ms")
    floor = med["bare"] + med["startup"]
    print(f"expand / (bare + startup) = {med['expand'] / floor:.2f}  (goal <= 1.5)")
    print(f"inproc / bare             = {med['inproc'] / med['bare']:.2f}  (goal <= 1.5)")
    print(f"no-op tick                = {med['tick'] * 1000:.0f} ms (goal well under 300 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
