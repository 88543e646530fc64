"""A memory hog in a memory cgroup of its own, and what the node's swap did meanwhile.

The hog (``HOG``, run with ``sys.executable``) grows its anonymous memory at RATE MiB/s
of wall-clock time, in steps of STEP s, writing every page (random bytes with the page's
number stamped in, so no two pages are alike), up to TARGET MiB; then it prints
``reached`` and exits 0. ``run_hog`` runs it in a ``hog_cgroup`` (256 MiB of memory, swap
unlimited: the node's swap is its only way past the limit) and samples /proc/meminfo,
/proc/swaps and PSI every ~50 ms in a thread. ``running_agent`` runs the real
`clusterctl agent run` beside it. Used by tests/test_memory_hog.py and
scripts/bench/memory_hog.py; root only, pytest-free.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 2**20
LIMIT_MIB = 256
CGROUP_ROOT = Path("/sys/fs/cgroup")
FAKE_NVML_DIR = Path(__file__).parent / "fakes" / "nvml"
AGENT_UNIT = "clusterctl-agent.service"

HOG = r"""
import mmap, os, struct, sys, time
rate_mib_s, target_mib, step_s = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
MIB, PAGE, CHUNK = 2**20, mmap.PAGESIZE, 4 * 2**20
seed = os.urandom(MIB)
held, done, page_no, reported = [], 0, 1, 0
target = target_mib * MIB
start = time.monotonic()
step = 0
while done < target:
    step += 1
    wake = start + step * step_s
    pause = wake - time.monotonic()
    if pause > 0:
        time.sleep(pause)
    due = min(target, int(rate_mib_s * MIB * (time.monotonic() - start)))
    while done < due:
        size = min(CHUNK, due - done)
        size -= size % PAGE
        if size <= 0:
            break
        area = mmap.mmap(-1, size)
        for off in range(0, size, MIB):
            area[off:off + min(MIB, size - off)] = seed[:min(MIB, size - off)]
        for off in range(0, size, PAGE):
            struct.pack_into("<Q", area, off, page_no)
            page_no += 1
        held.append(area)
        done += size
    if done // MIB >= reported + 64:
        reported = done // MIB
        print(f"mib {reported} {time.monotonic() - start:.2f}", flush=True)
print(f"reached {done // MIB} {time.monotonic() - start:.2f}", flush=True)
"""


class HogUnavailable(Exception):
    """This machine cannot run the hog (not root, no memory controller); says why."""


# -- the cgroup ------------------------------------------------------------------------


@dataclass(frozen=True)
class HogGroup:
    """The hog's memory cgroup and, on a hybrid host, its cgroup2 twin (for PSI).

    ``name`` is the path relative to the hierarchy root, as ``[swap] watch_cgroups``
    takes it."""

    name: str
    memory: Path  # v1 memory group, or the v2 group
    unified: Path | None  # the cgroup2 group with memory.pressure (v2: == memory)
    v1: bool

    def procs_files(self) -> list[Path]:
        files = [self.memory / "cgroup.procs"]
        if self.unified is not None and self.unified != self.memory:
            files.append(self.unified / "cgroup.procs")
        return files

    def pressure_file(self) -> Path | None:
        if self.unified is None:
            return None
        path = self.unified / "memory.pressure"
        return path if path.exists() else None

    def oom_kills(self) -> int | None:
        """The kernel's count of OOM kills in this group (v1 oom_control, v2 events)."""
        name, key = ("memory.oom_control", "oom_kill") if self.v1 else ("memory.events",
                                                                         "oom_kill")
        return _keyed(self.memory / name).get(key)

    def failcnt(self) -> int | None:
        """v1: how often usage hit the limit (None on v2)."""
        return _read_int(self.memory / "memory.failcnt") if self.v1 else None

    def usage_bytes(self) -> tuple[int | None, int | None]:
        """(memory in RAM, memory in swap) charged to the group."""
        if self.v1:
            ram = _read_int(self.memory / "memory.usage_in_bytes")
            both = _read_int(self.memory / "memory.memsw.usage_in_bytes")
            return ram, None if ram is None or both is None else max(0, both - ram)
        return (_read_int(self.memory / "memory.current"),
                _read_int(self.memory / "memory.swap.current"))


