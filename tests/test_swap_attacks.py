"""Hostile and odd input to the swap work that saves the process: config values at their
edges, cgroup files with garbage, counters that go down, names that escape the hierarchy,
groups that vanish or come back, thousands of groups, a swap loop fed a clock that goes
back, a truncated /proc/meminfo, descriptors exhausted while arming, and systemd-oomd
files that are FIFOs, symlink loops or huge. Each attack asserts what a user would see:
no crash, no write outside the cgroup tree, no swap grown for nothing, no signal lost."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from clusterctl.agent import service
from clusterctl.agent.service import Agent
from clusterctl.config import parse
from clusterctl.host import cgroups as cg
from clusterctl.host import oomd
from clusterctl.host.cgroups import CgroupWatch, read_layout, swap_cap_of
from clusterctl.host.nvml import Nvml
from clusterctl.swap.policy import Signal, SwapTrend, plan_auto, swap_rate, swap_shortage
from tests.conftest import load_fake_nvml, quiet_host, wait_until
from tests.fakes.control_plane import free_port
from tests.hosttree import HostTree
from tests.test_host_cgroups import _require_hybrid, _v1_counters, v1_host, v2_host
from tests.test_oomd import oomd_findings, watching, with_free_threshold
from tests.test_swap_policy import SMALL, quarter, snapshot

MIB = 2**20
GIB = 2**30
NOW = 1_800_000_000.0


def _v2_events(tree: HostTree, name: str, text: str) -> None:
    tree.file(f"sys/fs/cgroup/{name}/memory.events.local", text)


def _kinds(signals: tuple[cg.CgroupSignal, ...]) -> list[tuple[str, str, int]]:
    return [(s.cgroup, s.kind, s.count) for s in signals]


@contextlib.contextmanager
def armed(watch: CgroupWatch) -> Iterator[tuple[str, ...]]:
    try:
        yield watch.arm()
    finally:
        watch.close()


# ---------------------------------------------------------------------------
# hostile cgroup files (fixture trees)


@pytest.mark.parametrize("garbage", [
    "max ²\noom_kill 1\n",  # a unicode digit: str.isdigit() says yes, int() says no
    "max ١٢\n",  # Arabic-Indic digits
    "max -5\noom 18446744073709551615\n",
    "\x00\xff\xfe binary \n max\n=\n",
    "",
])
def test_memory_events_with_garbage_never_raise_and_only_ascii_counts_count(
        tmp_path: Path, garbage: str) -> None:
    tree = v2_host(tmp_path)
    _v2_events(tree, "system.slice/web.service", "max 1\noom 0\noom_kill 0\n")
    watch = CgroupWatch(["system.slice/web.service"], 10, root=tmp_path)
    with armed(watch):
        assert watch.signals(()) == ()
        (tmp_path / "sys/fs/cgroup/system.slice/web.service/memory.events.local").write_bytes(
            garbage.encode("utf-8", errors="surrogateescape"))
        got = watch.signals(())  # must not raise: the agent calls this twice a second
        assert [s for s in got if s.kind == "max"] == []
        if "18446744073709551615" in garbage:  # a huge count is a count
            assert ("system.slice/web.service", "oom", 18446744073709551615) in _kinds(got)


def test_v1_counters_that_are_garbage_keep_the_last_counts(tmp_path: Path) -> None:
    tree = v1_host(tmp_path)
    _v1_counters(tree, "system.slice", failcnt=5)
    base = tmp_path / "sys/fs/cgroup/memory/system.slice"
    watch = CgroupWatch(["system.slice"], 10, root=tmp_path)
    with armed(watch):
        assert watch.signals(()) == ()
        for failcnt in ("-3\n", "²\n", "lots\n", "", "5 6\n"):
            (base / "memory.failcnt").write_text(failcnt)
            assert [s for s in watch.signals(()) if s.kind == "max"] == []
        (base / "memory.failcnt").write_text("7\n")
        assert _kinds(watch.signals(())) == [("system.slice", "max", 2)]


def test_a_counter_that_goes_down_is_a_group_made_again_and_its_new_counts_are_signals(
        tmp_path: Path) -> None:
    """db.service restarts: systemd removes its cgroup and makes it again, counters from 0.
    An OOM kill in the new group before the next call must not be lost to the old,
    higher count."""
    tree = v2_host(tmp_path)
    _v2_events(tree, "system.slice", "max 0\n")
    _v2_events(tree, "system.slice/db.service", "max 100\noom 4\noom_kill 4\n")
    watch = CgroupWatch(["system.slice"], 10, root=tmp_path)
    with armed(watch):
        assert watch.signals(()) == ()
        _v2_events(tree, "system.slice/db.service", "max 3\noom 1\noom_kill 1\n")
        got = _kinds(watch.signals(()))
        assert ("system.slice/db.service", "oom_kill", 1) in got
        assert ("system.slice/db.service", "max", 3) in got


def test_swap_max_and_memsw_that_are_odd_or_unreadable_are_no_cap(tmp_path: Path) -> None:
    tree = v2_host(tmp_path)
    layout = read_layout(tmp_path)
    base = "sys/fs/cgroup/system.slice/web.service"
    for text, capped in (("0\n", True), ("max\n", False), ("garbage\n", False), ("", False),
                         ("00\n", False), ("-1\n", False), ("0 0\n", False)):
        tree.file(f"{base}/memory.swap.max", text)
        cap = swap_cap_of(layout, "system.slice/web.service", root=tmp_path)
        assert (cap is not None) == capped, text
    # v1: memsw unreadable (a directory where the file should be): no cap, no error
    tree = v1_host(tmp_path / "v1")
    memsw = tmp_path / "v1/sys/fs/cgroup/memory/system.slice/db.service/memory.memsw.limit_in_bytes"
    memsw.unlink()
    memsw.mkdir()
    assert swap_cap_of(read_layout(tmp_path / "v1"), "system.slice/db.service",
                       root=tmp_path / "v1") is None


def test_a_tree_deeper_than_the_walk_and_wider_than_its_budget_is_read_in_bounds(
        tmp_path: Path) -> None:
    tree = v2_host(tmp_path)
    deep = "system.slice/" + "/".join(f"d{i}" for i in range(40))
    _v2_events(tree, deep, "max 0\n")
    _v2_events(tree, "system.slice", "max 0\n")
    for i in range(2 * cg.SUBTREE_NODES):
        _v2_events(tree, f"system.slice/w{i:04d}.service", "max 0\n")
    watch = CgroupWatch(["system.slice"], 10, root=tmp_path)
    with armed(watch):
        watch.signals(())
        nodes = watch._groups[0].nodes
        assert nodes is not None and len(nodes) <= cg.SUBTREE_NODES
        assert max(n.name.count("/") for n in nodes) <= cg.SUBTREE_DEPTH


def test_thousands_of_groups_keep_a_signals_call_cheap(tmp_path: Path) -> None:
    """The agent calls signals() every 0.5 s: with 3 watched groups of 2,000 services
    each (each read capped at SUBTREE_NODES), a call, rescans included, stays well under
    the period."""
    tree = v2_host(tmp_path)
    watched = ["system.slice", "user.slice", "machine.slice"]
    for top in watched:
        _v2_events(tree, top, "max 0\noom 0\noom_kill 0\n")
        for i in range(2000):
            _v2_events(tree, f"{top}/g{i:04d}.service", "max 0\noom 0\noom_kill 0\n")
    watch = CgroupWatch(watched, 10, root=tmp_path)
    with armed(watch):
        started = time.perf_counter()
        calls = 2 * cg.RESCAN_CALLS
        for _ in range(calls):
            watch.signals(())
        per_call_s = (time.perf_counter() - started) / calls
    print(f"signals() with 3 x 2000 groups: {per_call_s * 1000:.1f} ms a call")
    assert per_call_s < 0.1


def test_a_hundred_watched_groups_of_hundreds_each_keep_a_signals_call_cheap(
        tmp_path: Path) -> None:
    """watch_cgroups has no length limit: 100 watched slices of 300 services each share
    WATCH_NODES reads a call, each watched group read itself."""
    tree = v2_host(tmp_path)
    names = [f"system.slice/t{g:03d}.slice" for g in range(100)]
    for name in names:
        _v2_events(tree, name, "max 0\n")
        for i in range(300):
            _v2_events(tree, f"{name}/c{i:03d}.service", "max 0\n")
    watch = CgroupWatch(names, 10, root=tmp_path)
    with armed(watch):
        watch.signals(())
        started = time.perf_counter()
        calls = 2 * cg.RESCAN_CALLS
        for _ in range(calls):
            watch.signals(())
        per_call_s = (time.perf_counter() - started) / calls
        nodes = [n for g in watch._groups for n in g.nodes or ()]
        assert {n.name for n in nodes} >= set(names)  # each watched group reads itself
        for name in names:  # an OOM kill in any watched group is still seen
            _v2_events(tree, name, "max 0\noom_kill 1\n")
        assert len([s for s in watch.signals(()) if s.kind == "oom_kill"]) == 100
    print(f"signals() with 100 x 300 groups: {per_call_s * 1000:.1f} ms a call, "
          f"{len(nodes)} groups read")
    assert len(nodes) <= cg.WATCH_NODES + len(names)
    assert per_call_s < 0.1


# ---------------------------------------------------------------------------
# hostile config: watch_cgroups


def test_a_name_too_long_for_the_kernel_is_said_and_the_others_are_still_watched(
        tmp_path: Path) -> None:
    tree = v2_host(tmp_path)
    tree.file("sys/fs/cgroup/system.slice/memory.pressure", "")
    long_part = "x" * 300  # over NAME_MAX: ENAMETOOLONG from stat(2)
    very_long = "/".join(["y" * 200] * 30)  # over PATH_MAX
    watch = CgroupWatch([long_part, very_long, "system.slice"], 10, root=tmp_path)
    with armed(watch) as lines:
        assert watch.watched == ("system.slice",)
        assert len(lines) == 2 and all("no such cgroup" in line for line in lines)


def test_unicode_and_hundreds_of_names_are_said_once_each_without_error(
        tmp_path: Path) -> None:
    tree = v2_host(tmp_path)
    tree.file("sys/fs/cgroup/system.slice/memory.pressure", "")
    names = [f"tenant-ü-雪-{i}.slice" for i in range(300)] + ["system.slice"]
    watch = CgroupWatch(names, 10, root=tmp_path)
    with armed(watch) as lines:
        assert watch.watched == ("system.slice",)
        assert len(lines) == 300 and lines[0].startswith("tenant-ü-雪-0.slice: no such cgroup")


def test_a_watched_name_that_is_a_symlink_out_of_the_hierarchy_is_not_armed(
        tmp_path: Path) -> None:
    """Nothing is written through a link that leads out of the cgroup tree: not the PSI
    trigger, not the v1 event registration."""
    tree = v1_host(tmp_path / "host")
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "cgroup.event_control"
    victim.write_text("precious\n")
    (outside / "memory.pressure").write_text("precious\n")
    (outside / "memory.pressure_level").write_text("")
    (outside / "memory.failcnt").write_text("0\n")
    (outside / "memory.oom_control").write_text("oom_kill 0\n")
    for hierarchy in ("sys/fs/cgroup/memory", "sys/fs/cgroup/unified"):
        (tmp_path / "host" / hierarchy / "evil").symlink_to(outside)
    _v1_counters(tree, "system.slice")
    watch = CgroupWatch(["evil", "system.slice"], 10, root=tmp_path / "host")
    with armed(watch) as lines:
        assert watch.watched == ("system.slice",)
        assert any(line.startswith("evil: ") for line in lines)
    assert victim.read_text() == "precious\n"
    assert (outside / "memory.pressure").read_text() == "precious\n"


def test_a_symlinked_child_is_not_walked(tmp_path: Path) -> None:
    tree = v2_host(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "memory.events.local").write_text("max 0\n")
    _v2_events(tree, "system.slice", "max 0\n")
    (tmp_path / "sys/fs/cgroup/system.slice/link.service").symlink_to(outside)
    watch = CgroupWatch(["system.slice"], 10, root=tmp_path)
    with armed(watch):
        watch.signals(())
        (outside / "memory.events.local").write_text("max 50\n")
        assert all(s.cgroup != "system.slice/link.service"
                   for _ in range(cg.RESCAN_CALLS) for s in watch.signals(()))


def test_a_cgroup_name_that_is_a_regular_file_is_no_cgroup(tmp_path: Path) -> None:
    v2_host(tmp_path)
    watch = CgroupWatch(["system.slice/memory.swap.max", "system.slice/cgroup.events/x"],
                        10, root=tmp_path)
    with armed(watch) as lines:
        assert watch.watched == ()
        assert all("no such cgroup" in line for line in lines) and len(lines) == 2


def test_a_v1_group_removed_after_arming_is_no_pressure(tmp_path: Path) -> None:
    """The kernel signals a v1 pressure_level eventfd when its group is removed: that is
    not memory pressure, also where the group's cgroup2 twin is still there."""
    tree = v1_host(tmp_path)
    _v1_counters(tree, "system.slice")
    tree.file("sys/fs/cgroup/unified/system.slice/memory.pressure", "")
    watch = CgroupWatch(["system.slice"], 10, root=tmp_path)
    with armed(watch):
        assert watch.signals(()) == ()
        efd = next(fd for fd, mask in watch.fds().items() if mask == select.POLLIN)
        base = tmp_path / "sys/fs/cgroup/memory/system.slice"
        for child in base.rglob("*"):
            if child.is_file():
                child.unlink()
        for child in sorted(base.rglob("*"), reverse=True):
            child.rmdir()
        base.rmdir()
        os.eventfd_write(efd, 1)  # what rmdir does to a registered eventfd
        assert [s for s in watch.signals([efd]) if s.kind == "pressure"] == []
        assert watch.watched == ("system.slice",)  # still there in cgroup2 (its PSI)


