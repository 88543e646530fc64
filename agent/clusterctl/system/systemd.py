"""systemd: unit files (drop-ins clusterctl writes for its own units) and the manager over
D-Bus (pystemd): reload unit files, restart a unit only if it runs."""

from __future__ import annotations

import contextlib
import posixpath
import re
import shlex
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from clusterctl.errors import HostError

AGENT_UNIT = "clusterctl-agent.service"
SWAP_UNIT = "clusterctl-swap.service"
SWAP_DIR_UNITS = (SWAP_UNIT, AGENT_UNIT)  # the units that write swap files
UNIT_DIR = "/etc/systemd/system"  # where install.sh puts them, and their drop-ins go
DROPIN_DIRS = ("/usr/lib/systemd/system", "/lib/systemd/system", UNIT_DIR,
               "/run/systemd/system")  # lowest priority first
SWAP_DIR_DROPIN = "swap-dir.conf"
WATCH_CGROUPS_DROPIN = "watch-cgroups.conf"
# the groups the agent's unit makes writable itself (its ReadWritePaths= under
# ProtectControlGroups=yes), and where each cgroup layout puts a group: unified, hybrid
# cgroup2, v1 memory
AGENT_UNIT_CGROUPS = ("system.slice", "user.slice", "machine.slice")
CGROUP_TOPS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/memory")
# a v1 (legacy, hybrid) layout mounts these at /sys/fs/cgroup/NAME: a whole hierarchy
V1_HIERARCHIES = frozenset({
    "blkio", "cpu", "cpuacct", "cpu,cpuacct", "cpuset", "devices", "freezer", "hugetlb",
    "memory", "misc", "net_cls", "net_prio", "net_cls,net_prio", "perf_event", "pids",
    "rdma", "systemd", "unified"})
UNITS_WRITE = "/var/lib/clusterctl"  # every swap unit's own ReadWritePaths=
UNITS_CONFIG = Path("/etc/clusterctl/clusterctl.toml")  # the config the units read


def systemd_running(root: Path = Path("/")) -> bool:
    """sd_booted(): systemd is PID 1 here."""
    return (root / "run/systemd/system").is_dir()


class Systemd:
    """The system manager of this machine, connected on first use."""

    def __init__(self) -> None:
        self._manager: Any = None

    def _connect(self) -> Any:
        if self._manager is None:
            try:
                from pystemd.systemd1 import Manager
            except ImportError as err:
                raise HostError("pystemd is not installed",
                                fix="reinstall clusterctl (install.sh)") from err
            manager = Manager()
            try:
                manager.load()
            except Exception as err:  # pystemd raises DBusError subclasses and OSError
                raise HostError(f"cannot reach systemd over D-Bus: {err}",
                                fix="is dbus running? systemctl status dbus") from err
            self._manager = manager
        return self._manager

    def daemon_reload(self) -> None:
        self._connect().Manager.Reload()

    def _unit(self, unit: str) -> Any:
        from pystemd.systemd1 import Unit

        handle = Unit(unit.encode())
        handle.load()
        return handle.Unit

    def active_state(self, unit: str) -> str:
        return str(self._unit(unit).ActiveState.decode())

    def restart_if_active(self, unit: str, *, wait_s: float = 90.0) -> bool:
        """Restart ``unit`` when it is active (running or starting); True if it was.

        Waits until it is active again (a new ActiveEnterTimestamp) or has failed.
        """
        before = self._unit(unit)
        if before.ActiveState.decode() not in ("active", "activating", "reloading"):
            return False
        entered = before.ActiveEnterTimestampMonotonic
        self._connect().Manager.RestartUnit(unit.encode(), b"replace")
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            now = self._unit(unit)
            state = now.ActiveState.decode()
            if state == "active" and now.ActiveEnterTimestampMonotonic != entered:
                return True
            if state == "failed":
                raise HostError(f"{unit} failed after the restart",
                                fix=f"journalctl -u {unit}; `clusterctl optimize revert` "
                                "undoes the change")
            time.sleep(0.1)
        raise HostError(f"{unit} is still restarting after {wait_s:.0f} s",
                        fix=f"journalctl -u {unit}")


# -- which unit this process runs in --------------------------------------------------


