"""What to do with swap: pure functions of a facts snapshot, the config and ``now``.

``reconcile`` squares the ledger with the swap dir and /proc/swaps; the
planners (``plan_auto``, ``plan_expand``, ``plan_shrink``, ``plan_clean``)
decide on top of it and return a :class:`Plan`: the actions, the events to
record, the ledger to keep, and a sentence saying what the next step is and
why. ``swap status`` prints the auto plan; ``--dry-run`` prints any plan; the
executor in ``clusterctl.swap`` carries one out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from clusterctl.config import SwapConfig
from clusterctl.errors import HostError
from clusterctl.host import FilesystemFacts, MemoryFacts, PressureFacts, SwapArea
from clusterctl.host.swapdir import SwapDirEntry, SwapDirListing
from clusterctl.swap.filesystems import swapfile_support
from clusterctl.swap.ledger import Ledger
from clusterctl.units import MIB, format_size

# The emergency rate: above 85 % in use, grow twice as fast.
EMERGENCY_PERCENT = 85.0
# Shrink only after memory use has stayed this far below the threshold...
SHRINK_MARGIN_PERCENT = 20.0
# ...for this long, and only a file whose pages fit in half of MemAvailable.
SHRINK_COOLDOWN_S = 600.0
SHRINK_FIT_FRACTION = 0.5
# `swap clean` takes pages back only while they fit in 90 % of MemAvailable.
CLEAN_FIT_FRACTION = 0.9
# Keep this much of the swap dir's filesystem free: max(2 x increment, 5 %).
FLOOR_FRACTION = 0.05
# Swap areas the kernel allows: 32 minus the entry types it reserves
# (migration, hwpoison, device-private, PTE markers); 23 on current distro
# kernels, more on some. swapon's EPERM tells the real limit.
KERNEL_AREA_LIMIT = 23
MIN_FILE_BYTES = 64 * MIB
AT_MAX = "at max_size"
# The predictive rule: swap must last until the next file is online (``online_s``, as
# measured by the agent) twice over, plus the gap until the step after that can act
# (the agent steps at most this often while swap runs short).
HORIZON_ONLINE_FACTOR = 2.0
HORIZON_STEP_S = 0.5
ONLINE_S_UNMEASURED = 0.5  # until the agent has timed a file of its own
# Pressure grows swap only while less than this share of an increment is free.
PRESSURE_FREE_FRACTION = 0.5
RATE_RECENT_S = 1.0  # the rate is that of the last second of samples...
RATE_WINDOW_S = 5.0  # ...or of this window where the last second has too few

Kind = Literal["create", "activate", "remove", "discard", "adopt"]


class PolicyError(HostError):
    """A requested change the policy refuses (exit 1, nothing touched)."""


@dataclass(frozen=True)
class ManagedFile:
    name: str
    path: str
    size_bytes: int
    created_at: float
    active: bool
    used_bytes: int
    priority: int | None
    off_by_operator: bool  # someone swapped it off this boot; left off


@dataclass(frozen=True)
class SwapTrend:
    """How fast swap use grows, from the agent's own samples (``swap_rate``)."""

    rate_bytes_per_s: float
    online_s: float = ONLINE_S_UNMEASURED  # how long a new file took to come online here

    @property
    def horizon_s(self) -> float:
        """How long the free swap must last: until a file is online, twice, and a step."""
        return HORIZON_ONLINE_FACTOR * self.online_s + HORIZON_STEP_S


@dataclass(frozen=True)
class Signal:
    """What woke the agent's step: a PSI trigger, or a cgroup at its limit or OOM."""

    kind: Literal["pressure", "max", "oom", "oom_kill"]
    source: str  # "system", or the cgroup's path under the hierarchy's root
    unit: str | None = None  # the systemd unit the cgroup belongs to
    detail: str = ""  # what fired, in words: "memory stalled >= 10% of a 1 s window"
    count: int = 1
    cannot_help: str | None = None  # why swap cannot help this cgroup (swap capped)
    fix: str | None = None  # what lifts that cap

    @property
    def who(self) -> str:
        if self.source == "system":
            return "the node"
        return f"{self.unit} (cgroup {self.source})" if self.unit else f"cgroup {self.source}"


