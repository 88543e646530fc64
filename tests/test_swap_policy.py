"""The swap policy: facts snapshots to plans (pure, no host needed)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from clusterctl.config import SwapConfig
from clusterctl.host import FilesystemFacts, MemoryFacts, PressureFacts, SwapArea
from clusterctl.host.procfs import Pressure, PressureLine
from clusterctl.host.swapdir import SwapDirEntry, SwapDirListing, attribute_areas
from clusterctl.swap.ledger import Ledger, LedgerFile
from clusterctl.swap.policy import (
    KERNEL_AREA_LIMIT,
    SHRINK_COOLDOWN_S,
    PolicyError,
    Signal,
    SwapFacts,
    SwapTrend,
    plan_auto,
    plan_clean,
    plan_expand,
    plan_shrink,
    reconcile,
    swap_rate,
)
from clusterctl.units import GIB, MIB

DIR = "/var/lib/clusterctl/swap"
BOOT = "boot-a"
NOW = 1_800_000_000.0
CONFIG = SwapConfig()  # min 2G, max 16G, increment 1G, threshold 80 %


@dataclass
class F:
    """A managed file in a snapshot."""

    name: str
    size_gib: float = 1
    active: bool = True
    used_gib: float = 0
    created: float = 0
    used_bytes: int | None = None  # exact, instead of used_gib
    in_ledger: bool = True
    signature: bool = True
    boot_id: str | None = BOOT
    off_since: float | None = None


def snapshot(
    *,
    used_percent: float = 30,
    total_gib: float = 64,
    files: list[F] | None = None,
    psi_avg60: float | None = 0.0,
    fs_free_gib: float = 200,
    fs_total_gib: float = 500,
    fstype: str = "ext4",
    other_areas: int = 0,
    extra_entries: list[SwapDirEntry] | None = None,
    low_since: float | None = None,
    blocked: str | None = None,
    boot_id: str | None = BOOT,
    dir_problem: str | None = None,
) -> SwapFacts:
    files = files or []
    total = int(total_gib * GIB)
    available = int(total * (1 - used_percent / 100))
    areas = [SwapArea(f"/dev/other{i}", "partition", GIB, 0, -2 - i) for i in range(other_areas)]
    entries = list(extra_entries or [])
    ledger_files = []
    for prio, f in enumerate(files):
        size = int(f.size_gib * GIB)
        entries.append(SwapDirEntry(f.name, size, True, f.signature))
        if f.active:
            used = int(f.used_gib * GIB) if f.used_bytes is None else f.used_bytes
            areas.append(SwapArea(f"{DIR}/{f.name}", "file", size, used, -10 - prio))
        if f.in_ledger:
            ledger_files.append(LedgerFile(f.name, size, f.created, "fallocate", f.boot_id,
                                           f.off_since))
    pressure = Pressure(PressureLine(0, psi_avg60, 0, 0), None) if psi_avg60 is not None \
        else None
    return SwapFacts(
        memory=MemoryFacts(total, available // 2, available, 0, 0, 0, 0, None),
        pressure=PressureFacts(None, pressure, None, None if pressure else "no PSI"),
        areas=tuple(areas),
        listing=SwapDirListing(DIR, True, dir_problem, tuple(sorted(entries,
                                                                     key=lambda e: e.name))),
        fs=FilesystemFacts(DIR, DIR, "/", fstype, "/dev/nvme0n1p2", "nvme0n1p2",
                           ("nvme0n1",), False, int(fs_total_gib * GIB),
                           int(fs_free_gib * GIB), int(fs_free_gib * GIB)),
        boot_id=boot_id,
        ledger=Ledger(tuple(ledger_files), low_since, blocked),
    )


def kinds(plan) -> list[tuple[str, str, int]]:  # type: ignore[no-untyped-def]
    return [(a.kind, a.name, a.size_bytes) for a in plan.actions]


AT_MIN = [F("swap-0001", created=1), F("swap-0002", created=2)]


# -- growth ---------------------------------------------------------------------


def test_a_fresh_node_gets_min_size() -> None:
    plan = plan_auto(snapshot(), CONFIG, NOW)
    assert kinds(plan) == [("create", "swap-0001", GIB), ("create", "swap-0002", GIB)]
    assert plan.summary == "create 2 file(s) to reach min_size 2G"


def test_calm_node_at_min_does_nothing() -> None:
    plan = plan_auto(snapshot(files=AT_MIN), CONFIG, NOW)
    assert plan.actions == ()
    assert plan.summary == ("nothing to do: memory 30% in use (grow at 80%), swap 100% free "
                            "(grow under 15%), managed swap 2G of 16G")


def test_growth_at_the_threshold() -> None:
    plan = plan_auto(snapshot(used_percent=80, files=AT_MIN), CONFIG, NOW)
    assert kinds(plan) == [("create", "swap-0003", GIB)]
    assert plan.actions[0].reason == "memory 80% in use >= memory_threshold 80%"


def test_emergency_grows_twice_as_fast() -> None:
    plan = plan_auto(snapshot(used_percent=92, files=AT_MIN), CONFIG, NOW)
    assert kinds(plan) == [("create", "swap-0003", GIB), ("create", "swap-0004", GIB)]
    assert "emergency" in plan.actions[0].reason


SWAP_NEARLY_FULL = [F("swap-0001", created=1, used_gib=1.0),
                    F("swap-0002", created=2, used_gib=0.6)]  # 0.4G free: under half an increment


def test_sustained_memory_pressure_grows_below_the_threshold_while_swap_is_short() -> None:
    plan = plan_auto(snapshot(used_percent=60, psi_avg60=14.0, files=SWAP_NEARLY_FULL),
                     CONFIG, NOW)
    assert kinds(plan) == [("create", "swap-0003", GIB)]
    assert "PSI some avg60 14.0% >= 10%" in plan.actions[0].reason
    assert "with 409.6M of swap free" in plan.actions[0].reason


def test_memory_pressure_with_swap_to_spare_does_not_grow_and_says_why() -> None:
    plan = plan_auto(snapshot(used_percent=60, psi_avg60=14.0, files=AT_MIN), CONFIG, NOW)
    assert plan.actions == ()
    assert plan.summary == ("memory pressure in the node, but 2G of swap is free: more would "
                            "not relieve it")


def test_no_psi_is_not_pressure() -> None:
    plan = plan_auto(snapshot(used_percent=60, psi_avg60=None, files=AT_MIN), CONFIG, NOW)
    assert plan.actions == ()


def test_growth_stops_at_max_size() -> None:
    files = [F(f"swap-{i:04d}", created=i) for i in range(1, 16)]  # 15G
    plan = plan_auto(snapshot(used_percent=95, files=files), CONFIG, NOW)
    assert kinds(plan) == [("create", "swap-0016", GIB)]  # one, not two: 16G is the cap
    full = plan_auto(snapshot(used_percent=95, files=[*files, F("swap-0016", created=16)]),
                     CONFIG, NOW)
    assert full.actions == ()
    assert full.summary == ("growth needed (memory 95% in use, above 85%: emergency, growing "
                            "twice) but managed swap is at max_size 16G")
    assert full.failed is None  # the operator's cap is not a failure


def test_last_step_is_cut_to_fit_max_size() -> None:
    config = replace(CONFIG, max_size_bytes=int(2.5 * GIB))
    plan = plan_auto(snapshot(used_percent=85, files=AT_MIN), config, NOW)
    assert kinds(plan) == [("create", "swap-0003", GIB // 2)]


def test_free_space_floor_blocks_growth_and_says_so_once() -> None:
    # 500G filesystem: the floor is 5 % = 25G; 25.5G free leaves room for nothing
    facts = snapshot(used_percent=85, files=AT_MIN, fs_free_gib=25.5)
    plan = plan_auto(facts, CONFIG, NOW)
    assert plan.actions == ()
    assert plan.summary.startswith("growth needed")
    assert "not enough free space on /" in plan.summary and "25G must stay free" in plan.summary
    assert [n.event_type for n in plan.notices] == ["swap_growth_blocked"]
    assert plan.failed is not None and "not enough free space" in plan.failed
    again = plan_auto(replace(facts, ledger=plan.ledger), CONFIG, NOW + 30)
    assert again.notices == ()  # the same cause is not reported every 30 s


def test_floor_is_two_increments_on_a_small_filesystem() -> None:
    # 20G filesystem: 5 % is 1G, so the floor is 2 x increment = 2G; a 1G file leaves 1.5G
    plan = plan_auto(snapshot(files=AT_MIN, used_percent=82, fs_total_gib=20, fs_free_gib=2.5),
                     CONFIG, NOW)
    assert plan.actions == ()
    assert "2G must stay free" in plan.summary


@pytest.mark.parametrize("fstype", ["tmpfs", "zfs", "nfs4", "overlay"])
def test_unsupported_filesystem_blocks_creation(fstype: str) -> None:
    plan = plan_auto(snapshot(fstype=fstype), CONFIG, NOW)
    assert plan.actions == ()
    assert f"is on {fstype}" in plan.summary


def test_untrusted_dir_blocks_creation() -> None:
    plan = plan_auto(snapshot(dir_problem="writable by group or others (mode 0777)"),
                     CONFIG, NOW)
    assert plan.actions == ()
    assert "writable by group or others" in plan.summary


def test_kernel_area_limit_makes_bigger_files() -> None:
    # 20 other areas leave 3 slots; 14G still to grow: files of ceil(14G/3)
    config = replace(CONFIG, min_size_bytes=GIB, max_size_bytes=15 * GIB)
    plan = plan_auto(snapshot(used_percent=82, files=[F("swap-0001")],
                              other_areas=KERNEL_AREA_LIMIT - 4), config, NOW)
    (create,) = plan.actions
    assert create.size_bytes == -(-14 * GIB // 3 // MIB) * MIB


def test_kernel_area_limit_reached_blocks_growth() -> None:
    plan = plan_auto(snapshot(used_percent=85, files=AT_MIN,
                              other_areas=KERNEL_AREA_LIMIT - 2), CONFIG, NOW)
    assert plan.actions == ()
    assert "kernel's limit" in plan.summary


# -- shrink ---------------------------------------------------------------------

THREE = [F("swap-0001", created=1), F("swap-0002", created=2), F("swap-0003", created=3)]


def test_low_use_starts_the_cooldown() -> None:
    plan = plan_auto(snapshot(used_percent=20, files=THREE), CONFIG, NOW)
    assert plan.actions == ()
    assert plan.ledger.low_since == NOW
    assert plan.summary == "memory 20% in use; shrink after 600 s more of low use"


def test_after_the_cooldown_the_newest_file_goes() -> None:
    facts = snapshot(used_percent=20, files=THREE, low_since=NOW - SHRINK_COOLDOWN_S)
    plan = plan_auto(facts, CONFIG, NOW)
    assert kinds(plan) == [("remove", "swap-0003", GIB)]
    assert plan.ledger.low_since == NOW  # the next one waits another cooldown


def test_busy_again_resets_the_cooldown() -> None:
    facts = snapshot(used_percent=70, files=THREE, low_since=NOW - 5000)
    plan = plan_auto(facts, CONFIG, NOW)
    assert plan.actions == () and plan.ledger.low_since is None


PAGE = 4096
HALF_OF_AVAILABLE = 16 * GIB  # 40G of RAM, 20 % in use: MemAvailable is 32G


def with_newest_holding(used_bytes: int) -> SwapFacts:
    """A node calm for an hour; its newest file (20G) holds ``used_bytes`` of pages."""
    files = [*AT_MIN, F("swap-0003", size_gib=20, used_bytes=used_bytes, created=3)]
    facts = snapshot(used_percent=20, total_gib=40, files=files, low_since=NOW - 3600)
    assert facts.memory.available_bytes == 2 * HALF_OF_AVAILABLE
    return facts


def test_auto_shrinks_a_file_whose_pages_fit_in_half_of_memavailable_and_no_more() -> None:
    config = replace(CONFIG, max_size_bytes=64 * GIB)
    fits = plan_auto(with_newest_holding(HALF_OF_AVAILABLE), config, NOW)
    assert kinds(fits) == [("remove", "swap-0003", 20 * GIB)]
    one_page_more = plan_auto(with_newest_holding(HALF_OF_AVAILABLE + PAGE), config, NOW)
    assert one_page_more.actions == ()
    assert "more than half of MemAvailable (32G); not shrinking" in one_page_more.summary


def test_never_shrinks_below_min_size() -> None:
    plan = plan_auto(snapshot(used_percent=5, files=AT_MIN, low_since=NOW - 7200), CONFIG, NOW)
    assert plan.actions == ()


def test_shrink_picks_the_newest_even_if_listed_first() -> None:
    files = [F("swap-0001", created=50), F("swap-0002", created=10), F("swap-0003", created=20)]
    plan = plan_auto(snapshot(used_percent=10, files=files, low_since=0), CONFIG, NOW)
    assert kinds(plan) == [("remove", "swap-0001", GIB)]


# -- reconciliation ----------------------------------------------------------------


def test_leftover_from_an_interrupted_create_is_discarded() -> None:
    leftover = SwapDirEntry(".swap-0003.tmp", 300 * MIB, True, False)
    plan = plan_auto(snapshot(files=AT_MIN, extra_entries=[leftover]), CONFIG, NOW)
    assert kinds(plan) == [("discard", ".swap-0003.tmp", 300 * MIB)]
    assert plan.summary.startswith("repair 1 file(s)")


def test_after_a_reboot_managed_files_are_reactivated() -> None:
    files = [replace(f, active=False, boot_id="boot-before") for f in AT_MIN]
    plan = plan_auto(snapshot(files=files), CONFIG, NOW)
    assert kinds(plan) == [("activate", "swap-0001", GIB), ("activate", "swap-0002", GIB)]


def test_a_file_swapped_off_by_someone_else_is_noticed_and_left_off() -> None:
    files = [AT_MIN[0], replace(AT_MIN[1], active=False)]
    plan = plan_auto(snapshot(files=files), CONFIG, NOW)
    assert [n.event_type for n in plan.notices] == ["swap_off_externally"]
    assert plan.ledger.file("swap-0002").off_since == NOW  # type: ignore[union-attr]
    assert ("activate", "swap-0002", GIB) not in kinds(plan)
    # it is not counted: min_size is made up with a new file
    assert kinds(plan) == [("create", "swap-0003", GIB)]
    later = plan_auto(replace(snapshot(files=files), ledger=plan.ledger), CONFIG, NOW + 30)
    assert later.notices == ()


def test_a_crash_after_rename_before_swapon_is_adopted_and_activated() -> None:
    files = [AT_MIN[0], F("swap-0002", active=False, in_ledger=False)]
    plan = plan_auto(snapshot(files=files), CONFIG, NOW)
    assert kinds(plan) == [("adopt", "swap-0002", GIB), ("activate", "swap-0002", GIB)]


def test_a_damaged_managed_file_is_replaced() -> None:
    files = [AT_MIN[0], F("swap-0002", active=False, boot_id="old", signature=False)]
    plan = plan_auto(snapshot(files=files), CONFIG, NOW)
    assert ("discard", "swap-0002", GIB) in kinds(plan)
    assert ("create", "swap-0003", GIB) in kinds(plan)


def test_a_file_gone_from_disk_leaves_the_ledger() -> None:
    facts = snapshot(files=AT_MIN)
    ghost = LedgerFile("swap-0009", GIB, 5, "fallocate", BOOT)
    plan = plan_auto(replace(facts, ledger=Ledger((*facts.ledger.files, ghost))), CONFIG, NOW)
    assert [n.event_type for n in plan.notices] == ["swap_missing"]
    assert plan.ledger.file("swap-0009") is None


def test_files_that_are_not_clusterctl_s_are_never_touched() -> None:
    foreign = [SwapDirEntry("notes.txt", 10, True, False),
               SwapDirEntry("swapfile", GIB, True, True)]
    plan = plan_clean(snapshot(files=AT_MIN, extra_entries=foreign), CONFIG, NOW)
    assert plan.foreign == ("notes.txt", "swapfile")
    assert {a.name for a in plan.actions} == {"swap-0001", "swap-0002"}


def test_reconcile_records_the_boot_for_active_files() -> None:
    files = [replace(AT_MIN[0], boot_id=None)]
    rec = reconcile(snapshot(files=files), NOW)
    assert rec.ledger.file("swap-0001").boot_id == BOOT  # type: ignore[union-attr]


# -- manual commands ------------------------------------------------------------------


def test_expand_adds_one_increment_or_the_asked_size() -> None:
    assert kinds(plan_expand(snapshot(files=AT_MIN), CONFIG, NOW)) == [
        ("create", "swap-0003", GIB)]
    assert kinds(plan_expand(snapshot(files=AT_MIN), CONFIG, NOW, 3 * GIB)) == [
        ("create", "swap-0003", 3 * GIB)]


def test_expand_past_max_size_is_refused_with_the_fix() -> None:
    with pytest.raises(PolicyError, match="above max_size 16G") as info:
        plan_expand(snapshot(files=AT_MIN), CONFIG, NOW, 15 * GIB)
    assert info.value.fix is not None and "max_size" in info.value.fix


def test_expand_without_room_is_refused() -> None:
    with pytest.raises(PolicyError, match="not enough free space"):
        plan_expand(snapshot(files=AT_MIN, fs_free_gib=25), CONFIG, NOW)


def test_shrink_removes_newest_files_until_the_size() -> None:
    files = [*THREE, F("swap-0004", created=4)]
    plan = plan_shrink(snapshot(files=files), CONFIG, NOW, int(1.5 * GIB))
    assert kinds(plan) == [("remove", "swap-0004", GIB), ("remove", "swap-0003", GIB)]


def test_shrink_below_min_is_refused() -> None:
    with pytest.raises(PolicyError, match="below min_size 2G"):
        plan_shrink(snapshot(files=AT_MIN), CONFIG, NOW)


def test_shrink_removes_files_whose_pages_fit_in_half_of_memavailable_and_no_more() -> None:
    config = replace(CONFIG, max_size_bytes=64 * GIB)
    fits = plan_shrink(with_newest_holding(HALF_OF_AVAILABLE), config, NOW)
    assert kinds(fits) == [("remove", "swap-0003", 20 * GIB)]
    with pytest.raises(PolicyError, match="more than half of MemAvailable"):
        plan_shrink(with_newest_holding(HALF_OF_AVAILABLE + PAGE), config, NOW)


def test_clean_removes_what_fits_and_refuses_the_rest() -> None:
    files = [F("swap-0001", created=1, used_gib=50), F("swap-0002", created=2, used_gib=1),
             F("swap-0003", active=False, boot_id="old", created=3)]
    plan = plan_clean(snapshot(used_percent=50, files=files), CONFIG, NOW)  # 32G available
    assert kinds(plan) == [("discard", "swap-0003", GIB), ("remove", "swap-0002", GIB)]
    assert len(plan.refused) == 1 and "swap-0001 holds 50G" in plan.refused[0]


def test_proc_swaps_lines_named_through_a_dead_mount_are_matched_to_their_files() -> None:
    listing = SwapDirListing("/var/lib/clusterctl/swap", True, None, (
        SwapDirEntry("swap-0001", GIB, True, True), SwapDirEntry("swap-0002", GIB, True, True),
        SwapDirEntry("swap-0003", 2 * GIB, True, True)))
    area = SwapArea("/swap/swap-0002", "file", GIB - 4096, 0, -3)
    other = SwapArea("/swap/swap-0001", "file", GIB - 4096, 0, -4)  # not ours: kernel says no
    zram = SwapArea("/dev/zram0", "partition", 4 * GIB, 0, 100)
    in_use = {"/var/lib/clusterctl/swap/swap-0002": True}.get
    got = attribute_areas((zram, area, other), listing, in_use)
    assert [a.path for a in got] == ["/dev/zram0", "/var/lib/clusterctl/swap/swap-0002",
                                     "/swap/swap-0001"]
    wrong_size = SwapArea("/swap-0003", "file", GIB - 4096, 0, -2)
    assert attribute_areas((wrong_size,), listing, lambda _: True) == (wrong_size,)


# -- swap running out: the free share, the rate, and what fired ---------------------

SMALL = replace(CONFIG, min_size_bytes=256 * MIB, increment_bytes=256 * MIB,
                max_size_bytes=4 * GIB)


def quarter(name: str, used_mib: int, created: float) -> F:
    return F(name, size_gib=0.25, used_bytes=used_mib * MIB, created=created)


def test_less_free_swap_than_free_threshold_grows_one_increment_and_says_so() -> None:
    files = [quarter("swap-0001", 256, 1), quarter("swap-0002", 200, 2)]  # 56M of 512M free
    plan = plan_auto(snapshot(files=files), SMALL, NOW)
    assert kinds(plan) == [("create", "swap-0003", 256 * MIB)]
    assert plan.actions[0].reason == ("only 11% of swap is free (56M of 512M), below "
                                      "free_threshold 15%")
    calm = plan_auto(snapshot(files=[quarter("swap-0001", 256, 1), quarter("swap-0002", 170, 2)]),
                     SMALL, NOW)  # 86M free: 17 %
    assert calm.actions == ()


def test_free_threshold_counts_every_swap_area_of_the_node() -> None:
    """Swap that is not clusterctl's fills too: the kernel spreads pages over all areas."""
    facts = snapshot(files=[quarter("swap-0001", 0, 1)], other_areas=1)  # a 1G partition
    full = replace(facts, areas=tuple(replace(a, used_bytes=a.size_bytes)
                                      for a in facts.areas))
    assert "free_threshold" in plan_auto(full, SMALL, NOW).actions[0].reason


