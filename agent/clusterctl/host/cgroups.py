"""Memory cgroups, watched where pressure happens, and the ones swap cannot help.

System-wide PSI barely moves while one cgroup thrashes at its memory limit, so the
agent watches the groups that hold workloads: a PSI trigger on a cgroup2 group's
memory.pressure, memory.pressure_level events of the v1 memory controller (an eventfd
registered through cgroup.event_control), and each group's limit and OOM counters.

A group "swap cannot help" is OOM-killed at its limit whatever swap the node has:
cgroup v2 memory.swap.max 0 (on it or an ancestor), v1 memory.memsw.limit_in_bytes
equal to its memory.limit_in_bytes (on it or an ancestor), or v1 memory.swappiness 0.

Cgroup names are paths relative to a hierarchy's root ("system.slice/db.service"). On a
hybrid host a name may exist in the v1 memory hierarchy, in the unified cgroup2 one, or
both: v1 gives the limits, counters and pressure levels, cgroup2 the PSI.
See Documentation/admin-guide/cgroup-v2.rst and cgroup-v1/memory.rst.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from clusterctl.errors import HostError
from clusterctl.host.procfs import read_text, unescape_octal
from clusterctl.host.psi import TRANSIENT, open_trigger
from clusterctl.units import format_size

V1_UNLIMITED_BYTES = 2**62  # v1 reports "no limit" as LONG_MAX rounded down to a page
SUBTREE_DEPTH = 3  # levels under a watched group whose counters are read
SUBTREE_NODES = 256  # groups read per watched group and call, at most
WATCH_NODES = 1024  # ...and in all, shared by the watched groups (each reads itself at least)
RESCAN_CALLS = 10  # signals() calls (about 5 s) before the groups under one are listed again
_UNIT = re.compile(r"[A-Za-z0-9:_.\\@-]+\.(service|scope|slice|socket|mount|swap)")
# a container runtime's group: cgroupfs driver ("docker/ID"), systemd driver ("docker-ID.scope")
_CONTAINER = re.compile(
    r"(docker|libpod|crio|cri-containerd)(-[0-9a-f]{12,}\.scope)?|libpod_parent")

SignalKind = Literal["pressure", "max", "oom", "oom_kill"]


@dataclass(frozen=True)
class CgroupLayout:
    v2: Path | None  # the cgroup2 mount (may lack the memory controller)
    v2_memory: bool  # memory controller enabled there
    v1_memory: Path | None  # the v1 memory controller's mount


@dataclass(frozen=True)
class SwapCap:
    """A cgroup that swap cannot help: OOM-killed at its limit whatever swap there is."""

    cgroup: str  # relative to the hierarchy root, e.g. "system.slice/db.service"
    unit: str | None  # the nearest systemd unit on its path
    version: int  # 1 or 2
    why: str  # "memory.swap.max is 0", "... on system.slice" when an ancestor sets it
    fix: str

    @property
    def name(self) -> str:
        """The unit when the group is one, else the cgroup path."""
        if self.unit is not None and self.cgroup.rsplit("/", 1)[-1] == self.unit:
            return self.unit
        return self.cgroup


@dataclass(frozen=True)
class CgroupSignal:
    cgroup: str  # where it happened: the watched group, or a group under it (counters)
    unit: str | None
    kind: SignalKind
    count: int  # how much the counter rose since the last call (1 for pressure)
    swap_cap: SwapCap | None  # when swap cannot help this cgroup
    watched: str = ""  # the watched group it was seen under
    detail: str = ""  # what said so: "memory.pressure_level medium", "memory.failcnt", ...


# ---------------------------------------------------------------------------
# layout and names


def read_layout(root: Path = Path("/")) -> CgroupLayout:
    """Where the cgroup2 and the v1 memory hierarchies are mounted (root/proc/self/mountinfo)."""
    v2: Path | None = None
    v1: Path | None = None
    for line in (read_text(root, "proc/self/mountinfo") or "").splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        point = root / unescape_octal(fields[4]).lstrip("/")
        if tail[0] == "cgroup2" and v2 is None:
            v2 = point
        elif tail[0] == "cgroup" and "memory" in tail[2].split(",") and v1 is None:
            v1 = point
    v2_memory = v2 is not None and "memory" in (read_text(v2, "cgroup.controllers") or "").split()
    return CgroupLayout(v2=v2, v2_memory=v2_memory, v1_memory=v1)


def cgroup_name(cgroup: str) -> str | None:
    """``cgroup`` as a relative "/"-separated path ("/system.slice/" -> "system.slice"), or
    None when it is not one (empty, "..", ".", "a//b")."""
    name = cgroup.strip("/")
    parts = name.split("/")
    if not name or any(p in ("", ".", "..") for p in parts):
        return None
    return name


def unit_of(cgroup: str) -> str | None:
    """The nearest systemd unit on ``cgroup``'s path ("system.slice/db.service/x" -> db.service)."""
    for part in reversed(cgroup.split("/")):
        if _UNIT.fullmatch(part):
            return part
    return None