@dataclass(frozen=True)
class SwapFacts:
    """Everything the planners look at, read at one moment."""

    memory: MemoryFacts
    pressure: PressureFacts
    areas: tuple[SwapArea, ...]  # every active swap area (/proc/swaps)
    listing: SwapDirListing
    fs: FilesystemFacts
    boot_id: str | None
    ledger: Ledger
    trend: SwapTrend | None = None  # the agent's measure; a one-off `swap auto` has none
    signals: tuple[Signal, ...] = ()  # what woke the agent's step

    @property
    def swap_total_bytes(self) -> int:
        """All swap on the node (/proc/swaps), clusterctl's or not: the kernel uses it all."""
        return sum(a.size_bytes for a in self.areas)

    @property
    def swap_free_bytes(self) -> int:
        return max(0, self.swap_total_bytes - sum(a.used_bytes for a in self.areas))


@dataclass(frozen=True)
class Action:
    kind: Kind
    name: str  # the file in the swap dir
    size_bytes: int
    reason: str
    used_bytes: int = 0


@dataclass(frozen=True)
class Notice:
    """An event the reconciliation or policy records without touching anything."""

    event_type: str
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    notices: tuple[Notice, ...]
    ledger: Ledger  # what to keep (reconciled, with the policy's memory)
    files: tuple[ManagedFile, ...]  # managed files as they are now
    summary: str  # the next step, in words
    foreign: tuple[str, ...] = ()  # files in the swap dir that are not clusterctl's
    refused: tuple[str, ...] = ()  # what a manual command could not do, and why
    failed: str | None = None  # growth is needed but blocked (auto exits 1: units show it)

    @property
    def total_bytes(self) -> int:
        """Managed swap in use by the kernel now."""
        return sum(f.size_bytes for f in self.files if f.active)


# ---------------------------------------------------------------------------
# reconciliation


@dataclass(frozen=True)
class Reconciled:
    ledger: Ledger
    files: tuple[ManagedFile, ...]
    actions: tuple[Action, ...]
    notices: tuple[Notice, ...]
    foreign: tuple[str, ...]


def reconcile(facts: SwapFacts, now: float) -> Reconciled:
    """The ledger against the swap dir and /proc/swaps; what must be repaired."""
    directory = facts.listing.path.rstrip("/")
    active = {a.path: a for a in facts.areas}
    on_disk = {e.name: e for e in facts.listing.entries}
    state = _Reconciling(facts.ledger)
    for entry in facts.listing.entries:
        _reconcile_entry(state, facts, entry, f"{directory}/{entry.name}", active, on_disk, now)
    for known in state.ledger.files:
        if known.name not in on_disk:
            state.ledger = state.ledger.without(known.name)
            state.notices.append(Notice(
                "swap_missing", f"{directory}/{known.name} is gone from disk; dropped from the "
                "ledger", {"path": f"{directory}/{known.name}", "size_bytes": known.size_bytes}))
    files = []
    for entry in facts.listing.entries:
        if not entry.managed_name:
            continue
        path = f"{directory}/{entry.name}"
        recorded = state.ledger.file(entry.name)
        area = active.get(path)
        files.append(ManagedFile(
            name=entry.name,
            path=path,
            size_bytes=recorded.size_bytes if recorded else entry.size_bytes,
            created_at=recorded.created_at if recorded else 0.0,
            active=area is not None,
            used_bytes=area.used_bytes if area else 0,
            priority=area.priority if area else None,
            off_by_operator=bool(recorded and recorded.off_since is not None),
        ))
    return Reconciled(state.ledger, tuple(files), tuple(state.actions), tuple(state.notices),
                      tuple(state.foreign))


