"""systemd-oomd on the node, rooted at ``root``: whether it runs, its version, the swap
limit it kills at (``SwapUsedLimit=``) and the units whose cgroups it watches for swap
(``ManagedOOMSwap=kill``).

systemd-oomd re-reads SwapTotal and SwapFree from /proc/meminfo every 0.15 s, so swap
files clusterctl adds count at once: nothing here, or anywhere in clusterctl, restarts
or reloads it. Everything is read from files; only the version may come from running
``systemd-oomd --version`` when no dpkg database names it.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

COMM = "systemd-oomd"
DEFAULT_SWAP_USED_LIMIT_PERCENT = 90.0  # systemd's built-in default
BINARY_PATHS = ("usr/lib/systemd/systemd-oomd", "lib/systemd/systemd-oomd")
PACKAGES = ("systemd-oomd", "systemd")  # Debian and Ubuntu package it on its own
# oomd.conf: the first main file found is read, then every drop-in, by file name; of two
# drop-ins of one name, the one in the later directory here wins (lowest priority first).
CONF_MAIN = ("etc/systemd/oomd.conf", "run/systemd/oomd.conf",
             "usr/local/lib/systemd/oomd.conf", "usr/lib/systemd/oomd.conf")
CONF_DROPIN_DIRS = ("lib/systemd/oomd.conf.d", "usr/lib/systemd/oomd.conf.d",
                    "usr/local/lib/systemd/oomd.conf.d", "run/systemd/oomd.conf.d",
                    "etc/systemd/oomd.conf.d")
# Unit directories, lowest priority first: `systemctl set-property` writes system.control.
UNIT_DIRS = ("lib/systemd/system", "usr/lib/systemd/system", "usr/local/lib/systemd/system",
             "run/systemd/system", "etc/systemd/system", "run/systemd/transient",
             "run/systemd/system.control", "etc/systemd/system.control")
CGROUP_UNIT_SUFFIXES = (".slice", ".service", ".scope", ".socket", ".mount", ".swap")
VERSION_TIMEOUT_S = 2.0
TEXT_LIMIT_BYTES = 1 << 20  # of a unit or conf file (systemd's own line limit is 1 MiB)
DPKG_STATUS_LIMIT_BYTES = 64 << 20

_VERSION_LINE = re.compile(r"^systemd (\d+) \(([^)\s]+)\)")
_LIMIT = re.compile(r"^(\d+(?:\.\d+)?)\s*(%|‰|‱)$")
_SCALE = {"%": 1.0, "‰": 0.1, "‱": 0.01}


@dataclass(frozen=True)
class OomdFacts:
    pid: int | None  # the running systemd-oomd; None when none runs
    version: int | None  # systemd's major version (252), None when unknown
    version_text: str | None  # as packaged or reported: "252.39-1~deb12u2"
    swap_used_limit_percent: float  # SwapUsedLimit=: kill once memory and swap pass it
    swap_used_limit_file: str | None  # the file that set it; None: the built-in 90 %
    swap_kill_units: tuple[str, ...]  # units whose files end with ManagedOOMSwap=kill

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def watches_swap(self) -> bool:
        """It runs and some unit asks it to kill on swap use (else its swap rule is off)."""
        return self.running and bool(self.swap_kill_units)

    @property
    def name(self) -> str:
        """"systemd-oomd 252", or without the version when it is unknown."""
        return f"{COMM} {self.version}" if self.version is not None else COMM


def read_oomd(root: Path, *, run: Callable[[list[str]], str | None] | None = None) -> OomdFacts:
    """What `clusterctl check` says about systemd-oomd. Unreadable files count as absent.

    ``run`` runs a command and returns its output (None when it fails); the default runs
    it for real, with a timeout of VERSION_TIMEOUT_S.
    """
    pid = oomd_pid(root)
    limit, source = swap_used_limit(root)
    if pid is None:  # the rest costs a read of every unit file: only when it matters
        return OomdFacts(None, None, None, limit, source, ())
    text = package_version(root) or binary_version(root, pid, run or _run)
    major = re.match(r"(?:\d+:)?(\d+)", text) if text else None  # past a Debian epoch
    return OomdFacts(pid, int(major.group(1)) if major else None, text, limit, source,
                     swap_kill_units(root))


def oomd_pid(root: Path) -> int | None:
    """The lowest pid whose comm is systemd-oomd, from root/proc."""
    found: list[int] = []
    with contextlib.suppress(OSError), os.scandir(root / "proc") as entries:
        for entry in entries:
            if entry.name.isdigit() and _text(Path(entry.path) / "comm").strip() == COMM:
                found.append(int(entry.name))
    return min(found) if found else None


def package_version(root: Path) -> str | None:
    """The installed version of systemd-oomd's package in the dpkg database, if any."""
    versions: dict[str, str] = {}
    for stanza in _text(root / "var/lib/dpkg/status", DPKG_STATUS_LIMIT_BYTES).split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line
                      and not line.startswith(" "))
        package = fields.get("Package")
        if package in PACKAGES and fields.get("Status", "").endswith(" installed"):
            versions[package] = fields.get("Version", "").strip()
    return next((versions[p] for p in PACKAGES if versions.get(p)), None)