def _shown(path: Path, root: Path) -> str:
    """``path`` as the host names it (without the test's ``root``)."""
    try:
        return "/" + str(path.relative_to(root))
    except ValueError:
        return str(path)


def _is_dir(path: Path) -> bool:
    """Whether ``path`` is a directory; False for a name the kernel refuses (too long)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _inside(path: Path, top: Path) -> bool:
    """Whether ``path`` is ``top`` or under it once links are followed (a cgroup tree has
    none; a link there leads out of it)."""
    real, base = os.path.realpath(path), os.path.realpath(top)
    return real == base or real.startswith(base.rstrip("/") + "/")


def _ino(path: Path | None) -> int | None:
    """The inode of a group's folder: a group removed and made again has a new one."""
    if path is None:
        return None
    try:
        return path.stat().st_ino
    except OSError:
        return None


def _number(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------------------
# swap caps


def _container_fix(at: str, flag: str) -> str | None:
    parts = at.split("/")
    if any(p.startswith("kubepods") for p in parts):
        return ("let the pod swap: kubelet memorySwap.swapBehavior: LimitedSwap "
                "(Burstable pods, cgroup v2)")
    if any(_CONTAINER.fullmatch(p) for p in parts):
        return f"run the container again with {flag}"
    return None


def _v2_fix(layout: CgroupLayout, at: str, root: Path) -> str:
    container = _container_fix(at, "--memory-swap above --memory (-1: no swap limit)")
    if container is not None:
        return container
    last = at.rsplit("/", 1)[-1]
    if _UNIT.fullmatch(last):
        return (f"systemctl set-property {last} MemorySwapMax=infinity "
                "(or drop MemorySwapMax= from the unit)")
    assert layout.v2 is not None
    return f"echo max > {_shown(layout.v2 / at, root)}/memory.swap.max"


def _v1_fix(layout: CgroupLayout, at: str, file: str, value: str, flag: str,
            root: Path) -> str:
    container = _container_fix(at, flag)
    if container is not None:
        return container
    assert layout.v1_memory is not None
    return f"echo {value} > {_shown(layout.v1_memory / at, root)}/{file}"


def _ancestry(name: str) -> list[str]:
    """``name`` and its ancestors, nearest first ("a/b" -> ["a/b", "a"])."""
    parts = name.split("/")
    return ["/".join(parts[:k]) for k in range(len(parts), 0, -1)]


def _v2_cap_at(layout: CgroupLayout, at: str) -> bool:
    assert layout.v2 is not None
    return (read_text(layout.v2 / at, "memory.swap.max") or "").strip() == "0"


def _v1_memsw_cap_at(layout: CgroupLayout, at: str) -> int | None:
    """The limit when ``at``'s memsw limit equals its (set) memory limit."""
    assert layout.v1_memory is not None
    limit = _number(layout.v1_memory / at / "memory.limit_in_bytes")
    memsw = _number(layout.v1_memory / at / "memory.memsw.limit_in_bytes")
    if limit is not None and limit < V1_UNLIMITED_BYTES and memsw == limit:
        return limit
    return None


def _v1_swappiness_zero(layout: CgroupLayout, at: str) -> bool:
    assert layout.v1_memory is not None
    return _number(layout.v1_memory / at / "memory.swappiness") == 0


def _v2_cap(layout: CgroupLayout, name: str, root: Path, *, inherited: bool) -> SwapCap | None:
    for at in _ancestry(name) if inherited else [name]:
        if _v2_cap_at(layout, at):
            where = "" if at == name else f" on {at}"
            return SwapCap(name, unit_of(name), 2, f"memory.swap.max is 0{where}",
                           _v2_fix(layout, at, root))
    return None


def _v1_cap(layout: CgroupLayout, name: str, root: Path, *, inherited: bool) -> SwapCap | None:
    memsw_fix = ("memory.memsw.limit_in_bytes", "-1",
                 "--memory-swap above --memory (-1: no swap limit)")
    own_limit = _v1_memsw_cap_at(layout, name)
    if own_limit is not None:
        return SwapCap(name, unit_of(name), 1,
                       "memory.memsw.limit_in_bytes equals memory.limit_in_bytes "
                       f"({format_size(own_limit)})", _v1_fix(layout, name, *memsw_fix, root))
    if _v1_swappiness_zero(layout, name):
        return SwapCap(name, unit_of(name), 1, "memory.swappiness is 0 (v1)",
                       _v1_fix(layout, name, "memory.swappiness", "60",
                               "--memory-swappiness above 0", root))
    for at in _ancestry(name)[1:] if inherited else []:
        limit = _v1_memsw_cap_at(layout, at)
        if limit is not None:
            return SwapCap(name, unit_of(name), 1,
                           "memory.memsw.limit_in_bytes equals memory.limit_in_bytes "
                           f"({format_size(limit)}) on {at}",
                           _v1_fix(layout, at, *memsw_fix, root))
    return None


def swap_cap_of(layout: CgroupLayout, cgroup: str, *, root: Path = Path("/")) -> SwapCap | None:
    """Why swap cannot help ``cgroup`` (its own setting or an ancestor's), or None."""
    name = cgroup_name(cgroup)
    if name is None:
        return None
    if layout.v2 is not None and layout.v2_memory and _is_dir(layout.v2 / name):
        cap = _v2_cap(layout, name, root, inherited=True)
        if cap is not None:
            return cap
    if layout.v1_memory is not None and _is_dir(layout.v1_memory / name):
        return _v1_cap(layout, name, root, inherited=True)
    return None


def _children(path: Path) -> list[str]:
    try:
        with os.scandir(path) as entries:
            return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
    except OSError:
        return []


def _v1_populated(path: Path) -> bool:
    """Whether a v1 group or one under it has a process (v1 has no cgroup.events)."""
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        if "cgroup.procs" in files and (read_text(Path(folder), "cgroup.procs") or "").strip():
            return True
    return False


def _v2_populated(path: Path) -> bool:
    return "populated 1" in (read_text(path, "cgroup.events") or "")


def swap_caps(layout: CgroupLayout, *, root: Path = Path("/"), max_depth: int = 4
              ) -> tuple[SwapCap, ...]:
    """The populated cgroups (with processes, in them or under them) that swap cannot
    help, to ``max_depth`` levels; a group capped for all under it is named once."""
    found: list[SwapCap] = []
    hierarchies = []
    if layout.v2 is not None and layout.v2_memory:
        hierarchies.append((2, layout.v2))
    if layout.v1_memory is not None:
        hierarchies.append((1, layout.v1_memory))
    for version, top in hierarchies:
        todo = [(name, 1) for name in _children(top)]
        while todo:
            name, depth = todo.pop(0)
            if version == 2:
                cap = _v2_cap(layout, name, root, inherited=False)
                whole_subtree = cap is not None
                populated = _v2_populated(top / name)
            else:
                cap = _v1_cap(layout, name, root, inherited=False)
                whole_subtree = _v1_memsw_cap_at(layout, name) is not None
                populated = _v1_populated(top / name)
            if cap is not None and populated:
                found.append(cap)
            if not whole_subtree and depth < max_depth:  # swappiness is each group's own
                todo.extend((f"{name}/{child}", depth + 1) for child in _children(top / name))
    return tuple(found)


def read_swap_caps(root: Path = Path("/")) -> tuple[SwapCap, ...]:
    """``swap_caps`` of this host; () when its cgroups cannot be read (never raises)."""
    try:
        return swap_caps(read_layout(root), root=root)
    except Exception:  # a report must not fail on it
        return ()


# ---------------------------------------------------------------------------
# watching


@dataclass(frozen=True)
class _Node:
    """A group whose counters are read: v2 (memory.events.local,), v1 (memory.failcnt,
    memory.oom_control)."""

    version: int
    name: str
    files: tuple[str, ...]


def _small(path: str) -> bytes | None:
    """A cgroup file's bytes (read often: no pathlib, no text layer); None if unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)


def _flat(data: bytes) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in data.splitlines():
        key, _, value = line.partition(b" ")
        if value.strip().isdigit():  # ASCII digits only ("²" is no count)
            out[key.decode(errors="replace")] = int(value)
    return out


def _counts_of(node: _Node) -> dict[str, int] | None:
    """max/oom/oom_kill (v2), max/oom_kill/under_oom (v1) of ``node``; None if unreadable."""
    data = [_small(path) for path in node.files]
    if node.version == 2:
        if data[0] is None:
            return None
        events = _flat(data[0])
        return {kind: events.get(kind, 0) for kind in ("max", "oom", "oom_kill")}
    failcnt, control = data
    if failcnt is None or control is None or not failcnt.strip().isdigit():
        return None
    flags = _flat(control)
    return {"max": int(failcnt), "oom_kill": flags.get("oom_kill", 0),
            "under_oom": flags.get("under_oom", 0)}


@dataclass
class _Group:
    name: str
    v1: Path | None  # its folder in the v1 memory hierarchy
    v2: Path | None  # in the cgroup2 one
    psi_fd: int | None = None
    level_fds: tuple[int, int] | None = None  # (eventfd, memory.pressure_level)
    v1_ino: int | None = None  # the folders' inodes when armed (a group made again
    v2_ino: int | None = None  # under the same name has new ones)
    rearmed_at: int = -1  # the signals() call that armed it again (its fds are new)
    counting: bool = False  # its counters have a baseline
    nodes: tuple[_Node, ...] | None = None  # it and the groups under it, as last listed
    scanned_at: int = 0  # the signals() call that listed them
    problems: list[str] = field(default_factory=list)


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


class CgroupWatch:
    """Memory pressure, limit hits and OOM kills of some cgroups (and the groups under
    them, to SUBTREE_DEPTH levels, for the counters).

    ``arm()``, then poll ``fds()`` and call ``signals(ready)`` with the fds that were
    ready, about every 0.5 s even when none was (the counters are read each call; the
    groups under a watched one are listed again every RESCAN_CALLS calls). Call ``fds()``
    again after ``signals()``: a torn-down trigger leaves it.
    """

    def __init__(self, cgroups: Sequence[str], threshold_percent: float, *,
                 root: Path = Path("/"), layout: CgroupLayout | None = None) -> None:
        self.cgroups = tuple(cgroups)
        self.threshold_percent = threshold_percent
        self.root = root
        self.layout = layout
        self.watched: tuple[str, ...] = ()
        self.window_s: float | None = None  # of the PSI triggers, once one is armed
        self._groups: list[_Group] = []
        self._counts: dict[tuple[int, str], dict[str, int]] = {}
        self._calls = 0  # signals() calls

    # -- arming

    def arm(self) -> tuple[str, ...]:
        """Arm the notifications; one line per cgroup (or part of one) that could not be
        watched, and why. OSError only for a TRANSIENT errno (try again); then nothing
        stays open."""
        self.close()
        if self.layout is None:
            self.layout = read_layout(self.root)
        layout = self.layout
        lines: list[str] = []
        try:
            for cgroup in self.cgroups:
                name = cgroup_name(cgroup)
                if name is None:
                    lines.append(f"{cgroup!r}: not a cgroup path (relative, '/'-separated, "
                                 "no '..')")
                    continue
                v1 = layout.v1_memory / name if layout.v1_memory is not None else None
                v2 = layout.v2 / name if layout.v2 is not None else None
                outside = [p for p, top in ((v1, layout.v1_memory), (v2, layout.v2))
                           if p is not None and top is not None and _is_dir(p)
                           and not _inside(p, top)]
                if outside:  # never write a trigger through a link out of the tree
                    lines.append(f"{name}: not a cgroup ({_shown(outside[0], self.root)} "
                                 "is a link out of the cgroup hierarchy)")
                    continue
                group = _Group(name, v1 if v1 is not None and _is_dir(v1) else None,
                               v2 if v2 is not None and _is_dir(v2) else None)
                if group.v1 is None and group.v2 is None:
                    where = " or ".join(_shown(p, self.root) for p in (v1, v2) if p is not None)
                    lines.append(f"{name}: no such cgroup ({where or 'no cgroup hierarchy'})")
                    continue
                self._groups.append(group)  # close() finds its fds from here on
                group.v1_ino, group.v2_ino = _ino(group.v1), _ino(group.v2)
                if group.v2 is not None:
                    self._arm_psi(group)
                if group.v1 is not None:
                    self._arm_level(group)
                lines.extend(f"{name}: {problem}" for problem in group.problems)
                if group.psi_fd is None and group.level_fds is None and not self._scan(group):
                    self._groups.remove(group)
        except OSError:
            self.close()
            raise
        self.watched = tuple(g.name for g in self._groups)
        return tuple(lines)

    def _arm_psi(self, group: _Group) -> None:
        assert group.v2 is not None
        path = group.v2 / "memory.pressure"
        try:
            group.psi_fd, self.window_s = open_trigger(path, self.threshold_percent)
        except OSError as err:
            if err.errno in TRANSIENT:
                raise
            why = ("no memory.pressure (a kernel without PSI, or psi=0)"
                   if err.errno == errno.ENOENT else f"{err.strerror or err}")
            group.problems.append(f"no PSI trigger on {_shown(path, self.root)}: {why}")
        except HostError as err:
            group.problems.append(err.message)

    def _arm_level(self, group: _Group) -> None:
        """memory.pressure_level "medium" events on an eventfd (cgroup v1)."""
        assert group.v1 is not None
        efd = pfd = None
        try:
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            pfd = os.open(group.v1 / "memory.pressure_level", os.O_RDONLY | os.O_CLOEXEC)
            control = os.open(group.v1 / "cgroup.event_control",
                              os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                os.write(control, f"{efd} {pfd} medium".encode())
            finally:
                os.close(control)
        except OSError as err:
            _close(efd)
            _close(pfd)
            if err.errno in TRANSIENT:
                raise
            group.problems.append(f"no memory.pressure_level events in "
                                  f"{_shown(group.v1, self.root)}: {err.strerror or err}")
            return
        group.level_fds = (efd, pfd)

    def fds(self) -> dict[int, int]:
        """fd -> poll event mask, for the caller's select.poll."""
        out: dict[int, int] = {}
        for group in self._groups:
            if group.psi_fd is not None:
                out[group.psi_fd] = select.POLLPRI
            if group.level_fds is not None:
                out[group.level_fds[0]] = select.POLLIN
        return out

    # -- what happened

    def signals(self, ready: Collection[int]) -> tuple[CgroupSignal, ...]:
        """Consume what fired among ``ready`` and diff every watched group's counters; the
        first call after arm() only takes their baselines. A group that is gone leaves
        ``watched``."""
        out: list[CgroupSignal] = []
        seen: set[tuple[int, str]] = set()
        self._calls += 1
        for group in list(self._groups):
            if not self._still_there(group):  # first: a removed v1 group's eventfd fires
                continue
            # fds armed again in this call were not in the caller's poll (a number in
            # ``ready`` may be an old fd's, reused)
            pressure = self._fired(group, () if group.rearmed_at == self._calls else ready)
            if pressure:
                out.append(self._signal(group.name, "pressure", 1, group.name, pressure))
            out.extend(self._counter_signals(group, seen))
        self._counts = {key: value for key, value in self._counts.items() if key in seen}
        self.watched = tuple(g.name for g in self._groups)
        return tuple(out)

    def _fired(self, group: _Group, ready: Collection[int]) -> str:
        """What fired for ``group`` among ``ready`` ("" when nothing did)."""
        fired: list[str] = []
        if group.psi_fd is not None and group.psi_fd in ready:
            poller = select.poll()
            poller.register(group.psi_fd, select.POLLPRI)
            revents = sum(mask for _fd, mask in poller.poll(0))
            if revents & (select.POLLERR | select.POLLNVAL):  # the group was removed
                _close(group.psi_fd)
                group.psi_fd = None
            else:  # the caller's poll took the POLLPRI: it fired
                fired.append(f"memory stalled >= {self.threshold_percent:g}% of a "
                             f"{self.window_s or 2:g} s window (PSI)")
        if group.level_fds is not None and group.level_fds[0] in ready:
            try:
                count = os.eventfd_read(group.level_fds[0])
            except BlockingIOError:
                count = 0
            if count > 0:  # (also signalled when the group is removed)
                fired.append("memory.pressure_level medium")
        return "; ".join(fired)

    def _still_there(self, group: _Group) -> bool:
        """Drop what was removed (the group, or its folder in one hierarchy); arm again
        what was removed and made again under the same name (a restarted service).
        OSError as arm()'s (TRANSIENT)."""
        if group.v1 is not None and _ino(group.v1) != group.v1_ino:
            if group.level_fds is not None:
                _close(group.level_fds[0])
                _close(group.level_fds[1])
                group.level_fds = None
            group.v1_ino = _ino(group.v1)
            if group.v1_ino is None:
                group.v1 = None
            else:
                group.nodes, group.rearmed_at = None, self._calls  # the new group's tree
                self._arm_level(group)
        if group.v2 is not None and _ino(group.v2) != group.v2_ino:
            _close(group.psi_fd)
            group.psi_fd = None
            group.v2_ino = _ino(group.v2)
            if group.v2_ino is None:
                group.v2 = None
            else:
                group.nodes, group.rearmed_at = None, self._calls
                self._arm_psi(group)
        if group.v1 is None and group.v2 is None:
            self._groups.remove(group)
            return False
        return True

    def _nodes(self, top: Path, name: str) -> Iterator[tuple[str, Path]]:
        """``name`` and the groups under it, to SUBTREE_DEPTH levels, at most SUBTREE_NODES
        or this group's share of WATCH_NODES."""
        todo = [(name, top, 0)]
        given = 0
        limit = min(SUBTREE_NODES, max(1, WATCH_NODES // max(1, len(self._groups))))
        while todo and given < limit:
            node, path, depth = todo.pop(0)
            yield node, path
            given += 1
            if depth < SUBTREE_DEPTH:
                todo.extend((f"{node}/{child}", path / child, depth + 1)
                            for child in _children(path))

    def _scan(self, group: _Group) -> tuple[_Node, ...]:
        """The groups whose counters ``group`` reads, and their files."""
        layout = self.layout
        assert layout is not None
        out: list[_Node] = []
        if group.v1 is not None and (group.v1 / "memory.failcnt").exists():
            out.extend(_Node(1, node, (f"{path}/memory.failcnt", f"{path}/memory.oom_control"))
                       for node, path in self._nodes(group.v1, group.name))
        if group.v2 is not None and layout.v2_memory:
            if (group.v2 / "memory.events.local").exists():
                out.extend(_Node(2, node, (f"{path}/memory.events.local",))
                           for node, path in self._nodes(group.v2, group.name))
            elif (group.v2 / "memory.events").exists():  # before Linux 5.2: the group only
                out.append(_Node(2, group.name, (f"{group.v2}/memory.events",)))
        group.nodes, group.scanned_at = tuple(out), self._calls
        return group.nodes

    def _counter_signals(self, group: _Group, seen: set[tuple[int, str]]
                         ) -> list[CgroupSignal]:
        out: list[CgroupSignal] = []
        nodes = group.nodes
        if nodes is None or self._calls - group.scanned_at >= RESCAN_CALLS:
            nodes = self._scan(group)
        for node in nodes:
            key = (node.version, node.name)
            if key in seen:  # under two watched groups: counted once
                continue
            seen.add(key)  # one that cannot be read now keeps its last counts
            now = _counts_of(node)
            if now is None:
                continue
            before = self._counts.get(key)
            self._counts[key] = now
            if before is None:
                if not group.counting:
                    continue  # the first call: a baseline, no signals for old counts
                before = dict.fromkeys(now, 0)  # a group made since: its counts are new
            for kind in ("max", "oom", "oom_kill"):
                rise = now.get(kind, 0) - before.get(kind, 0)
                if rise < 0:  # a counter that went down: the group was made again
                    rise = now.get(kind, 0)
                if rise <= 0:
                    continue
                if node.version == 2:
                    detail = f"{node.files[0].rsplit('/', 1)[-1]} {kind}"
                else:
                    detail = "memory.failcnt" if kind == "max" else f"memory.oom_control {kind}"
                out.append(self._signal(node.name, kind, rise, group.name, detail))
            if now.get("under_oom") == 1 and before.get("under_oom") == 0:
                out.append(self._signal(node.name, "oom", 1, group.name,
                                        "memory.oom_control under_oom"))
        group.counting = True
        return out

    def _signal(self, cgroup: str, kind: SignalKind, count: int, watched: str, detail: str
                ) -> CgroupSignal:
        assert self.layout is not None
        return CgroupSignal(cgroup, unit_of(cgroup), kind, count,
                            swap_cap_of(self.layout, cgroup, root=self.root), watched, detail)

    def close(self) -> None:
        for group in self._groups:
            _close(group.psi_fd)
            if group.level_fds is not None:
                _close(group.level_fds[0])
                _close(group.level_fds[1])
        self._groups = []
        self.watched = ()