@pytest.mark.integration
def test_a_watched_group_made_again_is_watched_again(tmp_path: Path) -> None:
    """A watched service restarts: its cgroups are removed and made again under the same
    name. The watch must follow the new group (its PSI trigger armed on it), not keep a
    trigger torn down with the old one."""
    layout, unified = _require_hybrid()
    assert layout.v1_memory is not None
    name = f"clusterctl-attack-{os.getpid()}"
    groups = [layout.v1_memory / name, unified / name]
    for group in groups:
        group.mkdir()
    watch = CgroupWatch([name], 10)
    try:
        assert watch.arm() == ()
        watch.signals(())
        for group in groups:
            group.rmdir()
        for group in groups:
            group.mkdir()
        got = watch.signals(_poll(watch)) + watch.signals(_poll(watch))
        # the old trigger's POLLERR is no pressure (its fd number may be the new one's)
        assert [s for s in got if s.kind == "pressure"] == []
        masks = watch.fds()
        assert select.POLLPRI in masks.values(), "the PSI trigger was lost"
        assert select.POLLIN in masks.values(), "the pressure_level event was lost"
        poller = select.poll()
        for fd, mask in masks.items():
            poller.register(fd, mask)
        bad = select.POLLERR | select.POLLNVAL | select.POLLHUP
        assert [m for _fd, m in poller.poll(0) if m & bad] == [], "armed on the old group"
    finally:
        watch.close()
        for group in groups:
            with contextlib.suppress(OSError):
                group.rmdir()


