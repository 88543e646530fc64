"""The resource checker's judgement: tier, score, findings and recommendations.

Pure functions of host facts, config and the optimize plan; nothing here reads
the host. Nothing here chooses a setting either: the recommendations are the
plan of ``optimize.plan`` (what `clusterctl optimize apply` would write, and
why), which starts from the hardware table's row as its floor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from clusterctl.config import Config
from clusterctl.host import HostFacts
from clusterctl.host.disk_speed import WriteTestResult
from clusterctl.optimize.plan import OptimizePlan, Setting, Tier, ram_counts_as, tier_profile
from clusterctl.swap.filesystems import swapfile_support
from clusterctl.units import GIB, format_size

Severity = Literal["fail", "warn", "info"]
Mode = Literal["quick", "full"]

MIN_CORES = 2
MIN_RAM_GIB = 4
MIN_SWAP_DIR_FREE_BYTES = 10 * GIB


@dataclass(frozen=True)
class ScorePart:
    name: str
    points: float
    max_points: float
    detail: str


@dataclass(frozen=True)
class Finding:
    severity: Severity
    code: str
    message: str
    fix: str | None = None


@dataclass(frozen=True)
class Report:
    mode: Mode
    tier: Tier
    score: int
    score_parts: tuple[ScorePart, ...]
    findings: tuple[Finding, ...]
    plan: OptimizePlan | None  # what `optimize apply` would do; None: its facts were unreadable
    write_test: WriteTestResult | None

    @property
    def ready(self) -> bool:
        """False when the host is below the minimum (`check` exits 1)."""
        return not any(f.severity == "fail" for f in self.findings)

    @property
    def recommendations(self) -> tuple[Setting, ...]:
        """The settings `clusterctl optimize apply` would write, and its advice."""
        return self.plan.settings if self.plan is not None else ()

    @property
    def recommendations_skipped(self) -> tuple[str, ...]:
        """What that plan leaves out, and why (software not installed, a missing sysctl)."""
        return self.plan.skipped if self.plan is not None else ()


# ---------------------------------------------------------------------------
# score

CPU_POINTS, MEMORY_POINTS, STORAGE_POINTS, GPU_POINTS = 25.0, 25.0, 15.0, 35.0
CPU_FULL_CORES = 16
MEMORY_FULL_GIB = 64
STORAGE_ROOM_FULL_BYTES = 100 * GIB
STORAGE_FULL_BYTES_PER_S = 500e6
GPU_FULL_VRAM_GIB = 80


def score_parts(facts: HostFacts, write_test: WriteTestResult | None) -> tuple[ScorePart, ...]:
    cores = facts.cpu.logical_cores
    ram_gib = facts.memory.total_bytes / GIB
    cpu = ScorePart(
        "cpu",
        CPU_POINTS * min(1.0, cores / CPU_FULL_CORES),
        CPU_POINTS,
        f"{cores} logical cores (full marks at {CPU_FULL_CORES})",
    )
    memory = ScorePart(
        "memory",
        MEMORY_POINTS * min(1.0, ram_gib / MEMORY_FULL_GIB),
        MEMORY_POINTS,
        f"{ram_gib:.1f} GiB RAM (full marks at {MEMORY_FULL_GIB} GiB)",
    )
    swap_fs = facts.swap_dir
    if write_test is not None:
        speed = write_test.bytes_per_s
        medium = 10 * min(1.0, speed / STORAGE_FULL_BYTES_PER_S)
        medium_detail = f"measured {speed / 1e6:.0f} MB/s sequential write (full marks at 500)"
    else:
        medium = {"ssd": 10.0, "hdd": 4.0}.get(swap_fs.media or "", 5.0)
        medium_detail = f"swap dir on {(swap_fs.media or 'unknown media').upper()}"
    room = 5 * min(1.0, (swap_fs.available_bytes or 0) / STORAGE_ROOM_FULL_BYTES)
    storage = ScorePart(
        "storage",
        medium + room,
        STORAGE_POINTS,
        f"{medium_detail}; {format_size(swap_fs.available_bytes or 0)} free "
        f"(full marks at {format_size(STORAGE_ROOM_FULL_BYTES)})",
    )
    vram_gib = facts.gpus.memory_total_bytes / GIB
    gpu_points = GPU_POINTS * min(1.0, math.log2(1 + vram_gib) / math.log2(1 + GPU_FULL_VRAM_GIB))
    gpu_detail = (
        f"{len(facts.gpus.gpus)} GPU(s), {vram_gib:.0f} GiB VRAM "
        f"(full marks at {GPU_FULL_VRAM_GIB} GiB)"
        if facts.gpus.available
        else f"no GPU: {facts.gpus.reason}"
    )
    gpu = ScorePart("gpu", gpu_points, GPU_POINTS, gpu_detail)
    return (cpu, memory, storage, gpu)


# ---------------------------------------------------------------------------
# findings: one rule per concern. A rule reads the facts and the config and
# returns its findings; a new finding is a new rule added to RULES (or a case
# in the rule that owns its subject).

Rule = Callable[[HostFacts, Config], Iterable[Finding]]


def _minimum_findings(facts: HostFacts, config: Config) -> list[Finding]:
    out: list[Finding] = []
    cores = facts.cpu.logical_cores
    if cores < MIN_CORES:
        out.append(Finding("fail", "cpu.cores", f"{cores} CPU core(s); at least {MIN_CORES} needed",
                           "run clusterctl's workloads on a node with 2 or more cores"))
    total = facts.memory.total_bytes
    if not ram_counts_as(total, MIN_RAM_GIB):
        out.append(Finding("fail", "memory.total",
                           f"{format_size(total)} of RAM; at least {MIN_RAM_GIB} GiB needed",
                           "add memory or use a larger node"))
    return out


def _swap_dir_findings(facts: HostFacts, config: Config) -> list[Finding]:
    out: list[Finding] = []
    fs = facts.swap_dir
    where = f"{config.swap.dir} ({fs.fstype or 'unknown filesystem'} on {fs.mountpoint or '?'})"
    verdict = swapfile_support(fs.fstype)
    if not verdict.supported:
        out.append(Finding("fail", "swap.filesystem",
                           f"swap dir {where} cannot hold swap files: {verdict.reason}",
                           verdict.fix))
    if fs.available_bytes is not None and fs.available_bytes < MIN_SWAP_DIR_FREE_BYTES:
        out.append(Finding(
            "fail", "swap.free_space",
            f"{format_size(fs.available_bytes)} free for the swap dir {where}; "
            f"at least {format_size(MIN_SWAP_DIR_FREE_BYTES)} needed",
            f"free space on {fs.mountpoint} or set [swap] dir to a filesystem with room"))
    elif fs.total_bytes and fs.available_bytes is not None:
        used = 100 * (1 - fs.available_bytes / fs.total_bytes)
        if used > 90:
            out.append(Finding("warn", "disk.usage",
                               f"{fs.mountpoint} is {used:.0f}% full",
                               "clear old logs, pip/Docker caches and temporary files"))
    if fs.media == "hdd":
        disks = ", ".join(fs.disks) or fs.device or "?"
        out.append(Finding("warn", "swap.media",
                           f"swap dir {where} is on a rotating disk ({disks}); swapping there "
                           "is slow", "set [swap] dir to a filesystem on an SSD or NVMe disk"))
    if fs.unknown_reason is not None:
        out.append(Finding("info", "swap.media_unknown",
                           f"the disk under swap dir {where} is of unknown type: "
                           f"{fs.unknown_reason}",
                           "only advice depends on it (swappiness is then tuned as for a "
                           "rotating disk); to have it known, keep what the swap dir is stored "
                           "on where clusterctl's units can read it (a loop image not under "
                           "/root, /home or /run/user, which ProtectHome= hides)"))
    if facts.swap_units_blocked:
        out.append(Finding("warn", "swap.units_blocked",
                           f"{', '.join(facts.swap_units_blocked)} cannot write the swap dir "
                           f"{config.swap.dir} (ProtectSystem=strict, no ReadWritePaths= for "
                           "it): their swap steps fail with 'Read-only file system'",
                           f"clusterctl config dropins (or clusterctl config set swap.dir "
                           f"{config.swap.dir})"))
    if not facts.swaps:
        out.append(Finding("info", "swap.none",
                           "no swap is active",
                           f"`clusterctl swap auto` creates "
                           f"{format_size(config.swap.min_size_bytes)} in {config.swap.dir}"))
    return out


def _system_findings(facts: HostFacts, config: Config) -> list[Finding]:
    out: list[Finding] = []
    if facts.cpu.usage_percent is not None and facts.cpu.usage_percent > 90:
        out.append(Finding("warn", "cpu.busy", f"CPU {facts.cpu.usage_percent:.0f}% busy",
                           "check `top`; fewer Dask workers relieve the node"))
    used = facts.memory.used_percent
    if used is not None and used > 85:
        out.append(Finding("warn", "memory.busy", f"memory {used:.0f}% in use",
                           "`clusterctl optimize free-memory` or more swap"))
    if not facts.pressure.available:
        out.append(Finding("warn", "kernel.psi",
                           f"no memory pressure data: {facts.pressure.reason}",
                           "swap growth falls back to usage thresholds; use a kernel with PSI"))
    if not facts.system.systemd_booted:
        out.append(Finding("warn", "system.systemd",
                           f"systemd is not PID 1 (PID 1 is {facts.system.init or 'unknown'}); "
                           "clusterctl's timers and agent will not run",
                           "run the commands by hand or from another scheduler"))
    if facts.system.cgroup in ("v1", "hybrid"):
        out.append(Finding("info", "system.cgroup",
                           f"cgroup {facts.system.cgroup} hierarchy; per-service memory "
                           "limits work best with cgroup v2",
                           "boot with systemd.unified_cgroup_hierarchy=1"))
    return out


def _gpu_findings(facts: HostFacts, config: Config) -> list[Finding]:
    out: list[Finding] = []
    inventory = facts.gpus
    if not inventory.available:
        out.append(Finding("info", "gpu.none", f"no GPU in use: {inventory.reason}",
                           inventory.fix))
    for gpu in inventory.gpus:
        if gpu.lost:
            out.append(Finding("warn", "gpu.lost", f"GPU {gpu.index} is lost: {gpu.error}",
                               "reset the GPU (nvidia-smi -r) or reboot the node"))
        elif gpu.error:
            out.append(Finding("warn", "gpu.read", f"GPU {gpu.index}: {gpu.error}"))
    return out


def _service_findings(facts: HostFacts, config: Config) -> list[Finding]:
    out: list[Finding] = []
    ollama = facts.ollama
    if ollama.installed and not ollama.running:
        out.append(Finding("warn", "ollama.down",
                           f"Ollama is installed ({ollama.binary or ollama.unit}) but its API "
                           f"does not answer: {ollama.api_error}",
                           "systemctl start ollama, or set [ollama] url"))
    elif not ollama.installed and not ollama.running:
        out.append(Finding("info", "ollama.absent", "Ollama is not installed"))
    if facts.dask.version is None:
        out.append(Finding("info", "dask.absent", "Dask is not installed for the node's Python"))
    return out


def _oomd_findings(facts: HostFacts, config: Config) -> list[Finding]:
    """systemd-oomd kills the cgroup using the most swap once memory and swap are both
    more than SwapUsedLimit= used; it re-reads swap every 0.15 s, so what matters is that
    clusterctl grows swap before that point (free_threshold above 100 - SwapUsedLimit)."""
    oomd = facts.oomd
    if oomd is None or not oomd.watches_swap:
        return []
    limit = oomd.swap_used_limit_percent
    where = ("every cgroup (-.slice)" if "-.slice" in oomd.swap_kill_units
             else ", ".join(oomd.swap_kill_units))
    rule = (f"{oomd.name} kills the cgroup using the most swap in {where} once memory and "
            f"swap are both more than {limit:g}% used")
    setting = ("SwapUsedLimit= in " + oomd.swap_used_limit_file if oomd.swap_used_limit_file
               else "its default SwapUsedLimit=")
    free = config.swap.free_threshold_percent
    if free <= 100 - limit:
        wanted = math.floor(100 - limit) + 5
        raise_limit = ("raise SwapUsedLimit= in a drop-in under /etc/systemd/oomd.conf.d/, then "
                       "`systemctl try-reload-or-restart systemd-oomd`")
        return [Finding(
            "warn", "swap.oomd_first",
            f"{rule} ({setting}); clusterctl grows swap only once less than {free}% of it "
            "is free, so systemd-oomd can kill first",
            f"clusterctl config set swap.free_threshold {wanted}, or {raise_limit}"
            if wanted <= 90 else raise_limit[0].upper() + raise_limit[1:])]
    return [Finding(
        "info", "swap.oomd",
        f"{rule}; clusterctl grows swap before that (under {free}% free) and systemd-oomd "
        "counts a new swap file within 0.15 s, so nothing needs restarting; once managed "
        f"swap reaches max_size {format_size(config.swap.max_size_bytes)} its rule acts",
        "to keep a service out of its choice, set ManagedOOMPreference=avoid (or omit) "
        "in that service's unit")]


def _swap_cap_findings(facts: HostFacts, config: Config) -> list[Finding]:
    """Cgroups whose swap is capped (cgroup v2 memory.swap.max 0, v1 memsw limit equal to
    the memory limit, v1 swappiness 0): the swap clusterctl adds does not reach them."""
    return [Finding("warn", "cgroup.swap_capped",
                    f"{cap.name}: swap cannot help it ({cap.why}); it is OOM-killed at its "
                    "memory limit whatever swap the node has", cap.fix)
            for cap in facts.swap_caps]


RULES: tuple[Rule, ...] = (
    _minimum_findings,
    _swap_dir_findings,
    _swap_cap_findings,
    _system_findings,
    _gpu_findings,
    _service_findings,
    _oomd_findings,
)


def findings(facts: HostFacts, config: Config) -> tuple[Finding, ...]:
    return tuple(finding for rule in RULES for finding in rule(facts, config))


# ---------------------------------------------------------------------------
# the whole report


def build_report(
    facts: HostFacts,
    config: Config,
    *,
    plan: OptimizePlan | None,
    mode: Mode = "quick",
    write_test: WriteTestResult | None = None,
    extra_findings: tuple[Finding, ...] = (),
) -> Report:
    """``plan`` is ``optimize.plan.plan`` of this node: `check` recommends what it says."""
    parts = score_parts(facts, write_test)
    return Report(
        mode=mode,
        tier=tier_profile(facts.cpu.logical_cores, facts.memory.total_bytes).tier,
        score=round(sum(p.points for p in parts)),
        score_parts=parts,
        findings=findings(facts, config) + extra_findings,
        plan=plan,
        write_test=write_test,
    )