@dataclass
class _Reconciling:
    ledger: Ledger
    actions: list[Action] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)


def _reconcile_entry(state: _Reconciling, facts: SwapFacts, entry: SwapDirEntry, path: str,
                     active: dict[str, SwapArea], on_disk: dict[str, SwapDirEntry],
                     now: float) -> None:
    target = entry.leftover_of
    if target is not None:
        if path in active:  # never made so by clusterctl, but if it is: off and away
            area = active[path]
            state.actions.append(Action("remove", entry.name, entry.size_bytes,
                                        "an unfinished file that is somehow active",
                                        used_bytes=area.used_bytes))
        else:
            state.actions.append(Action("discard", entry.name, entry.size_bytes,
                                        "an unfinished file left by an interrupted create"))
        return
    if not entry.managed_name:
        state.foreign.append(entry.name)
        return
    known = state.ledger.file(entry.name)
    valid = entry.regular and entry.has_signature
    if known is None:
        if path in active:
            state.actions.append(Action("adopt", entry.name, entry.size_bytes,
                                        "an active clusterctl file missing from the ledger"))
        elif valid:
            state.actions.append(Action("adopt", entry.name, entry.size_bytes,
                                        "a clusterctl file missing from the ledger"))
            state.actions.append(Action("activate", entry.name, entry.size_bytes,
                                        "a valid swap file that was not active"))
        else:
            state.actions.append(Action("discard", entry.name, entry.size_bytes,
                                        "a clusterctl file without a swap header"))
        return
    if path in active:
        if known.boot_id != facts.boot_id or known.off_since is not None:
            state.ledger = state.ledger.with_file(
                replace(known, boot_id=facts.boot_id, off_since=None))
        return
    this_boot = facts.boot_id is not None and known.boot_id == facts.boot_id
    if this_boot and known.off_since is not None:
        return  # the operator turned it off this boot: leave it off
    if this_boot:
        state.ledger = state.ledger.with_file(replace(known, off_since=now))
        state.notices.append(Notice(
            "swap_off_externally", f"{path} was swapped off by someone else; left off until "
            "the next boot or `swap clean`", {"path": path, "size_bytes": known.size_bytes}))
    elif valid and entry.size_bytes >= known.size_bytes:
        state.actions.append(Action("activate", entry.name, known.size_bytes,
                                    "a managed file that is not active (after a reboot)"))
    else:
        state.actions.append(Action("discard", entry.name, entry.size_bytes,
                                    "a managed file that is damaged (no swap header or short)"))


# ---------------------------------------------------------------------------
# shared pieces


def _expected_active(rec: Reconciled) -> list[ManagedFile]:
    """Managed files that will be active once the repairs are done."""
    coming = {a.name for a in rec.actions if a.kind == "activate"}
    return [f for f in rec.files if f.active or f.name in coming]


def floor_bytes(facts: SwapFacts, config: SwapConfig) -> int:
    total = facts.fs.total_bytes or 0
    return max(2 * config.increment_bytes, int(FLOOR_FRACTION * total))


def _creation_blocker(facts: SwapFacts, config: SwapConfig, planned_bytes: int,
                      planned_areas: int, size: int) -> str | None:
    """Why a file of ``size`` may not be made now, or None."""
    if facts.listing.problem:
        return f"swap dir {facts.listing.path} is {facts.listing.problem}"
    verdict = swapfile_support(facts.fs.fstype)
    if not verdict.supported:
        return (f"swap dir {config.dir} is on {facts.fs.fstype or 'an unknown filesystem'}: "
                f"{verdict.reason}")
    available = facts.fs.available_bytes
    if available is None:
        return f"free space of {facts.fs.mountpoint or config.dir} is unknown"
    floor = floor_bytes(facts, config)
    left = available - planned_bytes - size
    if left < floor:
        return (f"not enough free space on {facts.fs.mountpoint}: "
                f"{format_size(max(0, available - planned_bytes))} free, a "
                f"{format_size(size)} file would leave {format_size(max(0, left))} and "
                f"{format_size(floor)} must stay free")
    if len(facts.areas) + planned_areas + 1 > KERNEL_AREA_LIMIT:
        return (f"{len(facts.areas) + planned_areas} swap areas are active, at the kernel's "
                f"limit of about {KERNEL_AREA_LIMIT}")
    return None