def _poll(watch: CgroupWatch) -> set[int]:
    poller = select.poll()
    for fd, mask in watch.fds().items():
        poller.register(fd, mask)
    return {fd for fd, _mask in poller.poll(100)}


# ---------------------------------------------------------------------------
# the planner fed extreme rates, thresholds and shrinking swap


def test_a_huge_rate_never_asks_for_more_than_max_size() -> None:
    files = [quarter("swap-0001", 200, 1)]
    for rate in (1e12, 1e18, 1e300):
        facts = replace(snapshot(files=files), trend=SwapTrend(rate, online_s=0.5))
        plan = plan_auto(facts, SMALL, NOW)
        grown = sum(a.size_bytes for a in plan.actions if a.kind == "create")
        assert 256 * MIB + grown <= SMALL.max_size_bytes
        assert grown == SMALL.max_size_bytes - 256 * MIB


def test_a_clock_that_goes_back_gives_no_rate() -> None:
    assert swap_rate([(10.0, 0), (11.0, GIB), (3.0, 2 * GIB)]) is None
    assert swap_rate([(10.0, 0), (10.0, GIB)]) is None  # the same instant twice


def test_swap_swapped_off_mid_series_is_no_growth_from_the_rate() -> None:
    """Someone swaps off an area: used drops (its pages went back to RAM). That is no
    rise, so no prediction grows swap."""
    rate = swap_rate([(0.0, 2 * GIB), (0.5, 2 * GIB), (1.0, 100 * MIB)])
    assert rate is not None and rate < 0
    assert swap_shortage(GIB, GIB - 100 * MIB, SwapTrend(rate), SMALL) is None


