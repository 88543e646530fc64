#!/usr/bin/env python3
"""Does a process growing towards OOM survive on swap the agent grows? (root; loop ext4)

    sudo .venv/bin/python scripts/bench/memory_hog.py [--targets 1G,4G]
        [--rates 10,20,50,100,200] [--without-agent-only | --with-agent-only]
        [--agent-by-hand] [--json PATH] [--timeline]

Each case: a fresh sparse ext4 loop filesystem as [swap] dir, min_size 256M made by one
`clusterctl swap auto` (as the timer would at boot), increment 256M, max_size 5G; then a
hog (tests/hog.py) in a memory cgroup limited to 256 MiB grows at RATE MiB/s to TARGET,
alone or with `clusterctl agent run` (as its unit, so it owns the swap policy; with the
hog's cgroup in [swap] watch_cgroups where the config has that key). Columns: survived
or OOM-killed, seconds, how far it got, peak swap in use (node / the hog's), peak managed
swap, new files, stall -> first new file online, PSI full avg10 peaks (system, cgroup),
the agent's swap growth events. Goal: no OOM kill at any rate up to 200 MiB/s, and
managed swap never more than the hog's peak swap (in whole increments) plus one increment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.hog import (  # noqa: E402
    MIB,
    HogResult,
    clusterctl,
    free_port,
    hog_cgroup,
    knows_key,
    node_config,
    read_events,
    run_hog,
    running_agent,
    swap_areas,
    swap_events,
)
from tests.loopfs import loop_mount, swapoff_under  # noqa: E402

INCREMENT_MIB = 256


def size_mib(text: str) -> int:
    text = text.strip().upper()
    if text.endswith("G"):
        return int(float(text[:-1]) * 1024)
    return int(text.rstrip("M"))


def wait_for_no_other_swap(limit_s: float) -> None:
    """Until no swap area is active on the node (another test's would take the hog's
    pages), for at most ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while swap_areas() and time.monotonic() < deadline:
        time.sleep(1)


def run_case(target_mib: int, rate: float, *, agent: bool, by_hand: bool, max_size: str,
             fs_mib: int, settle_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="hog-bench-") as tmp:
        work = Path(tmp)
        with loop_mount(work, "ext4", size_mib=fs_mib) as mount, \
                hog_cgroup("hog-bench") as group:
            swap_dir = mount / "swap"
            watch = [group.name] if agent and knows_key("swap", "watch_cgroups",
                                                        '["x"]') else None
            conf = node_config(work, swap_dir, port=free_port(), max_size=max_size,
                               increment=f"{INCREMENT_MIB}M", watch_cgroups=watch)
            made = clusterctl("swap", "auto", "--config", str(conf))
            if made.returncode != 0:
                raise SystemExit(f"swap auto failed: {made.stdout}{made.stderr}")
            before = len(read_events(work / "state"))  # swap auto's min_size event
            time.sleep(settle_s)  # the last case's PSI averages decay
            events: list[dict[str, Any]] = []
            log_tail = ""
            try:
                if agent:
                    with running_agent(conf, work, as_unit=not by_hand) as proc:
                        result = run_hog(group, swap_dir, rate_mib_s=rate,
                                         target_mib=target_mib, workdir=work)
                        events = swap_events(proc.events()[before:])
                        log_tail = proc.log_text()[-6000:]
                else:
                    result = run_hog(group, swap_dir, rate_mib_s=rate, target_mib=target_mib,
                                     workdir=work)
            finally:
                clusterctl("swap", "clean", "--config", str(conf))
                swapoff_under(mount)
            return {"agent": agent, "watch_cgroups": watch, "result": result,
                    "events": events, "agent_log_tail": log_tail}


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:.0f}"