def _file_size(facts: SwapFacts, config: SwapConfig, total: int, planned_areas: int) -> int:
    """increment, or larger when the kernel's area limit would stop max_size being reached."""
    room = config.max_size_bytes - total
    slots = KERNEL_AREA_LIMIT - len(facts.areas) - planned_areas
    size = config.increment_bytes
    if slots > 0 and math.ceil(room / size) > slots:
        size = math.ceil(room / slots / MIB) * MIB
    return min(size, room)


def _names(facts: SwapFacts, rec: Reconciled) -> Iterator[str]:
    """Free ``swap-NNNN`` names: not in the ledger, on disk, or planned."""
    taken = {e.name for e in facts.listing.entries} | {a.name for a in rec.actions}
    while True:
        name = rec.ledger.next_name(taken)
        taken.add(name)
        yield name


def _growth(facts: SwapFacts, config: SwapConfig, rec: Reconciled, total: int, count: int,
            reason: str, *, until_bytes: int | None = None) -> tuple[list[Action], str | None]:
    """Up to ``count`` new files (or until ``until_bytes``), stopping at the first blocker."""
    actions: list[Action] = []
    planned = 0
    planned_areas = sum(1 for a in rec.actions if a.kind == "activate")
    names = _names(facts, rec)
    while len(actions) < count or (until_bytes is not None and total + planned < until_bytes):
        if total + planned >= config.max_size_bytes:
            break
        size = _file_size(facts, config, total + planned, planned_areas + len(actions))
        if size < MIN_FILE_BYTES:
            break
        blocker = _creation_blocker(facts, config, planned, planned_areas + len(actions), size)
        if blocker:
            return actions, blocker
        actions.append(Action("create", next(names), size, reason))
        planned += size
        if until_bytes is None and len(actions) >= count:
            break
    return actions, None


def _newest_first(files: list[ManagedFile]) -> list[ManagedFile]:
    """Shrink order: newest (lowest priority) first."""
    return sorted(files, key=lambda f: (f.created_at, -(f.priority or 0), f.name), reverse=True)


def _with_blocked(rec: Reconciled, blocked: str | None, notices: list[Notice]) -> Ledger:
    if blocked and blocked != rec.ledger.blocked:
        notices.append(Notice("swap_growth_blocked", blocked, {}))
    return replace(rec.ledger, blocked=blocked)


# ---------------------------------------------------------------------------
# swap running out


def swap_rate(samples: Sequence[tuple[float, int]]) -> float | None:
    """Bytes per second by which swap use grows, from ``(seconds, used_bytes)`` samples in
    time order: over the last RATE_RECENT_S (a ramp that just began counts at once, one
    that stopped stops counting), or RATE_WINDOW_S where samples are sparse; None without
    two samples half a second apart."""
    if len(samples) < 2:
        return None
    last_s, last_used = samples[-1]
    rates: list[float] = []
    for span_s in (RATE_RECENT_S, RATE_WINDOW_S):
        first = next(((t, u) for t, u in samples if last_s - t <= span_s), None)
        if first is None or last_s - first[0] < 0.5:
            continue
        rates.append((last_used - first[1]) / (last_s - first[0]))
    return rates[0] if rates else None


@dataclass(frozen=True)
class Shortage:
    """Swap is running out: how many increments to add, and why."""

    count: int
    reason: str


