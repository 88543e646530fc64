"""The installed agent, hardened by its unit, watches memory cgroups under a real systemd.

ProtectControlGroups=yes makes /sys/fs/cgroup read-only inside the agent's unit; the
unit makes the default watched slices writable again (ReadWritePaths=), so the agent
can write a PSI trigger into a slice's memory.pressure (cgroup2) and register
memory.pressure_level events through its cgroup.event_control (v1). Without them it
says "not watching cgroup system.slice: ...: Read-only file system" and reads only the
limit and OOM counters. The sandbox's systemd mounts its own cgroup hierarchies, in
this host's layout (hybrid here: v1 memory at /sys/fs/cgroup/memory, cgroup2 at
/sys/fs/cgroup/unified); system.slice is a group in each.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from scripts.systemd_sandbox import Sandbox, unavailable

pytestmark = pytest.mark.integration

AGENT = "clusterctl-agent.service"
MAIN_PID = f"$(systemctl show -P MainPID {AGENT})"
WATCHING = re.compile(r"watching cgroups (.+) for memory pressure, limits and OOM kills")


@dataclass(frozen=True)
class Layout:
    """Where the sandbox's systemd mounted the hierarchies the agent watches."""

    v2: str | None  # the cgroup2 mount
    v1_memory: str | None  # the v1 memory controller's mount


def layout_of(mountinfo: str) -> Layout:
    v2 = v1 = None
    for line in mountinfo.splitlines():
        fields, _, tail = line.partition(" - ")
        point, kind = fields.split()[4], tail.split()
        if kind[0] == "cgroup2" and v2 is None:
            v2 = point
        elif kind[0] == "cgroup" and "memory" in kind[2].split(",") and v1 is None:
            v1 = point
    return Layout(v2, v1)


def writable_for_the_agent(sandbox: Sandbox, paths: list[str]) -> list[str]:
    """Which of ``paths`` the agent could write, seen from its own mount namespace."""
    tests = " ".join(f"if test -w {p}; then echo {p}; fi;" for p in paths)
    return sandbox.run(f"nsenter -t {MAIN_PID} -m sh -c '{tests}'").stdout.split()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    reason = unavailable()
    if reason:
        pytest.skip(f"no systemd sandbox here: {reason}")
    # no swap dir of its own: on the sandbox's overlay /var the agent makes no swap
    with Sandbox(tmp_path_factory.mktemp("cgroups") / "sandbox") as box:
        box.run("/srv/clusterctl/install.sh --no-check")
        yield box


@pytest.fixture(scope="module")
def layout(sandbox: Sandbox) -> Layout:
    found = layout_of(sandbox.run("cat /proc/1/mountinfo").stdout)
    if found.v2 is None and found.v1_memory is None:
        pytest.skip("the sandbox's systemd mounted no memory cgroup hierarchy")
    return found


def restart_and_read(sandbox: Sandbox) -> tuple[list[str], list[str]]:
    """Restart the agent; the cgroups it watches and its "not watching" lines, from
    this start's journal once it has armed."""
    sandbox.run(f"systemctl restart {AGENT}")
    return read_watch(sandbox)


def read_watch(sandbox: Sandbox) -> tuple[list[str], list[str]]:
    """restart_and_read() for the agent's current start."""
    journal = (f"journalctl --no-pager -o cat _SYSTEMD_INVOCATION_ID="
               f"$(systemctl show -P InvocationID {AGENT})")
    lines = sandbox.wait_for(f"{journal} | grep -q 'watching cgroups' && {journal}",
                             timeout_s=30).splitlines()
    watching = [m.group(1).split(", ") for m in map(WATCHING.fullmatch, lines) if m]
    assert len(watching) == 1, lines
    return watching[0], [line for line in lines if line.startswith("not watching cgroup ")]