def own_unit(root: Path = Path("/")) -> str | None:
    """The systemd service this process runs in (from its cgroup), or None: run by
    hand, in a test, or without systemd."""
    try:
        text = (root / "proc/self/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        _hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if controllers not in ("", "name=systemd"):  # cgroup v2, or v1's systemd tree
            continue
        for part in reversed(path.split("/")):
            if part.endswith(".service"):
                return part
    return None


# -- the swap dir in the units' sandbox ------------------------------------------------


def _under(path: str, top: str) -> bool:
    path, top = posixpath.normpath(path), posixpath.normpath(top)
    return path == top or path.startswith(top.rstrip("/") + "/")


def _unit_path(path: str, prefix: str = "") -> str:
    """``prefix`` + ``path`` as a unit file list item: ``%`` doubled (specifiers), and in
    double quotes, backslash-escaped, when it holds a blank, a quote or a backslash."""
    text = (prefix + path).replace("%", "%%")
    if re.search(r"[\s\"'\\]", text):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def swap_dir_dropin(swap_dir: Path) -> str | None:
    """What each swap unit needs so its sandbox (ProtectSystem=strict) can write
    ``swap_dir``, or None when its own ReadWritePaths= covers it already. "-": a dir
    that is missing at start does not keep the unit (the agent) from starting."""
    directory = posixpath.normpath(str(swap_dir))
    if _under(directory, UNITS_WRITE):
        return None
    return ("# Written by clusterctl (`clusterctl config set swap.dir`, install.sh): lets this\n"
            "# unit write the swap dir under ProtectSystem=strict, and start after its mount.\n"
            "# Removed when [swap] dir is back under /var/lib/clusterctl; do not edit.\n"
            f"[Unit]\nRequiresMountsFor={_unit_path(directory)}\n\n"
            f"[Service]\nReadWritePaths={_unit_path(directory, '-')}\n")


def watch_cgroups_dropin(cgroups: Sequence[str]) -> str | None:
    """What the agent's unit needs so its sandbox (ProtectControlGroups=yes) lets it arm
    pressure triggers in the watched ``cgroups`` (config form: "kubepods.slice/x"), or
    None when its own ReadWritePaths= cover them all (groups under its default slices).
    Each group at every layout's place; "-": a place missing at start is skipped."""
    groups: list[str] = []
    for group in cgroups:
        if not any(_under(group, top) for top in (*AGENT_UNIT_CGROUPS, *groups)):
            groups = [g for g in groups if not _under(g, group)] + [group]
    if not groups:
        return None
    lines = "".join(
        "ReadWritePaths=" + " ".join(
            _unit_path(f"{top}/{group}", "-") for top in CGROUP_TOPS
            # on v1, /sys/fs/cgroup/memory is the whole hierarchy, not a group "memory"
            if top != CGROUP_TOPS[0] or group.split("/")[0] not in V1_HIERARCHIES) + "\n"
        for group in groups)
    return ("# Written by clusterctl (`clusterctl config set swap.watch_cgroups`, install.sh):\n"
            "# lets the agent arm memory pressure triggers in these watched cgroups under\n"
            "# ProtectControlGroups=yes. Removed when [swap] watch_cgroups holds only groups\n"
            "# under system.slice, user.slice, machine.slice; do not edit.\n"
            f"[Service]\n{lines}")


@dataclass(frozen=True)
class Dropin:
    """A drop-in clusterctl keeps for its units: the file name in each unit's ``.d``
    directory, and its text (None: not needed, a stale one is removed)."""

    name: str
    units: tuple[str, ...]
    text: str | None

    def paths(self) -> tuple[str, ...]:
        return tuple(f"{UNIT_DIR}/{unit}.d/{self.name}" for unit in self.units)


def unit_dropins(swap_dir: Path, watch_cgroups: Sequence[str]) -> tuple[Dropin, ...]:
    """Every drop-in the units need for this config: the swap dir, the watched cgroups."""
    return (_swap_dir(swap_dir),
            Dropin(WATCH_CGROUPS_DROPIN, (AGENT_UNIT,), watch_cgroups_dropin(watch_cgroups)))


def _swap_dir(swap_dir: Path) -> Dropin:
    return Dropin(SWAP_DIR_DROPIN, SWAP_DIR_UNITS, swap_dir_dropin(swap_dir))


@dataclass(frozen=True)
class DropinChange:
    action: Literal["write", "remove"]
    path: str  # as on the host (not under a test's root)


def dropin_changes(dropins: Sequence[Dropin], *, root: Path = Path("/")
                   ) -> tuple[DropinChange, ...]:
    """The drop-in files to write or remove so that they say what ``dropins`` say."""
    changes = []
    for dropin in dropins:
        for path in dropin.paths():
            current = _read(root / path.lstrip("/"))
            if dropin.text is not None and current != dropin.text:
                changes.append(DropinChange("write", path))
            elif dropin.text is None and current is not None:
                changes.append(DropinChange("remove", path))
    return tuple(changes)


def swap_dir_changes(swap_dir: Path, *, root: Path = Path("/")) -> tuple[DropinChange, ...]:
    """The drop-ins to write or remove so that the swap units can reach ``swap_dir``."""
    return dropin_changes((_swap_dir(swap_dir),), root=root)


@dataclass(frozen=True)
class DropinSync:
    changes: tuple[DropinChange, ...]
    restarted: tuple[str, ...] = ()  # running units restarted to take their new sandbox


def sync_swap_dir_dropins(swap_dir: Path, *, root: Path = Path("/"), dry_run: bool = False,
                          manager: Systemd | None = None) -> DropinSync:
    """sync_dropins() for the swap units' ``swap-dir.conf`` alone."""
    return sync_dropins((_swap_dir(swap_dir),), root=root, dry_run=dry_run, manager=manager)


def sync_dropins(dropins: Sequence[Dropin], *, root: Path = Path("/"), dry_run: bool = False,
                 manager: Systemd | None = None) -> DropinSync:
    """Write (or remove) the units' drop-ins (unit_dropins()). When one changed and
    systemd runs this root: a daemon-reload, and a running agent is restarted (a sandbox
    is set up at start; until then it could not write the new swap dir or cgroups).
    Nothing is written where no unit directory exists (no units installed)."""
    if not (root / UNIT_DIR.lstrip("/")).is_dir():
        return DropinSync(())
    changes = dropin_changes(dropins, root=root)
    if dry_run or not changes:
        return DropinSync(changes)
    from clusterctl import system

    texts = {path: dropin.text for dropin in dropins for path in dropin.paths()}
    for change in changes:
        target = root / change.path.lstrip("/")
        text = texts[change.path]
        if change.action == "write":
            assert text is not None
            with contextlib.suppress(FileExistsError):
                target.parent.mkdir(mode=0o755)
            system.atomic_write_text(target, text, mode=0o644, keep_owner=False)
        else:
            target.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # not empty: an operator's drop-in too
                target.parent.rmdir()
    if root != Path("/") or not systemd_running(root):
        return DropinSync(changes)
    manager = manager or Systemd()
    manager.daemon_reload()
    agent_changed = any(c.path.startswith(f"{UNIT_DIR}/{AGENT_UNIT}.d/") for c in changes)
    restarted = (AGENT_UNIT,) if agent_changed and manager.restart_if_active(AGENT_UNIT) else ()
    return DropinSync(changes, restarted)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError):
        return ""  # unreadable: rewritten