def swap_shortage(total_bytes: int, free_bytes: int, trend: SwapTrend | None,
                  config: SwapConfig) -> Shortage | None:
    """Whether the node's swap runs out: less than ``free_threshold`` % free, or, at the
    rate swap use grows, less than the rate needs until more could be online. The agent
    asks this every sample (cheap); the planner again under the lock."""
    if total_bytes <= 0:
        return None  # no swap at all: min_size is the rule for that
    found: list[Shortage] = []
    rate = trend.rate_bytes_per_s if trend else 0.0
    if trend is not None and rate > 0:
        need = rate * trend.horizon_s
        if free_bytes < need:
            found.append(Shortage(
                max(1, math.ceil((need - free_bytes) / config.increment_bytes)),
                f"swap use grows {format_size(int(rate))}/s: the {format_size(free_bytes)} "
                f"free runs out in {free_bytes / rate:.1f} s, and a new file takes about "
                f"{trend.online_s:.1f} s to come online"))
    free_percent = 100.0 * free_bytes / total_bytes
    if free_percent < config.free_threshold_percent:
        found.append(Shortage(1, f"only {free_percent:.0f}% of swap is free "
                                 f"({format_size(free_bytes)} of {format_size(total_bytes)}), "
                                 f"below free_threshold {config.free_threshold_percent}%"))
    return max(found, key=lambda s: s.count) if found else None


def _signal_notices(facts: SwapFacts) -> list[Notice]:
    """Pressure that swap cannot relieve, and OOM kills: said in the event log."""
    notices: list[Notice] = []
    for sig in facts.signals:
        details: dict[str, Any] = {"cgroup": None if sig.source == "system" else sig.source,
                                   "unit": sig.unit, "signal": sig.kind}
        if sig.cannot_help:
            notices.append(Notice(
                "swap_cannot_help",
                f"{sig.who} is {_SIGNAL_WORDS[sig.kind]}, and swap cannot help it: "
                f"{sig.cannot_help}; it is OOM-killed at its memory limit whatever swap the "
                "node has", {**details, "why": sig.cannot_help, "fix": sig.fix}))
        elif sig.kind == "oom_kill":
            notices.append(Notice(
                "memory_oom_kill",
                f"the kernel OOM-killed {sig.count} process(es) in {sig.who}, with "
                f"{format_size(facts.swap_free_bytes)} of swap free",
                {**details, "count": sig.count, "swap_free_bytes": facts.swap_free_bytes}))
    return notices


_SIGNAL_WORDS = {"pressure": "under memory pressure", "max": "at its memory limit",
                 "oom": "out of memory", "oom_kill": "losing processes to the OOM killer"}


def _pressure(facts: SwapFacts, config: SwapConfig) -> tuple[str, str] | None:
    """Memory pressure now, if any: (what, in words; who): a signal that fired (a PSI
    trigger, a cgroup at its limit) or PSI avg60 at ``pressure_threshold``."""
    fired = [s for s in facts.signals if s.cannot_help is None]
    if fired:
        sig = fired[0]
        detail = f" ({sig.detail})" if sig.detail else ""
        return f"{sig.who} {_SIGNAL_WORDS[sig.kind]}{detail}", sig.who
    psi = facts.pressure.memory.some.avg60 if facts.pressure.memory else None
    if psi is None or psi <= 0 or psi < config.pressure_threshold_percent:
        return None  # no stall at all is never pressure (threshold 0)
    return (f"memory pressure: PSI some avg60 {psi:.1f}% >= "
            f"{config.pressure_threshold_percent:g}%", "the node")


def _pressure_reason(facts: SwapFacts, config: SwapConfig) -> str | None:
    """The memory pressure that says swap is short, in words. Pressure grows swap only
    while less than half an increment of it is free (PRESSURE_FREE_FRACTION): with more
    free, the kernel has room to swap already and more would not relieve the stall; free
    swap running out is the other rules' business."""
    pressure = _pressure(facts, config)
    if pressure is None or (facts.swap_free_bytes
                            >= PRESSURE_FREE_FRACTION * config.increment_bytes):
        return None
    return f"{pressure[0]}, with {format_size(facts.swap_free_bytes)} of swap free"