def test_the_hardened_agent_arms_its_cgroup_watch_on_system_slice(
        sandbox: Sandbox, layout: Layout) -> None:
    watching, problems = restart_and_read(sandbox)
    assert "system.slice" in watching
    assert [p for p in problems if p.startswith("not watching cgroup system.slice:")] == [], (
        problems)
    assert not any("Read-only file system" in p for p in problems), problems
    # the triggers are open in the agent: the PSI trigger on cgroup2, the pressure
    # level (its eventfd registered) on v1
    fds = sandbox.run(f"ls -l /proc/{MAIN_PID}/fd").stdout
    if layout.v2 is not None:
        assert f"-> {layout.v2}/system.slice/memory.pressure\n" in fds, fds
    if layout.v1_memory is not None:
        assert f"-> {layout.v1_memory}/system.slice/memory.pressure_level\n" in fds, fds
    # and the control groups stay read-only for it, but for the slices it watches
    assert sandbox.run(f"systemctl show -P ProtectControlGroups {AGENT}").stdout == "yes\n"
    tops = [top for top in (layout.v2, layout.v1_memory) if top is not None]
    armed = [f"{layout.v2}/system.slice/memory.pressure"] if layout.v2 else []
    armed += [f"{layout.v1_memory}/system.slice/cgroup.event_control"] if layout.v1_memory else []
    kept = [f"{top}/cgroup.procs" for top in tops]  # the roots: moving anything anywhere
    devices = f"/sys/fs/cgroup/devices/system.slice/{AGENT}/devices.allow"
    if sandbox.run(f"test -e {devices}", check=False).returncode == 0:
        kept.append(devices)  # v1 enforces its DeviceAllow= there
    assert writable_for_the_agent(sandbox, armed + kept) == armed


def test_a_group_outside_the_defaults_is_watched_fully_once_config_set_names_it(
        sandbox: Sandbox, layout: Layout) -> None:
    """Edited into the config by hand, a group outside the default slices gets its
    counters only (its files are read-only for the agent). `clusterctl config set
    swap.watch_cgroups` writes the agent's watch-cgroups.conf and restarts it: the
    triggers are armed there; back to the default slices, the drop-in goes."""
    conf = "/etc/clusterctl/clusterctl.toml"
    dropin = f"/etc/systemd/system/{AGENT}.d/watch-cgroups.conf"
    before = sandbox.run(f"cat {conf}").stdout
    sandbox.run("systemd-run --unit=cgtest-work --slice=cgtest.slice sleep 600 && "
                "sed -i 's/^watch_cgroups = .*/watch_cgroups = "
                f"[\"system.slice\", \"cgtest.slice\"]/' {conf} && grep -q cgtest {conf}")
    try:
        watching, problems = restart_and_read(sandbox)
        assert watching == ["system.slice", "cgtest.slice"]  # its counters, at least
        assert problems and all(p.startswith("not watching cgroup cgtest.slice: ") and
                                p.endswith(": Read-only file system; its limit and OOM counters "
                                           "only: `clusterctl config dropins` lets this unit "
                                           "write it") for p in problems), problems
        out = sandbox.run("clusterctl config set swap.watch_cgroups "
                          "system.slice,cgtest.slice").stdout
        assert f"wrote {dropin}\n" in out and f"restarted {AGENT} " in out, out
        watching, problems = read_watch(sandbox)  # the start `config set` made
        assert watching == ["system.slice", "cgtest.slice"]
        assert problems == []
        fds = sandbox.run(f"ls -l /proc/{MAIN_PID}/fd").stdout
        armed = [f"{layout.v2}/cgtest.slice/memory.pressure"] if layout.v2 else []
        if layout.v1_memory and sandbox.run(f"test -d {layout.v1_memory}/cgtest.slice",
                                            check=False).returncode == 0:
            armed.append(f"{layout.v1_memory}/cgtest.slice/memory.pressure_level")
        assert armed and all(f"-> {path}\n" in fds for path in armed), fds
        out = sandbox.run("clusterctl config set swap.watch_cgroups "
                          "system.slice,user.slice,machine.slice").stdout
        assert f"removed {dropin}\n" in out and f"restarted {AGENT} " in out, out
        assert "cgtest.slice" not in sandbox.run(f"systemctl show -P ReadWritePaths {AGENT}"
                                                 ).stdout
    finally:
        sandbox.run(f"systemctl stop cgtest-work cgtest.slice; "
                    f"cat > {conf} <<'EOF'\n{before}EOF\n"
                    f"clusterctl config dropins && systemctl restart {AGENT}")
