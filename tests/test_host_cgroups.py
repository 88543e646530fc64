"""Memory cgroups: where the hierarchies are, which groups swap cannot help (and what
`clusterctl check` says of them), and CgroupWatch on fixture trees and on this machine's
kernel (a group thrashing at its limit, a group OOM-killed with its swap capped)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from typer.testing import CliRunner

from clusterctl.check.report import findings
from clusterctl.cli import app
from clusterctl.config import Config
from clusterctl.host import cgroups as cg
from clusterctl.host.cgroups import (
    CgroupLayout,
    CgroupSignal,
    CgroupWatch,
    read_layout,
    swap_cap_of,
    swap_caps,
)
from tests.cgroups import memory_cgroup
from tests.factories import machine
from tests.hosttree import HostTree
from tests.loopfs import loop_mount

MIB = 2**20
UNLIMITED = "9223372036854771712\n"
DOCKER_ID = "4f1c" * 16


# ---------------------------------------------------------------------------
# fixture trees


def v2_host(root: Path) -> HostTree:
    """Pure cgroup v2 with the memory controller; swap.max 0 on db.service (own), on
    machine.slice (inherited by vm1.scope; vm2.scope sets its own too), on a docker
    container, and on an empty session."""
    tree = HostTree(root)
    tree.file("proc/self/mountinfo",
              "22 1 259:2 / / rw,relatime - ext4 /dev/nvme0n1p2 rw\n"
              "30 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 "
              "cgroup2 rw,nsdelegate,memory_recursiveprot\n")
    cgroup = "sys/fs/cgroup"
    tree.file(f"{cgroup}/cgroup.controllers", "cpuset cpu io memory hugetlb pids rdma misc\n")

    def group(name: str, swap_max: str, populated: int) -> None:
        tree.file(f"{cgroup}/{name}/memory.swap.max", f"{swap_max}\n")
        tree.file(f"{cgroup}/{name}/cgroup.events", f"populated {populated}\nfrozen 0\n")

    group("system.slice", "max", 1)
    group("system.slice/db.service", "0", 1)
    group("system.slice/web.service", "max", 1)
    group(f"system.slice/docker-{DOCKER_ID}.scope", "0", 1)
    group("machine.slice", "0", 1)
    group("machine.slice/vm1.scope", "max", 1)
    group("machine.slice/vm2.scope", "0", 1)  # its own cap, under a capped slice
    group("user.slice", "max", 1)
    group("user.slice/user-1000.slice", "max", 0)
    group("user.slice/user-1000.slice/session-3.scope", "0", 0)
    return tree


def v1_host(root: Path) -> HostTree:
    """Hybrid: the memory controller on v1, an empty unified cgroup2 (as on this machine)."""
    tree = HostTree(root)
    tree.file("proc/self/mountinfo",
              "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"
              "31 22 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
              "35 31 0:32 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - "
              "cgroup cgroup rw,memory\n"
              "36 31 0:33 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
              "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n")
    tree.file("sys/fs/cgroup/unified/cgroup.controllers", "\n")
    memory = "sys/fs/cgroup/memory"

    def group(name: str, *, limit: str = UNLIMITED, memsw: str = UNLIMITED,
              swappiness: int = 60, procs: str = "") -> None:
        tree.file(f"{memory}/{name}/memory.limit_in_bytes", limit)
        tree.file(f"{memory}/{name}/memory.memsw.limit_in_bytes", memsw)
        tree.file(f"{memory}/{name}/memory.swappiness", f"{swappiness}\n")
        tree.file(f"{memory}/{name}/cgroup.procs", procs)

    gib = f"{2**30}\n"
    group("system.slice")
    group("system.slice/db.service", limit=gib, memsw=gib, procs="123\n")
    group("system.slice/batch.service", swappiness=0, procs="5\n")
    group("system.slice/free.service", limit=gib, memsw=f"{2 * 2**30}\n", procs="9\n")
    group("system.slice/idle.service", limit=gib, memsw=gib)  # capped, but no process
    group("docker")
    group(f"docker/{DOCKER_ID}", limit=f"{512 * MIB}\n", memsw=f"{512 * MIB}\n", procs="77\n")
    group("capped", limit=f"{256 * MIB}\n", memsw=f"{256 * MIB}\n")
    group("capped/child", procs="7\n")
    group("capped/child/deeper", procs="8\n")
    return tree


def test_the_layout_of_a_pure_v2_host_and_of_a_hybrid_one(tmp_path: Path) -> None:
    v2_host(tmp_path / "v2")
    assert read_layout(tmp_path / "v2") == CgroupLayout(
        v2=tmp_path / "v2/sys/fs/cgroup", v2_memory=True, v1_memory=None)
    v1_host(tmp_path / "v1")
    assert read_layout(tmp_path / "v1") == CgroupLayout(
        v2=tmp_path / "v1/sys/fs/cgroup/unified", v2_memory=False,
        v1_memory=tmp_path / "v1/sys/fs/cgroup/memory")
    assert read_layout(tmp_path / "nothing") == CgroupLayout(None, False, None)


def test_v2_swap_max_0_on_the_group_or_an_ancestor_is_a_cap_with_the_unit_to_change(
        tmp_path: Path) -> None:
    v2_host(tmp_path)
    layout = read_layout(tmp_path)
    own = swap_cap_of(layout, "system.slice/db.service", root=tmp_path)
    assert own is not None
    assert (own.cgroup, own.unit, own.version, own.why) == (
        "system.slice/db.service", "db.service", 2, "memory.swap.max is 0")
    assert own.fix.startswith("systemctl set-property db.service MemorySwapMax=infinity")
    inherited = swap_cap_of(layout, "/machine.slice/vm1.scope/", root=tmp_path)
    assert inherited is not None
    assert (inherited.cgroup, inherited.unit, inherited.why) == (
        "machine.slice/vm1.scope", "vm1.scope", "memory.swap.max is 0 on machine.slice")
    assert inherited.fix.startswith("systemctl set-property machine.slice MemorySwapMax=")
    container = swap_cap_of(layout, f"system.slice/docker-{DOCKER_ID}.scope", root=tmp_path)
    assert container is not None and "--memory-swap" in container.fix
    assert swap_cap_of(layout, "system.slice/web.service", root=tmp_path) is None
    assert swap_cap_of(layout, "system.slice/missing.service", root=tmp_path) is None
    assert swap_cap_of(layout, "../etc", root=tmp_path) is None


def test_v1_memsw_equal_to_the_limit_or_swappiness_0_is_a_cap(tmp_path: Path) -> None:
    v1_host(tmp_path)
    layout = read_layout(tmp_path)
    db = swap_cap_of(layout, "system.slice/db.service", root=tmp_path)
    assert db is not None
    assert (db.unit, db.version, db.why) == (
        "db.service", 1, "memory.memsw.limit_in_bytes equals memory.limit_in_bytes (1G)")
    assert db.fix == ("echo -1 > /sys/fs/cgroup/memory/system.slice/db.service/"
                      "memory.memsw.limit_in_bytes")
    batch = swap_cap_of(layout, "system.slice/batch.service", root=tmp_path)
    assert batch is not None and batch.why == "memory.swappiness is 0 (v1)"
    assert "memory.swappiness" in batch.fix
    deeper = swap_cap_of(layout, "capped/child/deeper", root=tmp_path)
    assert deeper is not None and deeper.unit is None
    assert deeper.why == ("memory.memsw.limit_in_bytes equals memory.limit_in_bytes (256M) "
                          "on capped")
    assert deeper.fix == "echo -1 > /sys/fs/cgroup/memory/capped/memory.memsw.limit_in_bytes"
    docker = swap_cap_of(layout, f"docker/{DOCKER_ID}", root=tmp_path)
    assert docker is not None and "--memory-swap" in docker.fix
    assert swap_cap_of(layout, "system.slice/free.service", root=tmp_path) is None
    assert swap_cap_of(layout, "system.slice", root=tmp_path) is None


def test_swap_caps_lists_populated_capped_groups_once_each(tmp_path: Path) -> None:
    v2_host(tmp_path / "v2")
    caps = swap_caps(read_layout(tmp_path / "v2"), root=tmp_path / "v2")
    # machine.slice once, not the scopes under it; not the session without processes
    assert sorted(c.cgroup for c in caps) == [
        "machine.slice", "system.slice/db.service", f"system.slice/docker-{DOCKER_ID}.scope"]
    v1_host(tmp_path / "v1")
    caps = swap_caps(read_layout(tmp_path / "v1"), root=tmp_path / "v1")
    assert sorted(c.cgroup for c in caps) == [
        "capped", f"docker/{DOCKER_ID}", "system.slice/batch.service",
        "system.slice/db.service"]
    assert [c.name for c in caps if c.cgroup.startswith("system.slice")] == [
        "batch.service", "db.service"]
    assert swap_caps(read_layout(tmp_path / "v1"), root=tmp_path / "v1", max_depth=1) == (
        swap_cap_of(read_layout(tmp_path / "v1"), "capped", root=tmp_path / "v1"),)


def test_check_names_each_capped_group_why_and_the_fix(tmp_path: Path, conf: Path,
                                                       fake_nvml: ModuleType) -> None:
    fake_nvml.configure({"gpus": []})
    root = v2_host(tmp_path / "host").system().sample("laptop").root
    result = CliRunner().invoke(app, ["check", "--json", "--root", str(root),
                                      "--config", str(conf)])
    capped = [f for f in json.loads(result.stdout)["findings"]
              if f["code"] == "cgroup.swap_capped"]
    assert [(f["severity"], f["message"]) for f in capped] == [
        ("warn", "machine.slice: swap cannot help it (memory.swap.max is 0); it is "
                 "OOM-killed at its memory limit whatever swap the node has"),
        ("warn", "db.service: swap cannot help it (memory.swap.max is 0); it is OOM-killed "
                 "at its memory limit whatever swap the node has"),
        ("warn", f"docker-{DOCKER_ID}.scope: swap cannot help it (memory.swap.max is 0); it "
                 "is OOM-killed at its memory limit whatever swap the node has")]
    assert capped[0]["fix"].startswith("systemctl set-property machine.slice "
                                       "MemorySwapMax=infinity")
    assert capped[1]["fix"].startswith("systemctl set-property db.service "
                                       "MemorySwapMax=infinity")
    assert "--memory-swap" in capped[2]["fix"]
    # the facts without caps (cgroups unreadable): no such finding
    assert not [f for f in findings(machine(cores=8, memtotal_kib=32 * 2**20), Config())
                if f.code == "cgroup.swap_capped"]


def test_cgroups_that_cannot_be_read_leave_check_without_caps(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    v2_host(tmp_path)

    def broken(*_args: object, **_kwargs: object) -> tuple[cg.SwapCap, ...]:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(cg, "swap_caps", broken)
    assert cg.read_swap_caps(tmp_path) == ()


# ---------------------------------------------------------------------------
# CgroupWatch on fixture trees (regular files take the triggers and never fire)


def _v1_counters(tree: HostTree, name: str, *, failcnt: int = 0, oom_kill: int = 0,
                 under_oom: int = 0) -> None:
    base = f"sys/fs/cgroup/memory/{name}"
    tree.file(f"{base}/memory.failcnt", f"{failcnt}\n")
    tree.file(f"{base}/memory.oom_control",
              f"oom_kill_disable 0\nunder_oom {under_oom}\noom_kill {oom_kill}\n")
    tree.file(f"{base}/memory.pressure_level", "")
    tree.file(f"{base}/cgroup.event_control", "")


def test_the_watch_diffs_counters_after_a_baseline_and_names_the_group_under_it(
        tmp_path: Path) -> None:
    tree = v1_host(tmp_path)
    _v1_counters(tree, "system.slice", failcnt=5)
    _v1_counters(tree, "system.slice/db.service", failcnt=100, oom_kill=3)
    tree.file("sys/fs/cgroup/unified/system.slice/memory.pressure", "")
    watch = CgroupWatch(["system.slice", "user.slice"], 10, root=tmp_path)
    lines = watch.arm()
    try:
        assert watch.watched == ("system.slice",)
        assert lines == ("user.slice: no such cgroup (/sys/fs/cgroup/memory/user.slice or "
                         "/sys/fs/cgroup/unified/user.slice)",)
        # the PSI trigger (2 s window) and the pressure_level registration were written
        psi = tmp_path / "sys/fs/cgroup/unified/system.slice/memory.pressure"
        assert psi.read_text() in ("some 100000 1000000\n", "some 200000 2000000\n")
        control = (tmp_path / "sys/fs/cgroup/memory/system.slice/cgroup.event_control")
        efd, pfd = (int(x) for x in control.read_text().split()[:2])
        assert control.read_text().endswith(" medium")
        assert watch.fds()[efd] == select.POLLIN
        assert sorted(watch.fds().values()) == sorted([select.POLLIN, select.POLLPRI])
        assert str(Path(f"/proc/self/fd/{pfd}").readlink()).endswith(
            "system.slice/memory.pressure_level")
        assert watch.signals(()) == ()  # old counts are a baseline
        _v1_counters(tree, "system.slice/db.service", failcnt=160, oom_kill=4, under_oom=1)
        _v1_counters(tree, "system.slice/new.service", failcnt=2)  # made since: all new
        # (groups under a watched one are listed again every RESCAN_CALLS calls)
        got = tuple(s for _ in range(cg.RESCAN_CALLS) for s in watch.signals(()))
        cap = swap_cap_of(read_layout(tmp_path), "system.slice/db.service", root=tmp_path)
        assert cap is not None
        db, new = "system.slice/db.service", "system.slice/new.service"
        assert got == (
            CgroupSignal(db, "db.service", "max", 60, cap, "system.slice", "memory.failcnt"),
            CgroupSignal(db, "db.service", "oom_kill", 1, cap, "system.slice",
                         "memory.oom_control oom_kill"),
            CgroupSignal(db, "db.service", "oom", 1, cap, "system.slice",
                         "memory.oom_control under_oom"),
            CgroupSignal(new, "new.service", "max", 2, None, "system.slice", "memory.failcnt"))
        assert watch.signals(()) == ()  # nothing rose since
        os.eventfd_write(efd, 3)  # what the kernel does on a "medium" pressure event
        (pressure,) = watch.signals([efd])
        assert (pressure.cgroup, pressure.kind, pressure.count, pressure.detail) == (
            "system.slice", "pressure", 1, "memory.pressure_level medium")
        assert watch.signals([efd]) == ()  # consumed
    finally:
        watch.close()


def test_a_group_that_goes_away_leaves_the_watch_without_an_error(tmp_path: Path) -> None:
    tree = v2_host(tmp_path)
    base = tmp_path / "sys/fs/cgroup/system.slice/web.service"
    tree.file("sys/fs/cgroup/system.slice/web.service/memory.pressure", "")
    tree.file("sys/fs/cgroup/system.slice/web.service/memory.events.local",
              "low 0\nhigh 0\nmax 4\noom 0\noom_kill 0\noom_group_kill 0\n")
    watch = CgroupWatch(["system.slice/web.service"], 5, root=tmp_path)
    assert watch.arm() == ()
    try:
        assert watch.watched == ("system.slice/web.service",)
        assert watch.signals(()) == ()
        (base / "memory.events.local").write_text("max 9\noom 1\noom_kill 1\n")
        assert [(s.kind, s.count, s.swap_cap, s.detail) for s in watch.signals(())] == [
            ("max", 5, None, "memory.events.local max"),
            ("oom", 1, None, "memory.events.local oom"),
            ("oom_kill", 1, None, "memory.events.local oom_kill")]
        for child in base.iterdir():
            child.unlink()
        base.rmdir()
        assert watch.signals(set(watch.fds())) == ()
        assert list(watch.watched) == [] and watch.fds() == {}
    finally:
        watch.close()


def test_arming_out_of_descriptors_raises_and_leaves_nothing_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = v1_host(tmp_path)
    for name in ("system.slice", "capped"):
        _v1_counters(tree, name)
        tree.file(f"sys/fs/cgroup/unified/{name}/memory.pressure", "")
    real_eventfd = os.eventfd
    calls = []

    def eventfd(*args: int) -> int:
        calls.append(args)
        if len(calls) == 2:
            raise OSError(errno.EMFILE, "Too many open files")
        return real_eventfd(*args)

    monkeypatch.setattr(os, "eventfd", eventfd)
    before = set(Path("/proc/self/fd").iterdir())
    watch = CgroupWatch(["system.slice", "capped"], 10, root=tmp_path)
    with pytest.raises(OSError) as err:
        watch.arm()
    assert err.value.errno == errno.EMFILE
    assert set(Path("/proc/self/fd").iterdir()) <= before  # the first group's three fds closed
    assert watch.watched == () and watch.fds() == {}


def test_a_group_without_psi_or_event_control_is_reported_and_still_counted(
        tmp_path: Path) -> None:
    tree = v1_host(tmp_path)
    tree.file("sys/fs/cgroup/memory/system.slice/memory.failcnt", "0\n")
    tree.file("sys/fs/cgroup/memory/system.slice/memory.oom_control", "under_oom 0\noom_kill 0\n")
    (tmp_path / "sys/fs/cgroup/unified/system.slice").mkdir(parents=True)
    watch = CgroupWatch(["system.slice", "a/../b"], 10, root=tmp_path)
    try:
        lines = watch.arm()
        assert lines[0].startswith("system.slice: no PSI trigger on "
                                   "/sys/fs/cgroup/unified/system.slice/memory.pressure")
        assert lines[1].startswith("system.slice: no memory.pressure_level events in "
                                   "/sys/fs/cgroup/memory/system.slice")
        assert lines[2].startswith("'a/../b': not a cgroup path")
        assert watch.watched == ("system.slice",) and watch.fds() == {}
    finally:
        watch.close()


# ---------------------------------------------------------------------------
# this machine's kernel (root, a v1 memory controller, a unified cgroup2 with PSI)

THRASH = ("b = bytearray(128 * 2**20)\n"
          "while True:\n"
          "    for i in range(0, len(b), 4096): b[i] = (b[i] + 1) % 256\n")


def _require_hybrid() -> tuple[CgroupLayout, Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root for cgroups and swap")
    layout = read_layout()
    if layout.v1_memory is None or layout.v2 is None:
        pytest.skip("needs the v1 memory controller next to a cgroup2 hierarchy (hybrid)")
    if not (layout.v1_memory / "memory.memsw.limit_in_bytes").exists():
        pytest.skip("no v1 swap accounting (swapaccount=1)")
    return layout, layout.v2


@contextlib.contextmanager
def unified_twin(group: Path, unified: Path) -> Iterator[Path]:
    """A cgroup2 group of ``group``'s name (its PSI), removed afterwards."""
    twin = unified / group.name
    twin.mkdir()
    try:
        yield twin
    finally:
        for _ in range(50):
            try:
                twin.rmdir()
                break
            except OSError:
                time.sleep(0.1)