def _pressure_not_swap(facts: SwapFacts, config: SwapConfig) -> str | None:
    """Pressure there is, but swap has room: why this step does not grow, in words."""
    pressure = _pressure(facts, config)
    if pressure is None:
        return None
    return (f"memory pressure in {pressure[1]}, but {format_size(facts.swap_free_bytes)} of "
            "swap is free: more would not relieve it")


# ---------------------------------------------------------------------------
# the planners


def plan_auto(facts: SwapFacts, config: SwapConfig, now: float) -> Plan:
    """One policy step: what `swap auto` (the timer, the agent) does now."""
    rec = reconcile(facts, now)
    notices = [*rec.notices, *_signal_notices(facts)]
    active = _expected_active(rec)
    total = sum(f.size_bytes for f in active)
    used = facts.memory.used_percent or 0.0
    psi = facts.pressure.memory.some.avg60 if facts.pressure.memory else None
    threshold = config.memory_threshold_percent
    why_used = f"memory {used:.0f}% in use"
    count, reason = _growth_reason(facts, config, used)
    rising = facts.trend is not None and facts.trend.rate_bytes_per_s > 0
    low = (count == 0 and not rising and not facts.signals
           and used < threshold - SHRINK_MARGIN_PERCENT
           and (psi is None or psi < config.pressure_threshold_percent / 2))
    previous = rec.ledger.low_since
    low_since = (now if previous is None else previous) if low else None
    actions = list(rec.actions)
    blocked: str | None = None

    if total < config.min_size_bytes:
        grow, blocked = _growth(facts, config, rec, total, 0,
                                f"managed swap {format_size(total)} is below min_size "
                                f"{format_size(config.min_size_bytes)}",
                                until_bytes=config.min_size_bytes)
        actions += grow
        summary = (f"create {len(grow)} file(s) to reach min_size "
                   f"{format_size(config.min_size_bytes)}" if grow else
                   f"below min_size but blocked: {blocked}")
    elif count and total < config.max_size_bytes:
        grow, blocked = _growth(facts, config, rec, total, count, reason)
        actions += grow
        summary = (f"grow by {format_size(sum(a.size_bytes for a in grow))}: {reason}" if grow
                   else f"growth needed ({reason}) but blocked: {blocked}")
    elif count:
        summary = (f"growth needed ({reason}) but managed swap is at max_size "
                   f"{format_size(config.max_size_bytes)}")
        blocked = AT_MAX
    elif low and low_since is not None and total > config.min_size_bytes:
        removal, summary = _shrink_step(facts, config, active, total, low_since, now, why_used)
        if removal:
            actions.append(removal)
            low_since = now  # the next file waits for another cooldown
    else:
        summary = (_pressure_not_swap(facts, config)
                   or f"nothing to do: {why_used} (grow at {threshold}%), "
                   f"{_free_words(facts, config)}, managed swap {format_size(total)} of "
                   f"{format_size(config.max_size_bytes)}")
    if rec.actions:
        summary = f"repair {len(rec.actions)} file(s); {summary}"
    ledger = replace(_with_blocked(rec, blocked, notices), low_since=low_since)
    failed = blocked if blocked and blocked != AT_MAX else None
    return Plan(tuple(actions), tuple(notices), ledger, rec.files, summary, rec.foreign,
                failed=failed)