@pytest.mark.parametrize("free", [0, 90])
def test_free_threshold_at_its_edges(free: int) -> None:
    config = replace(SMALL, free_threshold_percent=free)
    assert swap_shortage(GIB, 0, None, config) is not None or free == 0
    assert swap_shortage(GIB, int(0.89 * GIB), None, config) is not None or free == 0
    assert swap_shortage(GIB, GIB, None, config) is None


def test_pressure_threshold_0_with_no_stall_at_all_is_not_pressure() -> None:
    config = replace(SMALL, pressure_threshold_percent=0.0, free_threshold_percent=0)
    facts = snapshot(files=[quarter("swap-0001", 200, 1)], psi_avg60=0.0)  # 56M free
    plan = plan_auto(facts, config, NOW)
    assert plan.actions == (), plan.actions[0].reason


# ---------------------------------------------------------------------------
# the agent's swap loop


@pytest.fixture
def nv(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    module: ModuleType = load_fake_nvml(monkeypatch)
    module.configure({"gpus": []})
    return module


MEMINFO = ("MemTotal:       16000000 kB\nMemFree:         8000000 kB\n"
           "MemAvailable:    9000000 kB\nSwapTotal:       {total} kB\nSwapFree:        {free} kB\n")


def _agent(tmp_path: Path, nv: ModuleType, swap: str = "", *,
           clock: list[float] | None = None) -> tuple[Agent, list[str]]:
    conf = tmp_path / "clusterctl.toml"
    conf.write_text(f'[swap]\ndir = "{tmp_path / "swap"}"\n{swap}'
                    f'[paths]\nstate_dir = "{tmp_path / "state"}"\n'
                    f'run_dir = "{tmp_path / "run"}"\n[ollama]\nurl = "http://127.0.0.1:9"\n'
                    f'[api]\nlisten = "127.0.0.1:{free_port()}"\n')
    now = clock if clock is not None else [0.0]
    agent = Agent(conf, nvml=Nvml(module=nv), notify=lambda _: None, owns_swap_policy=False,
                  monotonic=lambda: now[0])
    quiet_host(agent, tmp_path)
    steps: list[str] = []

    def step(why: str, trend: SwapTrend | None = None, signals: tuple[Signal, ...] = ()
             ) -> bool:
        steps.append(why)
        return False

    agent._swap_step = step  # type: ignore[method-assign]
    return agent, steps


def _meminfo(agent: Agent, text: str) -> None:
    (agent.psi_root / "proc/meminfo").write_text(text)


def test_a_truncated_meminfo_is_no_sample_and_no_step(tmp_path: Path, nv: ModuleType) -> None:
    """/proc/meminfo read short (no SwapFree line) must not read as all swap used: that
    sample would be a rate of GiB/s and a step growing swap to max_size."""
    agent, steps = _agent(tmp_path, nv)
    full = MEMINFO.format(total=4 * 1024 * 1024, free=3 * 1024 * 1024)
    truncated = full.split("SwapFree")[0]
    for i, text in enumerate([full, full, full, truncated, full]):
        _meminfo(agent, text)
        agent.swap_tick(i * 0.5)
    assert steps == []


def test_an_unreadable_meminfo_is_no_sample_and_the_loop_goes_on(
        tmp_path: Path, nv: ModuleType) -> None:
    agent, steps = _agent(tmp_path, nv)
    full = MEMINFO.format(total=4 * 1024 * 1024, free=3 * 1024 * 1024)
    _meminfo(agent, full)
    agent.swap_tick(0.0)
    (agent.psi_root / "proc/meminfo").unlink()
    (agent.psi_root / "proc/meminfo").mkdir()  # EISDIR
    assert agent.sample_swap(0.5) is None
    assert agent.swap_tick(1.0) is False
    (agent.psi_root / "proc/meminfo").rmdir()
    _meminfo(agent, "garbage\n\x00\xff")
    assert agent.swap_tick(1.5) is False
    assert steps == []


def test_swap_that_shrinks_mid_series_grows_only_for_the_free_share(
        tmp_path: Path, nv: ModuleType) -> None:
    """Someone swaps off 3 of 4 GiB; the rest is as used as before: the free share is now
    low (a step), but no rate of its own."""
    agent, steps = _agent(tmp_path, nv)
    for i in range(4):
        _meminfo(agent, MEMINFO.format(total=4 * 1024 * 1024, free=3 * 1024 * 1024))
        agent.swap_tick(i * 0.5)
    _meminfo(agent, MEMINFO.format(total=1024 * 1024, free=0))
    trend = agent.sample_swap(2.0)
    assert trend is None or trend.rate_bytes_per_s <= 0
    assert agent.swap_tick(2.5) is True and steps[0].startswith("only 0% of swap is free")


def test_a_clock_that_goes_back_does_not_hold_the_steps_back(
        tmp_path: Path, nv: ModuleType) -> None:
    agent, steps = _agent(tmp_path, nv)
    _meminfo(agent, MEMINFO.format(total=1024 * 1024, free=0))  # swap all used: short
    assert agent.swap_tick(1000.0) is True
    assert agent.swap_tick(10.0) is True  # the clock went back 990 s; swap is still short
    assert len(steps) == 2


def test_cgroups_swap_cannot_help_are_not_remembered_forever(
        tmp_path: Path, nv: ModuleType) -> None:
    """Containers come and go with new names: what was said about each is forgotten
    once it would be said again anyway."""
    agent, _steps = _agent(tmp_path, nv)
    for i in range(5000):
        agent._news(Signal("max", f"docker/{i:064x}", cannot_help="memsw", fix="x"),
                    float(i))
    # one a second for 5,000 s: only the last CANNOT_HELP_AGAIN_S of them can matter
    assert len(agent._cannot_help_said) <= service.CANNOT_HELP_AGAIN_S + 1


def _loop(agent: Agent) -> threading.Thread:
    thread = threading.Thread(target=agent._pressure_loop, name="pressure", daemon=True)
    thread.start()
    return thread


def _watched_host(tmp_path: Path) -> Path:
    root = tmp_path / "host"
    tree = v1_host(root)
    _v1_counters(tree, "system.slice")
    return root


def test_a_cgroup_watch_that_cannot_be_armed_for_a_while_is_armed_later(
        tmp_path: Path, nv: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "PRESSURE_RETRY_S", 0.1)
    agent, _steps = _agent(tmp_path, nv, 'watch_cgroups = ["system.slice"]\n')
    _meminfo(agent, MEMINFO.format(total=0, free=0))
    agent.cgroup_root = _watched_host(tmp_path)
    real_arm = CgroupWatch.arm
    calls: list[int] = []

    def arm(self: CgroupWatch) -> tuple[str, ...]:
        calls.append(1)
        if len(calls) <= 2:
            raise OSError(errno.EMFILE, "Too many open files")
        return real_arm(self)

    monkeypatch.setattr(CgroupWatch, "arm", arm)
    thread = _loop(agent)
    try:
        wait_until(lambda: len(calls) >= 3, timeout_s=5)
    finally:
        agent.stopping.set()
        thread.join(5)
    assert agent.loop_errors["pressure"] == 2


def test_an_exception_from_the_watch_is_counted_and_the_loop_arms_again(
        tmp_path: Path, nv: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "PRESSURE_RETRY_S", 0.1)
    agent, _steps = _agent(tmp_path, nv, 'watch_cgroups = ["system.slice"]\n')
    _meminfo(agent, MEMINFO.format(total=0, free=0))
    agent.cgroup_root = _watched_host(tmp_path)
    real_signals = CgroupWatch.signals
    arms: list[int] = []
    real_arm = CgroupWatch.arm
    failures: list[int] = []

    def signals(self: CgroupWatch, ready: Any) -> tuple[cg.CgroupSignal, ...]:
        if len(failures) < 2:
            failures.append(1)
            raise RuntimeError("a hostile cgroup file")
        return real_signals(self, ready)

    def arm(self: CgroupWatch) -> tuple[str, ...]:
        arms.append(1)
        return real_arm(self)

    monkeypatch.setattr(CgroupWatch, "signals", signals)
    monkeypatch.setattr(CgroupWatch, "arm", arm)
    before = {p.name for p in Path("/proc/self/fd").iterdir()}
    thread = _loop(agent)
    try:
        wait_until(lambda: len(arms) >= 3, timeout_s=5)
        assert thread.is_alive()
    finally:
        agent.stopping.set()
        thread.join(5)
    assert not thread.is_alive()
    assert agent.loop_errors["pressure"] == 2
    assert {p.name for p in Path("/proc/self/fd").iterdir()} <= before  # nothing leaked


# ---------------------------------------------------------------------------
# systemd-oomd files


def _oomd_host(root: Path) -> None:
    (root / "proc/4242").mkdir(parents=True)
    (root / "proc/4242/comm").write_text("systemd-oomd\n")
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/oomd.conf.d").mkdir(parents=True)
    (root / "etc/systemd/system/-.slice").write_text("[Slice]\nManagedOOMSwap=kill\n")


def _read_oomd_bounded(root: Path, timeout_s: float) -> dict[str, Any]:
    """read_oomd(root) in a child with 1 GiB of address space and ``timeout_s``: a reader
    that blocks or eats memory fails the test, never the suite or the machine."""
    program = ("import dataclasses, json, sys\nfrom pathlib import Path\n"
               "from clusterctl.host.oomd import read_oomd\n"
               "facts = read_oomd(Path(sys.argv[1]), run=lambda _: None)\n"
               "print(json.dumps(dataclasses.asdict(facts)))\n")
    agent_dir = Path(service.__file__).parents[2]
    try:
        done = subprocess.run(
            [sys.executable, "-c", program, str(root)], capture_output=True, text=True,
            timeout=timeout_s, check=False,
            env={**os.environ, "PYTHONPATH": f"{agent_dir}:{os.environ.get('PYTHONPATH', '')}"},
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (GIB, GIB)))
    except subprocess.TimeoutExpired:
        pytest.fail(f"read_oomd still reading after {timeout_s} s")
    assert done.returncode == 0, done.stderr[-2000:]
    facts: dict[str, Any] = json.loads(done.stdout)
    return facts