def cgroup_problem(root: Path = CGROUP_ROOT) -> str | None:
    """Why ``hog_cgroup`` cannot work here, or None."""
    if os.geteuid() != 0:
        return "needs root to make memory cgroups"
    if (root / "memory/memory.limit_in_bytes").exists():
        return None
    controllers = root / "cgroup.subtree_control"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return None
    return f"no memory cgroup controller under {root} (neither v1 memory nor v2 memory)"


@contextlib.contextmanager
def hog_cgroup(tag: str, limit_mib: int = LIMIT_MIB, root: Path = CGROUP_ROOT
               ) -> Iterator[HogGroup]:
    """A fresh memory cgroup limited to ``limit_mib`` (swap not limited): v1 memory plus a
    cgroup2 group of the same name under ``root/unified`` where there is one, or a v2
    group with memory.max; its processes killed and the groups removed afterwards."""
    problem = cgroup_problem(root)
    if problem:
        raise HogUnavailable(problem)
    name = f"clusterctl-{tag}-{os.getpid()}"
    made: list[Path] = []
    try:
        if (root / "memory/memory.limit_in_bytes").exists():
            memory = root / "memory" / name
            memory.mkdir()
            made.append(memory)
            (memory / "memory.limit_in_bytes").write_text(f"{limit_mib * MIB}\n")
            unified: Path | None = None
            if (root / "unified/cgroup.procs").exists():
                unified = root / "unified" / name
                unified.mkdir()
                made.append(unified)
            group = HogGroup(name, memory, unified, v1=True)
        else:
            memory = root / name
            memory.mkdir()
            made.append(memory)
            (memory / "memory.max").write_text(f"{limit_mib * MIB}\n")
            group = HogGroup(name, memory, memory, v1=False)
        yield group
    finally:
        for path in reversed(made):
            _remove_group(path)


def _remove_group(path: Path) -> None:
    for _ in range(100):  # a killed process takes a moment to leave
        with contextlib.suppress(OSError):
            for pid in (path / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)


