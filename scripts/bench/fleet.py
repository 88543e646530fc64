#!/usr/bin/env python3
"""The fleet control plane under a simulated fleet: heartbeat latency, throughput, cost.

    .venv/bin/python scripts/bench/fleet.py [--nodes 1000] [--duration 180]
        [--database sqlite|postgresql] [--interval 30] [--clients 1] [--json PATH]
        [--profile PATH] [--scrape-every S]

Starts `clusterctl fleet serve` (this checkout) as a subprocess on 127.0.0.1 with SQLite
in a temp dir or a throwaway PostgreSQL (tests/postgres.py), with max_heartbeats_per_s
= ceil(nodes / interval) so that the server's answers spread the fleet to --interval.
Enrols every node first (its own node token; in parallel), then one asyncio process
(--clients to split it) heartbeats for all of them at the next_interval_s the server
answers (±10 % jitter, first beats spread over one interval; the nodes say interval_s
10, so the interval is the server's doing); one heartbeat in --events-every also sends
1-3 events. The measurement window starts one interval after the first beats (--warmup;
the first heartbeat of a new node writes its details; enrolment is outside the window)
and lasts --duration seconds. At its end --silence nodes stop, and GET /api/instances
is polled until all of them are `lost`.

Prints one table: heartbeat latency p50/p99/max (client side, in the window),
heartbeats/s and events/s, errors, the server's CPU in the window (cores, from
/proc/PID/stat) and peak RSS (VmHWM), PostgreSQL's own CPU, the database's growth per
node-day, and the time from a silenced node's last heartbeat to `lost`, in intervals
(the server allows 3 intervals + 5 s grace, checked once a second). Goal on 2 cores:
10,000 nodes at 30 s with p99 < 50 ms and the server under one core.
--scrape-every S also GETs /metrics every S seconds in the window, as Prometheus would
(its per-node series make it the largest answer), and reports its time and size.
--profile PATH runs the server under cProfile (its event-loop thread; slower) and
prints the top functions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import pstats
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
import zlib
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "agent")]

from clusterctl.fleet.nodes import GRACE_S, LOST_AFTER_INTERVALS  # noqa: E402
from tests.fakes.control_plane import free_port  # noqa: E402
from tests.fleet import ADMIN, JOIN, event, heartbeat, stop_process, token_file  # noqa: E402
from tests.postgres import PostgresServer, fresh_database  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


# -- the server and its database -------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def tree_cpu_seconds(root: int) -> float:
    """CPU of a process and its children (PostgreSQL's postmaster and backends)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        pid = int(stat.parent.name)
        if pid == root or int(fields[1]) == root:
            total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent not idle (all cores; /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICK


def status_kib(pid: int, key: str) -> int | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


@dataclass
class Database:
    url: str
    size_bytes: Callable[[], int]
    cpu_s: Callable[[], float | None]  # the database server's own CPU; None for SQLite


@contextmanager
def database(kind: str, work: Path) -> Iterator[Database]:
    if kind == "sqlite":
        file = work / "fleet.db"

        def sqlite_size() -> int:
            """Pages in use as a reader sees them (the WAL's newer pages included)."""
            with sqlite3.connect(f"file:{file}?mode=ro", uri=True) as conn:
                pages = conn.execute("PRAGMA page_count").fetchone()[0]
                free = conn.execute("PRAGMA freelist_count").fetchone()[0]
                size = conn.execute("PRAGMA page_size").fetchone()[0]
            return int((pages - free) * size)

        yield Database(f"sqlite:///{file}", sqlite_size, lambda: None)
        return
    with PostgresServer() as server, fresh_database(server.url) as url:
        postmaster = int((server.data / "postmaster.pid").read_text().split()[0])

        def pg_size() -> int:
            with psycopg.connect(url, autocommit=True) as conn:
                row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
                assert row is not None
                return int(row[0])

        yield Database(url, pg_size, lambda: tree_cpu_seconds(postmaster))


def start_server(work: Path, db_url: str, port: int, max_per_s: int,
                 profile: Path | None) -> subprocess.Popen[bytes]:
    conf = work / "fleet.toml"
    conf.write_text(
        f'[fleet]\nlisten = "127.0.0.1:{port}"\ndatabase = "{db_url}"\n'
        f'join_token_file = "{token_file(work / "join-token", JOIN)}"\n'
        f'admin_token_file = "{token_file(work / "admin-token", ADMIN)}"\n'
        f"max_heartbeats_per_s = {max_per_s}\nwake = \"none\"\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO / "agent"), os.environ.get("PYTHONPATH", "")) if p)}
    wrap = ["-m", "cProfile", "-o", str(profile)] if profile else []
    server = subprocess.Popen(
        [sys.executable, *wrap, "-m", "clusterctl", "fleet", "serve", "--config", str(conf)],
        env=env, stdout=subprocess.DEVNULL, stderr=(work / "server.log").open("wb"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}):\n"
                             + (work / "server.log").read_text()[-3000:])
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read()
            return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not answer /healthz within 120 s")


# -- simulated agents ----------------------------------------------------------------
async def enrol_all(url: str, ids: list[str], concurrency: int
                    ) -> tuple[dict[str, str], list[float], Counter[str]]:
    """Every node's token (enrolled `concurrency` at a time), the latencies, errors."""
    tokens: dict[str, str] = {}
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    gate = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def one(node: str) -> None:
            async with gate:
                started = time.monotonic()
                try:
                    async with session.post(
                            f"{url}/api/agent/enroll",
                            json={"instance_id": node, "hostname": node, "boot_id": "b1"},
                            headers={"Authorization": f"Bearer {JOIN}"}) as answer:
                        body = await answer.json()
                        if answer.status != 200:
                            errors[f"enrol {answer.status}: {body.get('error')}"] += 1
                            return
                except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                    errors[f"enrol: {type(err).__name__}"] += 1
                    return
                latencies.append(time.monotonic() - started)
                tokens[node] = body["node_token"]

        await asyncio.gather(*(one(node) for node in ids))
    return tokens, latencies, errors


@dataclass
class Plan:
    """What one client process does; times are time.monotonic() (one clock per host)."""
    url: str
    nodes: list[tuple[str, str]]  # (instance_id, node token)
    silenced: frozenset[str]
    t0: float
    window_start: float
    window_end: float
    interval_s: float
    events_every: int
    gpus: int
    connections: int
    seed: int


@dataclass
class ClientResult:
    beats: array[float] = field(default_factory=lambda: array("d"))  # start times
    latencies: array[float] = field(default_factory=lambda: array("d"))
    event_latencies: array[float] = field(default_factory=lambda: array("d"))
    events_sent: array[float] = field(default_factory=lambda: array("d"))  # (start) per event
    errors: Counter[str] = field(default_factory=Counter)
    window_errors: int = 0
    intervals: Counter[int] = field(default_factory=Counter)  # next_interval_s answered
    last_ok: dict[str, float] = field(default_factory=dict)  # silenced node -> last beat
    lag: array[float] = field(default_factory=lambda: array("d"))
    window_cpu_s: float = 0.0


def gpu_list(count: int, node: str) -> list[dict[str, Any]]:
    """GPUs as an agent reports them (about 200 bytes each)."""
    return [{"index": i, "uuid": f"GPU-{node}-{i}", "name": "NVIDIA H100 80GB HBM3",
             "pci_bus_id": f"00000000:{i + 16:02X}:00.0", "utilization": 0.0,
             "memory_used_bytes": 512 << 20, "memory_total_bytes": 80 << 30,
             "temperature_c": 35, "power_w": 70.5} for i in range(count)]


class Agents:
    """The simulated agents of one client process, on one ClientSession."""

    def __init__(self, plan: Plan, session: aiohttp.ClientSession) -> None:
        self.plan = plan
        self.session = session
        self.result = ClientResult()
        self.rng = random.Random(plan.seed)

    def _in_window(self, at: float) -> bool:
        return self.plan.window_start <= at < self.plan.window_end

    async def send_events(self, node: str, headers: dict[str, str]) -> None:
        batch = [event(node, str(uuid.uuid4()), "idle_detected", gpu_utilization=0.0)
                 for _ in range(self.rng.randint(1, 3))]
        started = time.monotonic()
        try:
            async with self.session.post(f"{self.plan.url}/api/agent/events", json=batch,
                                         headers=headers) as answer:
                await answer.read()
                ok = answer.status == 200
                if not ok:
                    self.result.errors[f"events {answer.status}"] += 1
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            self.result.errors[f"events: {type(err).__name__}"] += 1
            ok = False
        if ok:
            self.result.event_latencies.append(time.monotonic() - started)
            self.result.events_sent.extend([started] * len(batch))
        elif self._in_window(started):
            self.result.window_errors += 1

    async def beat(self, node: str, headers: dict[str, str], body: dict[str, Any],
                   silenced: bool) -> int | None:
        """One heartbeat, recorded; the next_interval_s answered (None: none, or failed)."""
        started = time.monotonic()
        try:
            async with self.session.post(f"{self.plan.url}/api/agent/status", json=body,
                                         headers=headers) as answer:
                raw = await answer.read()
                status = answer.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            status, raw = 0, type(err).__name__.encode()
        latency = time.monotonic() - started
        result = self.result
        if status != 200:
            result.errors[f"heartbeat {status}: {raw[:120].decode(errors='replace')}"] += 1
            if self._in_window(started):
                result.window_errors += 1
            return None
        result.beats.append(started)
        result.latencies.append(latency)
        if silenced:
            result.last_ok[node] = started
        assigned = json.loads(raw).get("next_interval_s")
        if isinstance(assigned, int) and assigned >= 10:
            result.intervals[assigned] += 1
            return assigned
        return None

    async def node(self, node: str, token: str) -> None:
        """One agent: first beat somewhere in the first interval, then as answered."""
        plan = self.plan
        headers = {"Authorization": f"Bearer {token}"}
        gpus = gpu_list(plan.gpus, node)
        silenced = node in plan.silenced
        mac = "52:54:00:" + ":".join(f"{b:02x}" for b in zlib.crc32(node.encode())
                                     .to_bytes(4, "big")[1:])
        await asyncio.sleep(plan.t0 + self.rng.uniform(0, plan.interval_s) - time.monotonic())
        sequence = 0
        while not (silenced and time.monotonic() >= plan.window_end):
            sequence += 1
            body = heartbeat(node, interval_s=10, sequence=sequence, gpus=0, mac=mac)
            body["gpus"] = gpus
            started = time.monotonic()
            wait_s = await self.beat(node, headers, body, silenced) or plan.interval_s
            if self.rng.randrange(plan.events_every) == 0:
                await self.send_events(node, headers)
            await asyncio.sleep(wait_s * self.rng.uniform(0.9, 1.1)
                                - (time.monotonic() - started))

    async def lag_monitor(self) -> None:
        """The client's own event-loop lag (a busy client inflates its latencies)."""
        step = 0.05
        cpu_start: float | None = None
        while True:
            before = time.monotonic()
            await asyncio.sleep(step)
            now = time.monotonic()
            if self._in_window(now):
                if cpu_start is None:
                    cpu_start = time.process_time()
                self.result.lag.append(now - before - step)
                self.result.window_cpu_s = time.process_time() - cpu_start


async def drive(plan: Plan, stop: MpEvent) -> ClientResult:
    connector = aiohttp.TCPConnector(limit=plan.connections)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        agents = Agents(plan, session)
        tasks = [asyncio.create_task(agents.node(n, t)) for n, t in plan.nodes]
        tasks.append(asyncio.create_task(agents.lag_monitor()))
        while not stop.is_set():
            await asyncio.sleep(0.2)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return agents.result


def client_process(plan: Plan, stop: MpEvent, out: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out.send(asyncio.run(drive(plan, stop)))
    out.close()


# -- measuring ------------------------------------------------------------------------
def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


def get_instances(url: str) -> tuple[list[dict[str, Any]], float]:
    started = time.monotonic()
    request = urllib.request.Request(f"{url}/api/instances",
                                     headers={"Authorization": f"Bearer {ADMIN}"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        body = json.loads(answer.read())
    return body["instances"], time.monotonic() - started


def scrape_metrics(url: str, every_s: float, until: float, out: list[tuple[float, int]]
                   ) -> None:
    """GET /metrics every ``every_s`` (as Prometheus would) until ``until``: (s, bytes)."""
    request = urllib.request.Request(f"{url}/metrics",
                                     headers={"Authorization": f"Bearer {ADMIN}"})
    while time.monotonic() < until:
        started = time.monotonic()
        with urllib.request.urlopen(request, timeout=60) as answer:
            size = len(answer.read())
        out.append((time.monotonic() - started, size))
        time.sleep(max(0.0, every_s - (time.monotonic() - started)))


def sleep_until(at: float) -> None:
    time.sleep(max(0.0, at - time.monotonic()))


@dataclass
class Measured:
    """What one run saw, before it is summed up."""
    window_start: float
    window_end: float
    window_s: float
    lost_phase_end: float
    server_cpu_s: float
    machine_busy_s: float
    db_cpu_s: float | None
    db_bytes: tuple[int, int]  # at the window's start and end
    seen_lost: dict[str, float]
    silenced: frozenset[str]
    polls_s: list[float]
    scrapes: list[tuple[float, int]]
    peak_rss_mib: float
    results: list[ClientResult]


def start_clients(args: argparse.Namespace, url: str, enrolled: list[tuple[str, str]],
                  silenced: frozenset[str], stop: MpEvent
                  ) -> tuple[Plan, list[tuple[BaseProcess, Connection]]]:
    ctx = multiprocessing.get_context("fork")
    t0 = time.monotonic() + 2.0
    window_start = t0 + (args.warmup if args.warmup is not None else args.interval + 5)
    plan = Plan(url=url, nodes=[], silenced=silenced, t0=t0, window_start=window_start,
                window_end=window_start + args.duration, interval_s=args.interval,
                events_every=args.events_every, gpus=args.gpus,
                connections=args.connections, seed=0)
    clients: list[tuple[BaseProcess, Connection]] = []
    for k in range(args.clients):
        mine = replace(plan, nodes=enrolled[k::args.clients], seed=k)
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=client_process, args=(mine, stop, send))
        proc.start()
        clients.append((proc, receive))
    return plan, clients


def measure(args: argparse.Namespace, url: str, server: subprocess.Popen[bytes], db: Database,
            enrolled: list[tuple[str, str]]) -> Measured:
    """The window, then the silence: poll until every silenced node is lost."""
    step = max(1, len(enrolled) // args.silence)
    silenced = frozenset(n for n, _ in enrolled[::step][:args.silence])
    stop = multiprocessing.get_context("fork").Event()
    plan, clients = start_clients(args, url, enrolled, silenced, stop)
    sleep_until(plan.window_start)
    scrapes: list[tuple[float, int]] = []
    if args.scrape_every:
        threading.Thread(target=scrape_metrics, daemon=True, args=(
            url, args.scrape_every, plan.window_end, scrapes)).start()
    cpu0, db0, size0 = cpu_seconds(server.pid), db.cpu_s(), db.size_bytes()
    busy0 = machine_busy_s()
    wall0 = time.monotonic()
    sleep_until(plan.window_end)
    cpu1, db1, size1 = cpu_seconds(server.pid), db.cpu_s(), db.size_bytes()
    busy1 = machine_busy_s()
    window_s = time.monotonic() - wall0
    seen_lost: dict[str, float] = {}
    polls: list[float] = []
    deadline = plan.window_end + LOST_AFTER_INTERVALS * args.interval * 1.1 + GRACE_S + 60
    while len(seen_lost) < len(silenced) and time.monotonic() < deadline:
        rows, took = get_instances(url)
        polls.append(took)
        now = time.monotonic()
        for row in rows:
            if row["instance_id"] in silenced and row["state"] == "lost":
                seen_lost.setdefault(row["instance_id"], now)
        time.sleep(args.poll)
    lost_phase_end = time.monotonic()
    peak_rss_mib = (status_kib(server.pid, "VmHWM") or 0) / 1024
    stop.set()
    results: list[ClientResult] = [receive.recv() for _, receive in clients]
    for proc, _ in clients:
        proc.join(30)
    return Measured(
        window_start=plan.window_start, window_end=plan.window_end, window_s=window_s,
        lost_phase_end=lost_phase_end, server_cpu_s=cpu1 - cpu0, machine_busy_s=busy1 - busy0,
        db_cpu_s=None if db0 is None or db1 is None else db1 - db0, db_bytes=(size0, size1),
        seen_lost=seen_lost, silenced=silenced, polls_s=polls, scrapes=scrapes,
        peak_rss_mib=peak_rss_mib,
        results=results)


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-fleet."))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    max_per_s = math.ceil(args.nodes / args.interval)
    ids = [f"bench-{i:06d}" for i in range(args.nodes)]
    out: dict[str, Any] = {"nodes": args.nodes, "database": args.database,
                           "interval_s": args.interval, "duration_s": args.duration,
                           "max_heartbeats_per_s": max_per_s, "clients": args.clients,
                           "server_log": str(work / "server.log")}
    with database(args.database, work) as db:
        server = start_server(work, db.url, port, max_per_s, args.profile)
        try:
            started = time.monotonic()
            tokens, enrol_lat, enrol_errors = asyncio.run(
                enrol_all(url, ids, args.enrol_concurrency))
            out["enrol_s"] = round(time.monotonic() - started, 1)
            out["enrol_p99_ms"] = round(pct(enrol_lat, 99), 1)
            out["enrol_errors"] = dict(enrol_errors)
            print(f"enrolled {len(tokens)} nodes in {out['enrol_s']} s "
                  f"({len(tokens) / out['enrol_s']:.0f}/s, p99 {out['enrol_p99_ms']} ms)",
                  file=sys.stderr)
            measured = measure(args, url, server, db, [(n, tokens[n]) for n in ids
                                                       if n in tokens])
        finally:
            stop_process(server, timeout_s=60)
    return {**out, **summarize(args, measured)}


def summarize(args: argparse.Namespace, m: Measured) -> dict[str, Any]:
    beats = [(s, lat) for r in m.results for s, lat in zip(r.beats, r.latencies, strict=True)]
    in_window = [lat for s, lat in beats if m.window_start <= s < m.window_end]
    lost_phase = [lat for s, lat in beats if m.window_end <= s < m.lost_phase_end]
    events = sum(1 for r in m.results for s in r.events_sent
                 if m.window_start <= s < m.window_end)
    errors: Counter[str] = Counter()
    intervals: Counter[int] = Counter()
    for r in m.results:
        errors.update(r.errors)
        intervals.update(r.intervals)
    last_ok = {n: t for r in m.results for n, t in r.last_ok.items()}
    to_lost = [m.seen_lost[n] - last_ok[n] for n in m.seen_lost if n in last_ok]
    lag = [x for r in m.results for x in r.lag]
    size0, size1 = m.db_bytes
    return {
        "window_s": round(m.window_s, 1),
        "heartbeats": len(in_window),
        "heartbeats_per_s": round(len(in_window) / m.window_s, 1),
        "events_per_s": round(events / m.window_s, 1),
        "p50_ms": round(pct(in_window, 50), 2),
        "p99_ms": round(pct(in_window, 99), 2),
        "max_ms": round(max(in_window, default=float("nan")) * 1000, 1),
        "mean_ms": round(statistics.fmean(in_window) * 1000, 2) if in_window else None,
        "window_errors": sum(r.window_errors for r in m.results),
        "errors": dict(errors),
        "server_cores": round(m.server_cpu_s / m.window_s, 3),
        "peak_rss_mib": round(m.peak_rss_mib, 1),
        "db_server_cores": None if m.db_cpu_s is None else round(m.db_cpu_s / m.window_s, 3),
        "machine_busy_cores": round(m.machine_busy_s / m.window_s, 3),
        "client_cores": round(sum(r.window_cpu_s for r in m.results) / m.window_s, 3),
        "client_lag_p99_ms": round(pct(lag, 99), 1),
        "db_bytes_start": size0, "db_bytes_end": size1,
        "db_bytes_per_node_day": round((size1 - size0) / (args.nodes * m.window_s / 86400)),
        "next_interval_s_answered": {str(k): v for k, v in sorted(intervals.items())},
        "lost": f"{len(m.seen_lost)}/{len(m.silenced)}",
        "to_lost_max_intervals": round(max(to_lost) / args.interval, 2) if to_lost else None,
        "to_lost_median_intervals": round(statistics.median(to_lost) / args.interval, 2)
        if to_lost else None,
        "lost_limit_intervals": round(LOST_AFTER_INTERVALS + GRACE_S / args.interval, 2),
        "instances_poll_ms_max": round(max(m.polls_s, default=0) * 1000, 1),
        "lost_phase_p99_ms": round(pct(lost_phase, 99), 2),
        "metrics_scrapes": len(m.scrapes),
        "metrics_scrape_ms_max": round(max((t for t, _ in m.scrapes), default=0) * 1000, 1),
        "metrics_bytes": max((b for _, b in m.scrapes), default=0),
    }


COLUMNS = [("nodes", "nodes"), ("database", "db"), ("heartbeats_per_s", "hb/s"),
           ("events_per_s", "ev/s"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
           ("max_ms", "max ms"), ("window_errors", "errors"), ("server_cores", "server cores"),
           ("db_server_cores", "pg cores"), ("peak_rss_mib", "RSS MiB"),
           ("db_bytes_per_node_day", "DB B/node-day"), ("to_lost_max_intervals", "lost after"),
           ("enrol_s", "enrol s")]


def table(rows: list[dict[str, Any]]) -> str:
    cells = [[h for _, h in COLUMNS]] + [["-" if r.get(k) is None else str(r[k])
                                          for k, _ in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
                     for row in cells)


def show_profile(path: Path, top: int) -> None:
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=180,
                        help="seconds measured (after enrolment and one interval)")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--interval", type=int, default=30, help="target heartbeat interval")
    parser.add_argument("--warmup", type=float,
                        help="seconds from the first beats to the window (default: interval + 5)")
    parser.add_argument("--clients", type=int, default=1, help="client processes")
    parser.add_argument("--connections", type=int, default=100,
                        help="keep-alive connections per client process")
    parser.add_argument("--events-every", type=int, default=10,
                        help="one heartbeat in N also sends 1-3 events")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs in each heartbeat")
    parser.add_argument("--silence", type=int, default=100,
                        help="nodes that stop at the end, to time `lost`")
    parser.add_argument("--poll", type=float, default=1.0,
                        help="seconds between GET /api/instances polls")
    parser.add_argument("--enrol-concurrency", type=int, default=32)
    parser.add_argument("--scrape-every", type=float, default=0,
                        help="scrape /metrics every S seconds in the window, as Prometheus "
                        "would (0: not at all)")
    parser.add_argument("--profile", type=Path, help="run the server under cProfile, to PATH")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()
    result = run(args)
    print(table([result]))
    print(f"p99 during the lost phase (GET /api/instances polled, slowest "
          f"{result['instances_poll_ms_max']} ms): {result['lost_phase_p99_ms']} ms; "
          f"client cores {result['client_cores']}, whole machine busy "
          f"{result['machine_busy_cores']} of {os.cpu_count()} cores, client loop lag p99 "
          f"{result['client_lag_p99_ms']} ms; next_interval_s answered "
          f"{result['next_interval_s_answered']}; lost {result['lost']}, median "
          f"{result['to_lost_median_intervals']} intervals (limit "
          f"{result['lost_limit_intervals']} + 1 s tick + {args.poll:g} s poll)")
    if result["errors"]:
        print(f"errors (all phases): {result['errors']}")
    if result["nodes"] >= 10000:
        goal = result["p99_ms"] < 50 and result["server_cores"] < 1
        print(f"goal (10,000 nodes, p99 < 50 ms, server < 1 core): "
              f"{'met' if goal else 'not met'}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.profile:
        show_profile(args.profile, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