@contextlib.contextmanager
def own_swap(tmp_path: Path) -> Iterator[None]:
    """A 256 MiB swap file of the test's own on a loop filesystem, off and gone after."""
    with loop_mount(tmp_path, "ext4", size_mib=512) as mount:
        swap = mount / "cgroup-test-swap"
        subprocess.run(["fallocate", "-l", "256M", str(swap)], check=True)
        swap.chmod(0o600)
        subprocess.run(["mkswap", "-q", str(swap)], check=True, capture_output=True)
        subprocess.run(["swapon", str(swap)], check=True)
        try:
            yield
        finally:
            subprocess.run(["swapoff", str(swap)], check=False)


def run_in_both(groups: list[Path], program: str) -> subprocess.Popen[bytes]:
    """Python ``program`` in every group of ``groups`` (a v1 one and its cgroup2 twin)."""
    joins = " && ".join(f'echo $$ > "{g}/cgroup.procs"' for g in groups)
    return subprocess.Popen(["sh", "-c", f'{joins} && exec "$0" -c "$1"',
                             sys.executable, program])


def collect(watches: dict[str, CgroupWatch], until: set[tuple[str, str]], timeout_s: float
            ) -> dict[tuple[str, str], tuple[float, CgroupSignal]]:
    """Poll the watches as the agent does (every 0.5 s at most) until each (watch, kind) of
    ``until`` was seen: the first signal of each, and when it came."""
    started = time.monotonic()
    seen: dict[tuple[str, str], tuple[float, CgroupSignal]] = {}
    while not until <= set(seen) and time.monotonic() - started < timeout_s:
        poller = select.poll()
        owner: dict[int, str] = {}
        for label, watch in watches.items():
            for fd, mask in watch.fds().items():
                poller.register(fd, mask)
                owner[fd] = label
        ready = [fd for fd, _mask in poller.poll(500)]
        for label, watch in watches.items():
            for signal in watch.signals([fd for fd in ready if owner[fd] == label]):
                seen.setdefault((label, signal.kind), (time.monotonic() - started, signal))
    return seen


