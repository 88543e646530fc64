"""CPU, memory, swap and pressure from /proc and /sys, rooted at ``root``.

Parsers take text and return frozen facts; readers add the file access. A
value the kernel does not report is ``None``, never 0.
"""

from __future__ import annotations

import contextlib
import errno
import re
from dataclasses import dataclass
from pathlib import Path

from clusterctl.errors import HostError
from clusterctl.units import KIB, percent


def read_text(root: Path, relative: str) -> str | None:
    """Text of ``root/relative``, or None when it is absent or unreadable."""
    text = read_text_or_error(root, relative)
    return text if isinstance(text, str) else None


def read_text_or_error(root: Path, relative: str) -> str | OSError:
    """Text of ``root/relative``, or the error that kept it from being read (to say why)."""
    try:
        return (root / relative.lstrip("/")).read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        return err


# ---------------------------------------------------------------------------
# memory


@dataclass(frozen=True)
class MemoryFacts:
    total_bytes: int
    free_bytes: int
    available_bytes: int | None  # MemAvailable: kernels before 3.14 lack it
    buffers_bytes: int
    cached_bytes: int
    swap_total_bytes: int
    swap_free_bytes: int
    committed_as_bytes: int | None

    @property
    def used_bytes(self) -> int:
        """Memory in use the way `free` counts it (total minus available)."""
        if self.available_bytes is not None:
            return self.total_bytes - self.available_bytes
        return self.total_bytes - self.free_bytes - self.buffers_bytes - self.cached_bytes

    @property
    def used_percent(self) -> float | None:
        return percent(self.used_bytes, self.total_bytes)

    @property
    def swap_used_bytes(self) -> int:
        return self.swap_total_bytes - self.swap_free_bytes

    @property
    def swap_used_percent(self) -> float | None:
        return percent(self.swap_used_bytes, self.swap_total_bytes)


def parse_meminfo(text: str) -> MemoryFacts:
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep:
            continue
        fields = rest.split()
        if not fields or not fields[0].isdigit():
            continue
        scale = KIB if len(fields) > 1 and fields[1] == "kB" else 1
        values[key.strip()] = int(fields[0]) * scale
    if "MemTotal" not in values:
        raise ValueError("meminfo has no MemTotal line")
    if ("SwapTotal" in values) != ("SwapFree" in values):  # a short read: not "all used"
        raise ValueError("meminfo has SwapTotal without SwapFree, or the other way round")
    return MemoryFacts(
        total_bytes=values["MemTotal"],
        free_bytes=values.get("MemFree", 0),
        available_bytes=values.get("MemAvailable"),
        buffers_bytes=values.get("Buffers", 0),
        cached_bytes=values.get("Cached", 0),
        swap_total_bytes=values.get("SwapTotal", 0),
        swap_free_bytes=values.get("SwapFree", 0),
        committed_as_bytes=values.get("Committed_AS"),
    )


def read_memory(root: Path) -> MemoryFacts:
    path = root / "proc/meminfo"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:  # absent, or no descriptor left (EMFILE): say which
        raise HostError(f"cannot read {path}: {err.strerror}",
                        fix="is /proc mounted (or --root a host tree)?"
                        if isinstance(err, FileNotFoundError) else None) from err
    try:
        return parse_meminfo(text)
    except ValueError as err:
        raise HostError(f"cannot parse {path}: {err}") from err


def read_boot_id(root: Path) -> str | None:
    """This boot's random id: tells "after a reboot" apart from "swapped off by someone"."""
    text = read_text(root, "proc/sys/kernel/random/boot_id")
    return text.strip() if text else None


# ---------------------------------------------------------------------------
# swap areas


@dataclass(frozen=True)
class SwapArea:
    path: str
    type: str  # "file" or "partition"
    size_bytes: int
    used_bytes: int
    priority: int

    @property
    def is_zram(self) -> bool:
        return self.path.startswith("/dev/zram")