def _unit_files(unit: str, root: Path) -> Iterator[Path]:
    """The unit file systemd loads, then its drop-ins in the order they apply."""
    for directory in reversed(DROPIN_DIRS):  # the first found wins
        path = root / directory.lstrip("/") / unit
        if path.is_file():
            yield path
            break
    else:
        return
    dropins: dict[str, Path] = {}
    for directory in DROPIN_DIRS:  # a later directory's file of the same name wins
        folder = root / directory.lstrip("/") / f"{unit}.d"
        with contextlib.suppress(OSError):
            for entry in folder.iterdir():
                if entry.suffix == ".conf":
                    dropins[entry.name] = entry
    yield from (dropins[name] for name in sorted(dropins))


def _service_settings(unit: str, root: Path) -> tuple[str, list[str]] | None:
    """(ProtectSystem=, ReadWritePaths=) of an installed unit and its drop-ins, or None
    when it is not installed."""
    files = list(_unit_files(unit, root))
    if not files:
        return None
    protect = "no"
    writable: list[str] = []
    for path in files:
        section = ""
        text = _read(path) or ""
        for raw in text.splitlines():
            line = raw.strip()
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
                continue
            key, sep, value = line.partition("=")
            if section != "Service" or not sep:
                continue
            if key.strip() == "ProtectSystem":
                protect = value.strip()
            elif key.strip() == "ReadWritePaths":
                items = _split_paths(value)
                writable = [] if not items else writable + items
    return protect, writable


def _split_paths(value: str) -> list[str]:
    try:
        words = shlex.split(value.replace("%%", "%"))
    except ValueError:
        words = value.split()
    return [w.lstrip("-+") for w in words]


def swap_dir_unreachable(swap_dir: Path, *, root: Path = Path("/")) -> tuple[str, ...]:
    """The installed swap units whose sandbox cannot write ``swap_dir``: ProtectSystem=
    strict and no ReadWritePaths= (the unit's, a drop-in's) covering it. Read from the
    unit files, as systemd loads them after a daemon-reload."""
    directory = posixpath.normpath(str(swap_dir))
    blocked = []
    for unit in SWAP_DIR_UNITS:
        settings = _service_settings(unit, root)
        if settings is None:
            continue
        protect, writable = settings
        if protect == "strict" and not any(_under(directory, w) for w in writable):
            blocked.append(unit)
    return tuple(blocked)