@pytest.mark.integration
def test_a_group_thrashing_at_its_limit_is_pressure_and_max_within_seconds(
        tmp_path: Path) -> None:
    layout, unified = _require_hybrid()
    with own_swap(tmp_path), memory_cgroup("watch") as (group, set_limit), \
            unified_twin(group, unified) as twin:
        set_limit(32)
        name = group.name
        watches = {  # all of it; PSI alone (cgroup2); pressure_level alone (v1)
            "both": CgroupWatch([name], 5, layout=layout),
            "psi": CgroupWatch([name], 5, layout=CgroupLayout(unified, False, None)),
            "v1": CgroupWatch([name], 5, layout=CgroupLayout(None, False, layout.v1_memory)),
        }
        hog = None
        try:
            for watch in watches.values():
                assert watch.arm() == () and watch.watched == (name,)
                assert watch.signals(()) == ()
            hog = run_in_both([group, twin], THRASH)
            seen = collect(watches, {("both", "pressure"), ("both", "max"),
                                     ("psi", "pressure"), ("v1", "pressure")}, timeout_s=20)
            assert hog.poll() is None, "the thrashing process died (no swap to thrash into?)"
            print({key: round(at, 2) for key, (at, _signal) in seen.items()})
            assert {("both", "pressure"), ("both", "max"), ("psi", "pressure"),
                    ("v1", "pressure")} <= set(seen), seen
            at, pressure = seen["both", "pressure"]
            assert at < 5 and pressure.cgroup == name and pressure.swap_cap is None
            assert seen["psi", "pressure"][0] < 10  # a 1 s window, 2 s without CAP_SYS_RESOURCE
            assert seen["psi", "pressure"][1].detail.endswith(" s window (PSI)")
            assert seen["v1", "pressure"][1].detail == "memory.pressure_level medium"
            _at, limit = seen["both", "max"]
            assert limit.cgroup == name and limit.count > 0 and limit.swap_cap is None
            assert ("both", "oom_kill") not in seen  # swap kept it alive
        finally:
            for watch in watches.values():
                watch.close()
            if hog is not None:
                hog.kill()
                hog.wait()