def sec(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


HEADER = (f"{'target':>6} {'rate':>5} {'agent':>5} {'outcome':>8} {'secs':>7} {'got':>5} "
          f"{'swapN':>6} {'swapH':>6} {'mgd':>6} {'over':>5} {'frgn':>5} {'new':>4} "
          f"{'stall>on':>8} "
          f"{'psiS':>5} {'psiC':>5} {'grow':>4} {'goal':>4}")


LEGEND = ("swapN/swapH: peak swap in use on the node / charged to the hog (MiB); mgd: peak "
          "managed swap (MiB); over: mgd - swapH; frgn: peak swap elsewhere on the node "
          "(another test's: the hog can swap there too, so such a row proves nothing); "
          "stall>on: s from the hog's first stall to the first new file active; psiS/psiC: "
          "peak PSI full avg10 (%) system / the hog's cgroup; grow: swap_expanded events; "
          "goal: survived and mgd <= swapH rounded up to whole increments, plus one "
          "increment (n/a with frgn)")


def allowed_bytes(r: HogResult) -> int:
    """The most managed swap the goal allows: what the hog's peak swap needs, in whole
    increments, plus one increment."""
    need = r.peak_hog_swap_bytes if r.peak_hog_swap_bytes is not None else \
        r.peak_swap_used_bytes
    step = INCREMENT_MIB * MIB
    return -(-need // step) * step + step


def line(case: dict[str, Any]) -> str:
    r: HogResult = case["result"]
    outcome = "survived" if r.survived else "timeout" if r.timed_out else (
        "OOM" if r.oom_killed else f"exit{r.exit_status}")
    grows = sum(1 for e in case["events"] if e.get("event_type") == "swap_expanded")
    goal = "ok" if r.survived and r.peak_managed_bytes <= allowed_bytes(r) else "MISS"
    if r.peak_foreign_swap_bytes:
        goal = "n/a"  # it could swap into another test's swap
    return (f"{r.target_mib:>5}M {r.rate_mib_s:>5g} {'yes' if case['agent'] else 'no':>5} "
            f"{outcome:>8} {r.seconds:>7.1f} {r.reached_mib:>5} "
            f"{mib(r.peak_swap_used_bytes):>6} {mib(r.peak_hog_swap_bytes):>6} "
            f"{mib(r.peak_managed_bytes):>6} "
            f"{mib(r.peak_managed_bytes - (r.peak_hog_swap_bytes or 0)):>5} "
            f"{mib(r.peak_foreign_swap_bytes):>5} "
            f"{len(r.new_files):>4} "
            f"{sec(r.stall_to_new_file_s):>8} {pct(r.peak_psi_full_avg10_system):>5} "
            f"{pct(r.peak_psi_full_avg10_cgroup):>5} {grows:>4} {goal:>4}")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--targets", default="1G,4G", help="comma-separated sizes")
    parser.add_argument("--rates", default="10,20,50,100,200", help="MiB/s, comma-separated")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--without-agent-only", action="store_true")
    only.add_argument("--with-agent-only", action="store_true")
    parser.add_argument("--agent-by-hand", action="store_true",
                        help="run the agent outside a clusterctl-agent.service cgroup "
                             "(it then does not own the steady swap steps)")
    parser.add_argument("--max-size", default="5G",
                        help="5G: 256M files (more would make them larger: kernel area limit)")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds to wait before each hog (PSI averages decay)")
    parser.add_argument("--wait-no-swap", type=float, default=120.0, metavar="S",
                        help="before each case, wait up to S s for no other swap area on "
                             "the node")
    parser.add_argument("--json", type=Path, help="write every case (and events) here")
    parser.add_argument("--timeline", action="store_true",
                        help="put each case's 50 ms samples in the JSON too")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("memory_hog.py: needs root (loop devices, swapon, cgroups)", file=sys.stderr)
        return 2
    targets = [size_mib(t) for t in args.targets.split(",") if t]
    rates = [float(r) for r in args.rates.split(",") if r]
    modes = [False] if args.without_agent_only else [True] if args.with_agent_only \
        else [False, True]
    fs_mib = size_mib(args.max_size) + 2048
    print(HEADER, flush=True)
    cases = []
    for target in targets:
        for rate in rates:
            for agent in modes:
                wait_for_no_other_swap(args.wait_no_swap)
                case = run_case(target, rate, agent=agent, by_hand=args.agent_by_hand,
                                max_size=args.max_size, fs_mib=fs_mib, settle_s=args.settle)
                cases.append(case)
                print(line(case), flush=True)
    print(LEGEND)
    if args.json:
        out = []
        for case in cases:
            r: HogResult = case["result"]
            row = {**r.row(), "agent": case["agent"], "watch_cgroups": case["watch_cgroups"],
                   "events": case["events"], "agent_log_tail": case["agent_log_tail"]}
            if args.timeline:
                row["timeline"] = r.timeline_rows()
            out.append(row)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