# A recording of swap use (seconds, MiB) while a process in a 256 MiB memory cgroup grew by
# 200 MiB/s: 5 Hz samples, from the first page swapped out to 600 MiB in swap.
RAMP = [(0.0, 0), (0.2, 31), (0.4, 72), (0.6, 113), (0.8, 152), (1.0, 193), (1.2, 231),
        (1.4, 272), (1.6, 310), (1.8, 352), (2.0, 391), (2.2, 430), (2.4, 471), (2.6, 509),
        (2.8, 550), (3.0, 590)]


def series(points: list[tuple[float, int]]) -> list[tuple[float, int]]:
    return [(t, mib * MIB) for t, mib in points]


def test_the_rate_is_read_from_the_recorded_ramp() -> None:
    rate = swap_rate(series(RAMP))
    assert rate is not None and 195 * MIB < rate < 205 * MIB
    sparse = swap_rate(series(RAMP[::10]))  # 2 s apart: the 5 s window
    assert sparse is not None and 195 * MIB < sparse < 205 * MIB
    assert swap_rate(series(RAMP[:1])) is None  # one sample says nothing
    assert swap_rate(series([(0.0, 100), (0.2, 100)])) is None  # too short a span


def test_a_ramp_that_just_began_counts_at_its_recent_rate() -> None:
    flat_then_steep = [(t / 5, 0) for t in range(20)] + [(4.0, 0), (4.5, 50), (5.0, 100)]
    rate = swap_rate(series(flat_then_steep))
    assert rate is not None and rate == pytest.approx(100 * MIB)