def unescape_octal(text: str) -> str:
    """The kernel writes space, tab, newline and backslash in paths as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def parse_swaps(text: str) -> tuple[SwapArea, ...]:
    areas = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 5:
            continue
        path, kind, size_kib, used_kib, priority = fields[:5]
        areas.append(
            SwapArea(
                path=unescape_octal(path),
                type=kind,
                size_bytes=int(size_kib) * KIB,
                used_bytes=int(used_kib) * KIB,
                priority=int(priority),
            )
        )
    return tuple(areas)


def read_swaps(root: Path) -> tuple[SwapArea, ...]:
    text = read_text(root, "proc/swaps")
    return parse_swaps(text) if text is not None else ()


# ---------------------------------------------------------------------------
# pressure stall information


@dataclass(frozen=True)
class PressureLine:
    avg10: float
    avg60: float
    avg300: float
    total_us: int


@dataclass(frozen=True)
class Pressure:
    some: PressureLine
    full: PressureLine | None  # /proc/pressure/cpu has no "full" before 5.13


@dataclass(frozen=True)
class PressureFacts:
    cpu: Pressure | None
    memory: Pressure | None
    io: Pressure | None
    reason: str | None  # why PSI is missing, when it is

    @property
    def available(self) -> bool:
        return self.memory is not None


def parse_pressure(text: str) -> Pressure:
    lines: dict[str, PressureLine] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        values = dict(part.split("=", 1) for part in rest.split() if "=" in part)
        lines[kind] = PressureLine(
            avg10=float(values["avg10"]),
            avg60=float(values["avg60"]),
            avg300=float(values["avg300"]),
            total_us=int(values["total"]),
        )
    if "some" not in lines:
        raise ValueError("pressure file has no 'some' line")
    return Pressure(some=lines["some"], full=lines.get("full"))


def read_pressure(root: Path) -> PressureFacts:
    results: dict[str, Pressure | None] = {}
    unreadable: OSError | None = None
    for resource in ("cpu", "memory", "io"):
        text = read_text_or_error(root, f"proc/pressure/{resource}")
        if isinstance(text, OSError):
            results[resource] = None
            if resource == "memory" and text.errno not in (errno.ENOENT, errno.EOPNOTSUPP):
                unreadable = text  # there, but not for us (EACCES, EIO); psi=0: EOPNOTSUPP
            continue
        try:
            results[resource] = parse_pressure(text) if text else None
        except (ValueError, KeyError):
            results[resource] = None  # a format this version does not know: no PSI, not a crash
    reason = None
    if results["memory"] is None:
        if unreadable is not None:
            reason = f"cannot read /proc/pressure/memory: {unreadable.strerror or unreadable}"
        elif _is_dir(root / "proc/pressure"):
            reason = "PSI is compiled in but disabled (boot with psi=1)"
        else:
            reason = "kernel has no PSI (needs Linux 4.20+ with CONFIG_PSI)"
    return PressureFacts(cpu=results["cpu"], memory=results["memory"], io=results["io"],
                         reason=reason)


def _is_dir(path: Path) -> bool:
    """Whether ``path`` is a directory; False also when it cannot be looked at."""
    try:
        return path.is_dir()
    except OSError:
        return False


# ---------------------------------------------------------------------------
# CPU


@dataclass(frozen=True)
class CpuTimes:
    busy: int
    total: int


@dataclass(frozen=True)
class CpuFacts:
    logical_cores: int
    physical_cores: int | None
    model: str | None
    usage_percent: float | None  # over the sampling interval; None if not sampled
    load_1m: float | None
    load_5m: float | None
    load_15m: float | None


def parse_cpuinfo(text: str) -> tuple[int, int | None, str | None]:
    """Logical cores, physical cores (None when not reported) and model name."""
    logical = 0
    cores: set[tuple[str, str]] = set()
    physical_id = core_id = None
    model: str | None = None
    for line in [*text.splitlines(), ""]:
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "processor":
            logical += 1
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            core_id = value
        elif key in ("model name", "Model", "cpu model") and model is None:
            model = value
        elif key == "":
            if physical_id is not None and core_id is not None:
                cores.add((physical_id, core_id))
            physical_id = core_id = None
    return logical, (len(cores) or None), model


def _physical_from_sysfs(root: Path) -> int | None:
    pairs = set()
    try:  # a CPU taken offline while listed: its directory goes (ENOENT mid-glob)
        topologies = list((root / "sys/devices/system/cpu").glob("cpu[0-9]*/topology"))
    except OSError:
        return None
    for topo in topologies:
        core = read_text(root, str(topo.relative_to(root) / "core_id"))
        package = read_text(root, str(topo.relative_to(root) / "physical_package_id"))
        if core is None or package is None:
            continue
        pairs.add((package.strip(), core.strip()))
    return len(pairs) or None


def parse_stat_cpu(text: str) -> CpuTimes:
    for line in text.splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:]]
            # user nice system idle iowait irq softirq steal guest guest_nice
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            # guest time is already counted in user and nice
            total = sum(values[:8])
            return CpuTimes(busy=total - idle, total=total)
    raise ValueError("/proc/stat has no aggregate cpu line")


def cpu_usage_percent(first: CpuTimes, second: CpuTimes) -> float | None:
    elapsed = second.total - first.total
    if elapsed <= 0:
        return None
    return max(0.0, min(100.0, 100.0 * (second.busy - first.busy) / elapsed))


def read_cpu_times(root: Path) -> CpuTimes | None:
    text = read_text(root, "proc/stat")
    try:
        return parse_stat_cpu(text) if text else None
    except (ValueError, IndexError):
        return None


def read_cpu(root: Path, *, usage_percent: float | None = None) -> CpuFacts:
    """Cores, model and load; ``usage_percent`` comes from two read_cpu_times samples."""
    cpuinfo = read_text(root, "proc/cpuinfo") or ""
    logical, physical, model = parse_cpuinfo(cpuinfo)
    if logical == 0:
        logical = _count_online(read_text(root, "sys/devices/system/cpu/online")) or 1
    if physical is None:
        physical = _physical_from_sysfs(root)
    loads: list[float | None] = [None, None, None]
    loadavg = read_text(root, "proc/loadavg")
    if loadavg:
        with contextlib.suppress(ValueError):
            loads = [float(v) for v in loadavg.split()[:3]]
    return CpuFacts(
        logical_cores=logical,
        physical_cores=physical,
        model=model,
        usage_percent=usage_percent,
        load_1m=loads[0],
        load_5m=loads[1],
        load_15m=loads[2],
    )


def _count_online(text: str | None) -> int | None:
    """CPUs in a list like "0-3,8-11"."""
    if not text:
        return None
    count = 0
    for part in text.strip().split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count