@pytest.mark.integration
def test_an_oom_kill_in_a_group_whose_swap_is_capped_says_swap_cannot_help(
        tmp_path: Path) -> None:
    layout, unified = _require_hybrid()
    with own_swap(tmp_path), memory_cgroup("oom") as (group, set_limit), \
            unified_twin(group, unified) as twin:
        set_limit(32)
        (group / "memory.memsw.limit_in_bytes").write_text(f"{32 * MIB}\n")
        watch = CgroupWatch([group.name], 5, layout=layout)
        sleeper = hog = None
        try:
            assert watch.arm() == ()
            assert watch.signals(()) == ()
            # a process that stays, so that the group is populated for `check`
            sleeper = run_in_both([group, twin], "import time; time.sleep(60)")
            hog = run_in_both([group, twin], THRASH)
            assert hog.wait(timeout=20) == -9  # the OOM killer, though the node has swap
            seen = collect({"w": watch}, {("w", "oom_kill")}, timeout_s=5)
            assert ("w", "oom_kill") in seen, seen
            _at, kill = seen["w", "oom_kill"]
            assert kill.cgroup == group.name and kill.count == 1
            assert kill.swap_cap is not None and kill.swap_cap.version == 1
            assert kill.swap_cap.why == ("memory.memsw.limit_in_bytes equals "
                                         "memory.limit_in_bytes (32M)")
            assert kill.swap_cap.fix == f"echo -1 > {group}/memory.memsw.limit_in_bytes"
            caps = [c for c in swap_caps(read_layout()) if c.cgroup == group.name]
            assert caps == [kill.swap_cap]
        finally:
            watch.close()
            for process in (hog, sleeper):
                if process is not None:
                    process.kill()
                    process.wait()