def _growth_reason(facts: SwapFacts, config: SwapConfig, used: float) -> tuple[int, str]:
    """How many increments to add now and why (0, "" when nothing asks for growth): the
    strongest of swap running out, memory in use, and memory pressure."""
    threshold = config.memory_threshold_percent
    reasons: list[tuple[int, str]] = []
    shortage = swap_shortage(facts.swap_total_bytes, facts.swap_free_bytes, facts.trend, config)
    if shortage is not None:
        reasons.append((shortage.count, shortage.reason))
    if used > max(EMERGENCY_PERCENT, threshold):
        reasons.append((2, f"memory {used:.0f}% in use, above {EMERGENCY_PERCENT:.0f}%: "
                           "emergency, growing twice"))
    elif used >= threshold:
        reasons.append((1, f"memory {used:.0f}% in use >= memory_threshold {threshold}%"))
    pressure = _pressure_reason(facts, config)
    if pressure is not None:
        reasons.append((1, pressure))
    return max(reasons, key=lambda r: r[0]) if reasons else (0, "")


def _free_words(facts: SwapFacts, config: SwapConfig) -> str:
    total = facts.swap_total_bytes
    if total <= 0:
        return "no swap active"
    free = facts.swap_free_bytes
    words = (f"swap {100.0 * free / total:.0f}% free (grow under "
             f"{config.free_threshold_percent}%)")
    rate = facts.trend.rate_bytes_per_s if facts.trend else None
    if rate is not None and rate > 0:
        words += f", use growing {format_size(int(rate))}/s"
    return words


def _shrink_step(facts: SwapFacts, config: SwapConfig, active: list[ManagedFile], total: int,
                 low_since: float, now: float, why_used: str) -> tuple[Action | None, str]:
    """After the cooldown, the newest file, if its pages fit comfortably in RAM."""
    waited = now - low_since
    if waited < SHRINK_COOLDOWN_S:
        return None, f"{why_used}; shrink after {SHRINK_COOLDOWN_S - waited:.0f} s more of low use"
    candidates = _newest_first([f for f in active if f.active])
    if not candidates:
        return None, f"{why_used}; nothing to shrink yet"
    victim = candidates[0]
    available = facts.memory.available_bytes or 0
    if total - victim.size_bytes < config.min_size_bytes:
        return None, f"{why_used}; at min_size {format_size(config.min_size_bytes)}"
    if victim.used_bytes > SHRINK_FIT_FRACTION * available:
        return None, (f"{why_used}, but {victim.name} holds {format_size(victim.used_bytes)} "
                      f"of pages, more than half of MemAvailable ({format_size(available)}); "
                      "not shrinking")
    threshold = config.memory_threshold_percent
    reason = (f"{why_used} for {waited / 60:.0f} min, below "
              f"{threshold - SHRINK_MARGIN_PERCENT:.0f}%")
    return (Action("remove", victim.name, victim.size_bytes, reason,
                   used_bytes=victim.used_bytes),
            f"shrink: remove {victim.name} ({format_size(victim.size_bytes)})")


def plan_expand(facts: SwapFacts, config: SwapConfig, now: float,
                size_bytes: int | None = None) -> Plan:
    """`swap expand [--size]`: one more file, within max_size and the space floor."""
    rec = reconcile(facts, now)
    total = sum(f.size_bytes for f in _expected_active(rec))
    size = size_bytes or config.increment_bytes
    if size < MIN_FILE_BYTES:
        raise PolicyError(f"a swap file must be at least {format_size(MIN_FILE_BYTES)}")
    if total + size > config.max_size_bytes:
        raise PolicyError(
            f"expanding by {format_size(size)} would make managed swap "
            f"{format_size(total + size)}, above max_size {format_size(config.max_size_bytes)}",
            fix="raise [swap] max_size (clusterctl config set swap.max_size ...)")
    planned_areas = sum(1 for a in rec.actions if a.kind == "activate")
    blocker = _creation_blocker(facts, config, 0, planned_areas, size)
    if blocker:
        raise PolicyError(f"cannot expand: {blocker}", fix=fix_for(blocker))
    name = next(_names(facts, rec))
    action = Action("create", name, size, "requested by `swap expand`")
    return Plan((*rec.actions, action), rec.notices, rec.ledger, rec.files,
                f"create {name} ({format_size(size)})", rec.foreign)