def test_growth_that_stopped_no_longer_counts() -> None:
    stopped = [*RAMP, (3.5, 595), (4.0, 595)]
    rate = swap_rate(series(stopped))
    assert rate is not None and rate <= 10 * MIB


def test_predicted_exhaustion_grows_as_many_increments_as_the_rate_needs() -> None:
    """At 200 MiB/s with files online in 1 s, swap must last 2.5 s: 500 MiB. With 120 MiB
    free (23 %: above free_threshold) that is two files more."""
    rate = swap_rate(series(RAMP))
    assert rate is not None
    files = [quarter("swap-0001", 256, 1), quarter("swap-0002", 136, 2)]  # 120M free
    facts = replace(snapshot(files=files), trend=SwapTrend(rate, online_s=1.0))
    plan = plan_auto(facts, SMALL, NOW)
    assert kinds(plan) == [("create", "swap-0003", 256 * MIB), ("create", "swap-0004", 256 * MIB)]
    reason = plan.actions[0].reason
    assert reason.startswith("swap use grows 199M/s: the 120M free")
    assert "runs out in 0.6 s" in reason and "about 1.0 s to come online" in reason
    # the same swap at a slow, steady rate: plenty of time, nothing to do
    slow = replace(facts, trend=SwapTrend(10 * MIB, online_s=0.5))
    assert plan_auto(slow, SMALL, NOW).actions == ()
    # and without the agent's measure (a one-off `swap auto`): the free share only
    assert plan_auto(replace(facts, trend=None), SMALL, NOW).actions == ()