def binary_version(root: Path, pid: int, run: Callable[[list[str]], str | None]) -> str | None:
    """What ``systemd-oomd --version`` says ("252.39-1~deb12u2"), running the binary the
    process was started from, or the packaged one."""
    candidates: list[str] = []
    with contextlib.suppress(OSError):
        candidates.append(str((root / "proc" / str(pid) / "exe").readlink()).lstrip("/"))
    for rel in (*candidates, *BINARY_PATHS):
        binary = root / rel
        if binary.is_file() and os.access(binary, os.X_OK):
            output = run([str(binary), "--version"])
            match = _VERSION_LINE.match(output or "")
            return match.group(2) if match else None
    return None


def swap_used_limit(root: Path) -> tuple[float, str | None]:
    """SwapUsedLimit= as systemd-oomd reads it (percent), and the file that set it."""
    limit, source = DEFAULT_SWAP_USED_LIMIT_PERCENT, None
    main = next((rel for rel in CONF_MAIN if (root / rel).is_file()), None)
    files = ([root / main] if main else []) + _dropins(root, CONF_DROPIN_DIRS, ".conf")
    for path in files:
        for section, key, value in _assignments(_text(path)):
            if section != "OOM" or key not in ("SwapUsedLimit", "SwapUsedLimitPercent"):
                continue
            if not value:
                limit, source = DEFAULT_SWAP_USED_LIMIT_PERCENT, None
            elif (parsed := parse_limit(value)) is not None:
                limit, source = parsed, "/" + str(path.relative_to(root))
    return limit, source


def parse_limit(value: str) -> float | None:
    """"90%", "87.5%", "900‰", "9000‱" as a percent; None for what systemd ignores."""
    match = _LIMIT.match(value.strip())
    if not match:
        return None
    percent = float(match.group(1)) * _SCALE[match.group(2)]
    return percent if 0 <= percent <= 100 else None


def swap_kill_units(root: Path) -> tuple[str, ...]:
    """Units whose unit file and drop-ins leave ManagedOOMSwap=kill: oomd watches their
    cgroups' descendants for swap. Type-wide and slice-prefix drop-ins are not followed.
    Each unit directory is listed once; only files that name the setting are parsed."""
    unit_files: dict[str, os.DirEntry[str]] = {}  # the highest-priority file of each unit
    dropins: dict[str, dict[str, str]] = {}  # unit -> {conf name: path}
    for rel in UNIT_DIRS:  # lowest priority first: later entries replace earlier ones
        for entry in _listing(root / rel):
            if entry.name.endswith(CGROUP_UNIT_SUFFIXES):
                unit_files[entry.name] = entry
            elif entry.name.endswith(".d") and entry.name[:-2].endswith(CGROUP_UNIT_SUFFIXES):
                confs = dropins.setdefault(entry.name[:-2], {})
                confs.update((e.name, e.path) for e in _listing(Path(entry.path))
                             if e.name.endswith(".conf"))
    kill = []
    for unit in sorted(set(unit_files) | set(dropins)):
        found = unit_files.get(unit)
        if found is not None and _masked(found):
            continue
        paths = ([found.path] if found is not None else []) + [
            path for _, path in sorted(dropins.get(unit, {}).items())]
        if _managed_oom_swap(paths) == "kill":
            kill.append(unit)
    return tuple(kill)


def _listing(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except OSError:
        return []


def _masked(entry: os.DirEntry[str]) -> bool:
    """A unit file linked to /dev/null, or empty: systemd treats the unit as masked."""
    try:
        if entry.is_symlink():  # realpath: a link loop is no error
            return os.path.realpath(entry.path) == "/dev/null"
        return entry.stat().st_size == 0
    except OSError:
        return False


def _managed_oom_swap(paths: Iterable[str]) -> str | None:
    """The ManagedOOMSwap= value the files leave, applied in order (the last one wins)."""
    value: str | None = None
    for path in paths:
        text = _text(Path(path))
        if "ManagedOOMSwap" not in text:
            continue
        for section, key, setting in _assignments(text):
            if key == "ManagedOOMSwap" and section not in ("Unit", "Install"):
                value = setting or None
    return value


def _dropins(root: Path, directories: Iterable[str], suffix: str) -> list[Path]:
    """``*suffix`` files of ``directories`` (lowest priority first), by name; a later
    directory's file of the same name replaces an earlier one's."""
    chosen: dict[str, Path] = {}
    for rel in directories:
        with contextlib.suppress(OSError):
            for entry in (root / rel).iterdir():
                if entry.name.endswith(suffix):
                    chosen[entry.name] = entry
    return [chosen[name] for name in sorted(chosen)]


def _assignments(text: str) -> Iterator[tuple[str, str, str]]:
    """(section, key, value) of each assignment in a systemd-style ini file."""
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            continue
        key, sep, value = line.partition("=")
        if sep:
            yield section, key.strip(), value.strip()


def _text(path: Path, limit_bytes: int = TEXT_LIMIT_BYTES) -> str:
    """The file's first ``limit_bytes`` as text; "" when it is absent, unreadable or not a
    regular file (/dev/null masks; a FIFO or /dev/zero would never end)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except (OSError, ValueError):
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        chunks: list[bytes] = []
        left = limit_bytes
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks).decode("utf-8", errors="replace")
    except OSError:
        return ""
    finally:
        os.close(fd)


def _run(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False,
                              timeout=VERSION_TIMEOUT_S, env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None