def plan_shrink(facts: SwapFacts, config: SwapConfig, now: float,
                size_bytes: int | None = None) -> Plan:
    """`swap shrink [--size]`: remove the newest files, never below min_size."""
    rec = reconcile(facts, now)
    active = [f for f in _expected_active(rec) if f.active]
    total = sum(f.size_bytes for f in _expected_active(rec))
    fit = SHRINK_FIT_FRACTION * (facts.memory.available_bytes or 0)
    chosen: list[ManagedFile] = []
    freed = pages = 0
    for candidate in _newest_first(active):
        if chosen and (size_bytes is None or freed >= size_bytes):
            break
        chosen.append(candidate)
        freed += candidate.size_bytes
        pages += candidate.used_bytes
    if not chosen:
        raise PolicyError("no active managed swap file to remove")
    if size_bytes is not None and freed < size_bytes:
        raise PolicyError(f"only {format_size(freed)} of managed swap can be removed")
    if total - freed < config.min_size_bytes:
        raise PolicyError(
            f"removing {format_size(freed)} would leave {format_size(total - freed)}, below "
            f"min_size {format_size(config.min_size_bytes)}",
            fix="lower [swap] min_size first, or use `swap clean` to remove everything")
    if pages > fit:
        raise PolicyError(
            f"the files to remove hold {format_size(pages)} of pages; that is more than half "
            f"of MemAvailable ({format_size(facts.memory.available_bytes or 0)})",
            fix="free memory first; swapoff would push the node towards OOM")
    actions = [Action("remove", f.name, f.size_bytes, "requested by `swap shrink`",
                      used_bytes=f.used_bytes) for f in chosen]
    return Plan((*rec.actions, *actions), rec.notices, rec.ledger, rec.files,
                f"remove {', '.join(f.name for f in chosen)} ({format_size(freed)})",
                rec.foreign)


def plan_clean(facts: SwapFacts, config: SwapConfig, now: float) -> Plan:
    """`swap clean`: swapoff and remove every managed file whose pages fit in RAM."""
    rec = reconcile(facts, now)
    room = CLEAN_FIT_FRACTION * (facts.memory.available_bytes or 0)
    actions: list[Action] = [a for a in rec.actions if a.kind in ("discard", "remove")]
    refused: list[str] = []
    for f in _newest_first(list(rec.files)):
        if not f.active:
            actions.append(Action("discard", f.name, f.size_bytes, "requested by `swap clean`"))
        elif f.used_bytes <= room:
            room -= f.used_bytes
            actions.append(Action("remove", f.name, f.size_bytes, "requested by `swap clean`",
                                  used_bytes=f.used_bytes))
        else:
            refused.append(f"{f.path} holds {format_size(f.used_bytes)} of pages, more than "
                           "fit in free memory now")
    summary = f"remove {sum(1 for a in actions if a.kind in ('remove', 'discard'))} file(s)"
    if refused:
        summary += f"; refusing {len(refused)}"
    return Plan(tuple(actions), rec.notices, rec.ledger, rec.files, summary, rec.foreign,
                tuple(refused))


def fix_for(blocker: str) -> str | None:
    if "free space" in blocker:
        return "free space there, lower [swap] increment, or move [swap] dir"
    if "kernel's limit" in blocker:
        return "raise [swap] increment so fewer, larger files are needed"
    above = re.search(r"^swap dir .* is under (/.*?), which is (?!a symlink)", blocker)
    if above:  # a directory above the swap dir (host.swapdir.Distrust)
        where = above.group(1)
        return f"chown root {where} && chmod go-w {where}, or set [swap] dir elsewhere"
    if "symlink" in blocker:
        return "set [swap] dir to its real path, with no symlink in it"
    if "swap dir" in blocker:
        return "set [swap] dir to a root-owned directory on local ext4, XFS or btrfs"
    return None