def test_prediction_never_grows_past_max_size() -> None:
    files = [quarter(f"swap-{i:04d}", 256, i) for i in range(1, 16)] + [
        quarter("swap-0016", 100, 16)]  # 4G, the max
    facts = replace(snapshot(files=files), trend=SwapTrend(500 * MIB, online_s=1.0))
    plan = plan_auto(facts, SMALL, NOW)
    assert plan.actions == ()
    assert plan.summary.endswith("but managed swap is at max_size 4G")
    assert plan.failed is None  # at the max by the operator's choice, not a failure


def test_a_cgroup_signal_grows_only_while_swap_is_short() -> None:
    sig = Signal("pressure", "system.slice/db.service", "db.service",
                 "memory stalled >= 10% of a 1 s window")
    short = replace(snapshot(files=[quarter("swap-0001", 150, 1)]), signals=(sig,))
    plan = plan_auto(short, SMALL, NOW)  # 106M free, under half an increment
    assert kinds(plan) == [("create", "swap-0002", 256 * MIB)]
    assert plan.actions[0].reason == (
        "db.service (cgroup system.slice/db.service) under memory pressure (memory stalled "
        ">= 10% of a 1 s window), with 106M of swap free")
    roomy = replace(snapshot(files=[quarter("swap-0001", 0, 1), quarter("swap-0002", 0, 2)]),
                    signals=(sig,))
    plan = plan_auto(roomy, SMALL, NOW)
    assert plan.actions == ()
    assert "db.service (cgroup system.slice/db.service)" in plan.summary
    assert "more would not relieve it" in plan.summary