# -- reading the node ------------------------------------------------------------------


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _keyed(path: Path) -> dict[str, int]:
    """A "key value" per line file (memory.oom_control, memory.events)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


def swap_used_bytes(root: Path = Path("/")) -> int:
    fields: dict[str, int] = {}
    for line in (root / "proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("SwapTotal", "SwapFree"):
            fields[key] = int(rest.split()[0]) * 1024
    return fields.get("SwapTotal", 0) - fields.get("SwapFree", 0)


def swap_areas(root: Path = Path("/")) -> dict[str, int]:
    """Every active swap area: path -> size in bytes (/proc/swaps leaves out the header
    page; put back, it is the file's size)."""
    page = os.sysconf("SC_PAGE_SIZE")
    out = {}
    for line in (root / "proc/swaps").read_text().splitlines()[1:]:
        parts = line.split()
        out[parts[0].replace("\\040", " ")] = int(parts[2]) * 1024 + page
    return out


def swaps_under(directory: Path, root: Path = Path("/")) -> dict[str, int]:
    """Active swap areas under ``directory``: path -> size in bytes."""
    return {path: size for path, size in swap_areas(root).items()
            if path.startswith(f"{directory}/")}


def psi(path: Path | None) -> tuple[float | None, int | None]:
    """(full avg10 %, some total µs) from a memory.pressure-shaped file."""
    if path is None:
        return None, None
    try:
        text = path.read_text()
    except OSError:
        return None, None
    full: float | None = None
    some: int | None = None
    for line in text.splitlines():
        kind, *pairs = line.split()
        values = dict(p.split("=", 1) for p in pairs)
        if kind == "full" and "avg10" in values:
            full = float(values["avg10"])
        if kind == "some" and "total" in values:
            some = int(values["total"])
    return full, some


# -- the run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    t_s: float  # since the hog started
    swap_used_bytes: int  # on the node (/proc/meminfo)
    managed_bytes: int  # active swap areas under the swap dir
    managed_files: int
    foreign_bytes: int  # active swap areas elsewhere (another test's, the host's)
    hog_ram_bytes: int | None
    hog_swap_bytes: int | None
    psi_full_avg10_system: float | None
    psi_full_avg10_cgroup: float | None
    cgroup_some_total_us: int | None
    failcnt: int | None


@dataclass(frozen=True)
class HogResult:
    rate_mib_s: float
    target_mib: int
    survived: bool  # exit 0, having printed "reached"
    oom_killed: bool  # SIGKILL, or the group's oom_kill count rose
    exit_status: int  # Popen's returncode: -9 when killed
    timed_out: bool
    seconds: float
    reached_mib: int  # the last progress it printed
    oom_kills: int | None
    initial_managed_bytes: int
    peak_managed_bytes: int
    peak_swap_used_bytes: int  # the node's, all areas
    peak_hog_swap_bytes: int | None  # charged to the hog's group
    peak_foreign_swap_bytes: int  # swap not under the swap dir: the hog may use it too
    first_stall_s: float | None  # cgroup PSI some total first rising (v1: failcnt)
    first_new_file_s: float | None  # a new swap file under the swap dir first active
    stall_to_new_file_s: float | None
    peak_psi_full_avg10_system: float | None
    peak_psi_full_avg10_cgroup: float | None
    new_files: tuple[str, ...]
    output: str
    timeline: tuple[Sample, ...] = field(repr=False)

    def row(self) -> dict[str, Any]:
        """The figures, JSON-ready, without the timeline."""
        return {k: v for k, v in self.__dict__.items() if k != "timeline"}

    def timeline_rows(self) -> list[dict[str, Any]]:
        return [dict(s.__dict__) for s in self.timeline]


class _Sampler(threading.Thread):
    def __init__(self, group: HogGroup, swap_dir: Path, started: float, period_s: float
                 ) -> None:
        super().__init__(daemon=True, name="hog-sampler")
        self.group, self.swap_dir, self.started, self.period_s = (group, swap_dir, started,
                                                                  period_s)
        self.samples: list[Sample] = []
        self.initial = set(swaps_under(swap_dir))
        self.new_files: list[str] = []
        self.first_new_file_s: float | None = None
        self.first_stall_s: float | None = None
        self.first_failcnt_s: float | None = None
        self.done = threading.Event()
        self._stall0 = psi(group.pressure_file())[1]
        self._fail0 = group.failcnt()

    def run(self) -> None:
        while not self.done.is_set():
            self.take()
            self.done.wait(self.period_s)
        self.take()

    def take(self) -> None:
        t = time.monotonic() - self.started
        every = swap_areas()
        areas = {p: n for p, n in every.items() if p.startswith(f"{self.swap_dir}/")}
        for path in areas:
            if path not in self.initial and path not in self.new_files:
                self.new_files.append(path)
                if self.first_new_file_s is None:
                    self.first_new_file_s = t
        cg_full, cg_some = psi(self.group.pressure_file())
        fail = self.group.failcnt()
        if (self.first_stall_s is None and cg_some is not None and self._stall0 is not None
                and cg_some > self._stall0):
            self.first_stall_s = t
        if (self.first_failcnt_s is None and fail is not None and self._fail0 is not None
                and fail > self._fail0):
            self.first_failcnt_s = t
        ram, swapped = self.group.usage_bytes()
        self.samples.append(Sample(
            t_s=round(t, 3), swap_used_bytes=swap_used_bytes(),
            managed_bytes=sum(areas.values()), managed_files=len(areas),
            foreign_bytes=sum(every.values()) - sum(areas.values()),
            hog_ram_bytes=ram, hog_swap_bytes=swapped,
            psi_full_avg10_system=psi(Path("/proc/pressure/memory"))[0],
            psi_full_avg10_cgroup=cg_full, cgroup_some_total_us=cg_some, failcnt=fail))


def run_hog(group: HogGroup, swap_dir: Path, *, rate_mib_s: float, target_mib: int,
            workdir: Path, step_s: float = 0.05, sample_s: float = 0.05,
            timeout_s: float | None = None) -> HogResult:
    """The hog in ``group`` until it exits (or ``timeout_s``), with the node sampled."""
    timeout = timeout_s if timeout_s is not None else 3 * target_mib / rate_mib_s + 60
    out_path = workdir / f"hog-{rate_mib_s:g}-{target_mib}.out"
    kills0 = group.oom_kills() or 0
    join = " && ".join(f'echo $$ > "${i + 1}"' for i in range(len(group.procs_files())))
    n = len(group.procs_files())
    command = ["sh", "-c", f'{join} && shift {n} && exec "$@"', "sh",
               *map(str, group.procs_files()),
               sys.executable, "-c", HOG, str(rate_mib_s), str(target_mib), str(step_s)]
    with out_path.open("w") as out:
        started = time.monotonic()
        sampler = _Sampler(group, swap_dir, started, sample_s)
        hog = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        sampler.start()
        timed_out = False
        try:
            hog.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            hog.kill()
            hog.wait()
        finally:
            seconds = time.monotonic() - started
            sampler.done.set()
            sampler.join()
    output = out_path.read_text(errors="replace")
    reached = 0
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("mib", "reached") and parts[1].isdigit():
            reached = int(parts[1])
    kills = group.oom_kills()
    killed_by_oom = (not timed_out and hog.returncode == -signal.SIGKILL) or (
        kills is not None and kills > kills0)
    samples = sampler.samples
    stall = sampler.first_stall_s if group.pressure_file() else sampler.first_failcnt_s
    first_new = sampler.first_new_file_s
    return HogResult(
        rate_mib_s=rate_mib_s, target_mib=target_mib,
        survived=hog.returncode == 0 and "reached" in output,
        oom_killed=killed_by_oom, exit_status=hog.returncode if hog.returncode is not None
        else -1, timed_out=timed_out, seconds=round(seconds, 2), reached_mib=reached,
        oom_kills=None if kills is None else kills - kills0,
        initial_managed_bytes=samples[0].managed_bytes if samples else 0,
        peak_managed_bytes=max((s.managed_bytes for s in samples), default=0),
        peak_swap_used_bytes=max((s.swap_used_bytes for s in samples), default=0),
        peak_hog_swap_bytes=_peak_int(s.hog_swap_bytes for s in samples),
        peak_foreign_swap_bytes=max((s.foreign_bytes for s in samples), default=0),
        first_stall_s=stall, first_new_file_s=first_new,
        stall_to_new_file_s=None if stall is None or first_new is None
        else round(first_new - stall, 3),
        peak_psi_full_avg10_system=_peak(s.psi_full_avg10_system for s in samples),
        peak_psi_full_avg10_cgroup=_peak(s.psi_full_avg10_cgroup for s in samples),
        new_files=tuple(sampler.new_files), output=output[-4000:],
        timeline=tuple(samples))


def _peak_int(values: Iterator[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _peak(values: Iterator[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


# -- the product: its config, `swap auto`, the agent -------------------------------------


def clusterctl(*args: str, env: dict[str, str] | None = None, timeout_s: float = 120
               ) -> subprocess.CompletedProcess[str]:
    """The CLI of this checkout, as the tests run it (python -m clusterctl)."""
    return subprocess.run([sys.executable, "-m", "clusterctl", *args], capture_output=True,
                          text=True, timeout=timeout_s, check=False, env=_env(env))


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CLUSTERCTL_CONFIG", "JOURNAL_STREAM", "NOTIFY_SOCKET",
                        "WATCHDOG_USEC", "WATCHDOG_PID")}
    env.update(extra or {})
    return env


def knows_key(section: str, key: str, value: str) -> bool:
    """Whether this checkout's config takes ``[section] key = value`` (a new key)."""
    from clusterctl import config as cfg

    _config, errors = cfg.parse(f"[{section}]\n{key} = {value}\n", path="probe.toml")
    return not any("unknown key" in e.one_line() for e in errors)


def node_config(workdir: Path, swap_dir: Path, *, port: int, min_size: str = "256M",
                increment: str = "256M", max_size: str = "2G",
                watch_cgroups: list[str] | None = None, extra_swap: str = "") -> Path:
    """The config a node with the hog would have: swap under the test's loop mount,
    everything else the agent writes under ``workdir``."""
    watch = ("" if watch_cgroups is None
             else f"watch_cgroups = {json.dumps(watch_cgroups)}\n")
    conf = workdir / "clusterctl.toml"
    conf.write_text(
        f'[swap]\ndir = "{swap_dir}"\nmin_size = "{min_size}"\nincrement = "{increment}"\n'
        f'max_size = "{max_size}"\n{watch}{extra_swap}'
        f'[api]\nlisten = "127.0.0.1:{port}"\n'
        f'[paths]\nstate_dir = "{workdir / "state"}"\nrun_dir = "{workdir / "run"}"\n'
        '[ollama]\nurl = "http://127.0.0.1:9"\n')
    return conf


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class AgentProcess:
    process: subprocess.Popen[bytes]
    log: Path
    state_dir: Path
    group: Path | None  # the cgroup2 group it runs in ("as its unit")

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.state_dir)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _agent_group(tag: str, root: Path = CGROUP_ROOT) -> Path | None:
    """A cgroup2 group ending in clusterctl-agent.service, so the agent finds itself
    running as its unit (own_unit reads /proc/self/cgroup) and owns the swap policy as
    it does under systemd; None where there is no cgroup2 hierarchy."""
    for base in (root / "unified", root):
        if (base / "cgroup.procs").exists() and (base / "cgroup.controllers").exists():
            return base / f"clusterctl-{tag}-{os.getpid()}" / AGENT_UNIT
    return None


@contextlib.contextmanager
def running_agent(conf: Path, workdir: Path, *, as_unit: bool = True,
                  ready_timeout_s: float = 30) -> Iterator[AgentProcess]:
    """`clusterctl agent run --config conf` in a process of its own (no GPUs: the fake
    NVML with none), up once its API answers; SIGTERM and its groups removed after."""
    from clusterctl import config as cfg

    config = cfg.load(conf).config
    scenario = workdir / "no-gpus.json"
    scenario.write_text('{"gpus": []}')
    path = os.pathsep.join(p for p in (str(FAKE_NVML_DIR), os.environ.get("PYTHONPATH", ""))
                           if p)
    env = _env({"PYTHONPATH": path, "FAKE_NVML_SCENARIO": str(scenario)})
    group = _agent_group("hog-agent") if as_unit else None
    made: list[Path] = []
    if group is not None:
        group.parent.mkdir()
        made.append(group.parent)
        group.mkdir()
        made.append(group)
    log_path = workdir / "agent.log"
    command = [sys.executable, "-m", "clusterctl", "agent", "run", "--config", str(conf),
               "-v"]
    if group is not None:
        command = ["sh", "-c", 'echo $$ > "$1" && shift && exec "$@"', "sh",
                   str(group / "cgroup.procs"), *command]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                   env=env)
    agent = AgentProcess(process, log_path, config.paths.state_dir, group)
    try:
        _wait_for_api(agent, config.api.listen, ready_timeout_s)
        yield agent
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for made_path in reversed(made):
            _remove_group(made_path)


def _wait_for_api(agent: AgentProcess, listen: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if agent.process.poll() is not None:
            raise RuntimeError(f"the agent exited {agent.process.returncode}:\n"
                               f"{agent.log_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://{listen}/healthz", timeout=1) as response:
                response.read()
            return
        except urllib.error.HTTPError:
            return  # it answers: up (unhealthy without GPUs is still up)
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the agent's API did not answer in {timeout_s:g} s:\n"
                       f"{agent.log_text()[-3000:]}")


def read_events(state_dir: Path) -> list[dict[str, Any]]:
    """The event log (events.jsonl under the state dir), oldest first."""
    path = state_dir / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def swap_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if str(e.get("event_type", "")).startswith("swap_")]