def test_an_oomd_drop_in_that_is_a_fifo_does_not_hang_check(tmp_path: Path) -> None:
    _oomd_host(tmp_path)
    fifo = tmp_path / "etc/systemd/oomd.conf.d/10-fifo.conf"
    os.mkfifo(fifo)
    (tmp_path / "etc/systemd/oomd.conf.d/20-limit.conf").write_text(
        "[OOM]\nSwapUsedLimit=80%\n")
    facts = _read_oomd_bounded(tmp_path, 10)
    assert facts["swap_used_limit_percent"] == 80.0 and facts["swap_kill_units"] == ["-.slice"]


def test_a_unit_file_linked_to_dev_zero_or_a_fifo_does_not_hang_check(tmp_path: Path) -> None:
    _oomd_host(tmp_path)
    units = tmp_path / "etc/systemd/system"
    (units / "zero.service").symlink_to("/dev/zero")
    (units / "random.slice").symlink_to("/dev/urandom")
    os.mkfifo(units / "fifo.service")
    facts = _read_oomd_bounded(tmp_path, 10)
    assert facts["swap_kill_units"] == ["-.slice"]


def test_a_unit_link_loop_does_not_crash_check(tmp_path: Path) -> None:
    _oomd_host(tmp_path)
    units = tmp_path / "etc/systemd/system"
    (units / "a.service").symlink_to("b.service")
    (units / "b.service").symlink_to("a.service")
    (tmp_path / "lib/systemd/system").mkdir(parents=True)
    (tmp_path / "lib/systemd/system/real.service").write_text("[Service]\nManagedOOMSwap=kill\n")
    (units / "linked.service").symlink_to(tmp_path / "lib/systemd/system/real.service")
    facts = oomd.read_oomd(tmp_path, run=lambda _: None)
    # an ordinary link to a unit file is still followed
    assert facts.swap_kill_units == ("-.slice", "linked.service", "real.service")