def test_a_cgroup_that_swap_cannot_help_is_named_and_grows_nothing() -> None:
    sig = Signal("oom_kill", "system.slice/db.service", "db.service", count=2,
                 cannot_help="memory.swap.max is 0",
                 fix="systemctl set-property db.service MemorySwapMax=infinity")
    facts = replace(snapshot(files=[quarter("swap-0001", 250, 1)]), signals=(sig,))
    plan = plan_auto(facts, replace(SMALL, free_threshold_percent=0), NOW)
    assert plan.actions == ()
    [notice] = plan.notices
    assert notice.event_type == "swap_cannot_help"
    assert notice.reason.startswith("db.service (cgroup system.slice/db.service) is losing "
                                    "processes to the OOM killer, and swap cannot help it: "
                                    "memory.swap.max is 0")
    assert notice.details["fix"] == "systemctl set-property db.service MemorySwapMax=infinity"
    assert notice.details["unit"] == "db.service"


def test_an_oom_kill_with_swap_free_is_recorded_with_what_was_free() -> None:
    sig = Signal("oom_kill", "user.slice", count=1)
    facts = replace(snapshot(files=[quarter("swap-0001", 0, 1)]), signals=(sig,))
    plan = plan_auto(facts, SMALL, NOW)
    assert plan.actions == ()
    [notice] = plan.notices
    assert (notice.event_type, notice.reason) == (
        "memory_oom_kill", "the kernel OOM-killed 1 process(es) in cgroup user.slice, with 256M "
        "of swap free")


def test_no_shrink_while_swap_use_is_rising() -> None:
    files = [F("swap-0001", created=1), F("swap-0002", created=2), F("swap-0003", created=3)]
    facts = replace(snapshot(used_percent=10, files=files, low_since=NOW - SHRINK_COOLDOWN_S),
                    trend=SwapTrend(MIB))
    plan = plan_auto(facts, CONFIG, NOW)
    assert plan.actions == () and plan.ledger.low_since is None