@pytest.mark.parametrize("limit", [0.0, 5.0, 10.0])
def test_the_oomd_fix_given_clears_the_warning_or_names_no_free_threshold(
        limit: float) -> None:
    (finding,) = oomd_findings(watching(limit))
    assert finding.code == "swap.oomd_first" and finding.fix
    if finding.fix.startswith("clusterctl config set swap.free_threshold "):
        wanted = int(finding.fix.split()[4].rstrip(","))
        assert [f.code for f in oomd_findings(watching(limit), with_free_threshold(wanted))
                ] == ["swap.oomd"]


def test_a_huge_sparse_unit_file_is_read_in_bounds(tmp_path: Path) -> None:
    _oomd_host(tmp_path)
    huge = tmp_path / "etc/systemd/system/huge.service"
    with huge.open("wb") as out:
        out.write(b"[Service]\nManagedOOMSwap=kill\n")
        out.truncate(1 * GIB)  # a GiB of NULs after it, on no disk space
    started = time.monotonic()
    facts = _read_oomd_bounded(tmp_path, 10)
    print(f"read_oomd with a 1 GiB unit file: {time.monotonic() - started:.2f} s")
    assert "huge.service" in facts["swap_kill_units"]  # its head was read


def test_binary_and_unreadable_oomd_files_are_ignored(tmp_path: Path) -> None:
    _oomd_host(tmp_path)
    (tmp_path / "etc/systemd/oomd.conf").write_bytes(b"\x00\xff[OOM]\xfe\nSwapUsedLimit=\xff%\n")
    (tmp_path / "etc/systemd/oomd.conf.d/dir.conf").mkdir()
    (tmp_path / "etc/systemd/system/bin.service").write_bytes(
        b"\x00\x01ManagedOOMSwap\xff=kill\n")
    (tmp_path / "var/lib/dpkg").mkdir(parents=True)
    (tmp_path / "var/lib/dpkg/status").write_bytes(b"\xff\xfe\x00Package: systemd\n")
    facts = oomd.read_oomd(tmp_path, run=lambda _: None)
    assert facts.swap_used_limit_percent == oomd.DEFAULT_SWAP_USED_LIMIT_PERCENT
    assert facts.swap_kill_units == ("-.slice",)


@pytest.mark.parametrize(("swap", "ok"), [
    ("free_threshold = 0", True), ("free_threshold = 90", True),
    ("free_threshold = -1", False), ("free_threshold = 91", False),
    ("free_threshold = 15.5", False), ("pressure_threshold = 0", True),
    ("pressure_threshold = -0.1", False), ("pressure_threshold = nan", False),
    ("watch_cgroups = [\"a/../b\"]", False), ("watch_cgroups = [\"a\\nb\"]", False),
    ("watch_cgroups = [\"/\"]", False), ("watch_cgroups = []", True),
])
def test_the_swap_config_keys_at_their_edges(swap: str, ok: bool) -> None:
    config, errors = parse(f"[swap]\n{swap}\n", path="clusterctl.toml")
    assert (config is not None and not errors) == ok, errors


def test_a_storm_of_signals_between_steps_keeps_only_the_latest(tmp_path: Path,
                                                                 nv: ModuleType) -> None:
    """Counters of a thousand groups under a watched slice, every half second, while no
    step is due: the agent keeps the latest few for the next step, not all of them."""
    agent, steps = _agent(tmp_path, nv)
    _meminfo(agent, MEMINFO.format(total=0, free=0))
    storm = tuple(Signal("max", f"system.slice/s{i}.service", count=1) for i in range(1000))
    agent.swap_tick(0.0, signals=storm[:1])  # a step at once, on the first signal
    assert len(steps) == 1
    for i in range(1, 9):  # the next 4 s: no step due (at most one per 5 s on signals)
        agent.swap_tick(i * 0.5, signals=storm)
    assert len(steps) == 1
    assert len(agent._signals) == service.PENDING_SIGNALS_KEPT
    assert agent._signals[-1] == storm[-1]
