"""Swap plans to the byte and the word: what each repair and manual command shows an operator.

The planners are pure, so every case here is a facts snapshot (tests/test_swap_policy.py's
``snapshot``) and the plan it gives: the actions with their sizes, pages and reasons, the
notices, the managed files, the refusals. These cases were written against the mutants that
survived ``scripts/mutate swap``: each pins a boundary or a field that no other test did.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from clusterctl.config import SwapConfig
from clusterctl.host import SwapArea
from clusterctl.host.swapdir import SwapDirEntry
from clusterctl.swap import ledger as ledgers
from clusterctl.swap.ledger import Ledger, LedgerFile
from clusterctl.swap.policy import (
    KERNEL_AREA_LIMIT,
    MIN_FILE_BYTES,
    Action,
    ManagedFile,
    Notice,
    PolicyError,
    SwapFacts,
    SwapTrend,
    plan_auto,
    plan_clean,
    plan_expand,
    plan_shrink,
    reconcile,
)
from clusterctl.system import swapfiles
from clusterctl.units import GIB, MIB
from tests.test_swap_policy import (
    AT_MIN,
    BOOT,
    CONFIG,
    DIR,
    NOW,
    SWAP_NEARLY_FULL,
    THREE,
    F,
    snapshot,
)

LEFTOVER = ".swap-0003.tmp"


def with_area(facts: SwapFacts, name: str, size: int, used: int, priority: int = -50
              ) -> SwapFacts:
    """``facts`` with ``DIR/name`` active in /proc/swaps."""
    area = SwapArea(f"{DIR}/{name}", "file", size, used, priority)
    return replace(facts, areas=(*facts.areas, area))


# -- reconciliation: each repair as the operator sees it -----------------------------


def test_an_active_leftover_is_swapped_off_and_removed_with_its_pages() -> None:
    leftover = SwapDirEntry(LEFTOVER, 300 * MIB, True, True)
    facts = with_area(snapshot(files=AT_MIN, extra_entries=[leftover]), LEFTOVER, 300 * MIB,
                      7 * MIB)
    rec = reconcile(facts, NOW)
    assert rec.actions == (Action("remove", LEFTOVER, 300 * MIB,
                                  "an unfinished file that is somehow active",
                                  used_bytes=7 * MIB),)
    assert rec.foreign == () and rec.notices == ()
    assert [f.name for f in rec.files] == ["swap-0001", "swap-0002"]  # never a managed file


def test_an_inactive_leftover_is_discarded_with_its_reason() -> None:
    leftover = SwapDirEntry(LEFTOVER, 300 * MIB, True, False)
    rec = reconcile(snapshot(files=AT_MIN, extra_entries=[leftover]), NOW)
    assert rec.actions == (Action("discard", LEFTOVER, 300 * MIB,
                                  "an unfinished file left by an interrupted create"),)


def test_an_active_file_missing_from_the_ledger_is_adopted_not_activated_again() -> None:
    files = [AT_MIN[0], F("swap-0002", size_gib=2, used_gib=0.5, in_ledger=False)]
    rec = reconcile(snapshot(files=files), NOW)
    assert rec.actions == (Action("adopt", "swap-0002", 2 * GIB,
                                  "an active clusterctl file missing from the ledger"),)


def test_a_valid_inactive_file_missing_from_the_ledger_is_adopted_then_activated() -> None:
    files = [AT_MIN[0], F("swap-0002", active=False, in_ledger=False)]
    rec = reconcile(snapshot(files=files), NOW)
    assert rec.actions == (
        Action("adopt", "swap-0002", GIB, "a clusterctl file missing from the ledger"),
        Action("activate", "swap-0002", GIB, "a valid swap file that was not active"))


@pytest.mark.parametrize("entry", [SwapDirEntry("swap-0002", GIB, True, False),
                                   SwapDirEntry("swap-0002", GIB, False, True)],
                         ids=["no-swap-header", "not-a-regular-file"])
def test_an_unknown_file_without_a_header_or_not_regular_is_discarded(entry: SwapDirEntry
                                                                      ) -> None:
    rec = reconcile(snapshot(files=[AT_MIN[0]], extra_entries=[entry]), NOW)
    assert rec.actions == (Action("discard", "swap-0002", GIB,
                                  "a clusterctl file without a swap header"),)


def test_after_a_reboot_a_file_is_activated_at_its_ledger_size() -> None:
    # on disk a page longer than the ledger says (the header page): still the ledger's size
    facts = snapshot(files=[F("swap-0001", active=False, boot_id="boot-before")])
    entry = SwapDirEntry("swap-0001", GIB + 4096, True, True)
    facts = replace(facts, listing=replace(facts.listing, entries=(entry,)))
    rec = reconcile(facts, NOW)
    assert rec.actions == (Action("activate", "swap-0001", GIB,
                                  "a managed file that is not active (after a reboot)"),)


@pytest.mark.parametrize("entry", [SwapDirEntry("swap-0001", GIB - 4096, True, True),
                                   SwapDirEntry("swap-0001", GIB, True, False),
                                   SwapDirEntry("swap-0001", GIB, False, True)],
                         ids=["short", "no-swap-header", "not-a-regular-file"])
def test_after_a_reboot_a_damaged_file_is_discarded_at_its_size_on_disk(entry: SwapDirEntry
                                                                        ) -> None:
    facts = snapshot(files=[F("swap-0001", active=False, boot_id="boot-before")])
    facts = replace(facts, listing=replace(facts.listing, entries=(entry,)))
    rec = reconcile(facts, NOW)
    assert rec.actions == (Action("discard", "swap-0001", entry.size_bytes,
                                  "a managed file that is damaged (no swap header or short)"),)


def test_without_a_boot_id_an_inactive_file_is_reactivated_not_taken_for_the_operators() -> None:
    # no /proc/sys/kernel/random/boot_id: "this boot" cannot be known, so the file is treated
    # as after a reboot, even though the ledger's boot is also unknown
    facts = snapshot(files=[F("swap-0001", active=False, boot_id=None)], boot_id=None)
    rec = reconcile(facts, NOW)
    assert [(a.kind, a.name) for a in rec.actions] == [("activate", "swap-0001")]
    assert rec.notices == ()


def test_a_file_swapped_off_by_someone_else_shows_its_path_and_size() -> None:
    files = [AT_MIN[0], F("swap-0002", size_gib=2, active=False)]
    rec = reconcile(snapshot(files=files), NOW)
    path = f"{DIR}/swap-0002"
    assert rec.actions == ()
    assert rec.notices == (Notice(
        "swap_off_externally", f"{path} was swapped off by someone else; left off until the "
        "next boot or `swap clean`", {"path": path, "size_bytes": 2 * GIB}),)
    assert rec.ledger.file("swap-0002") == LedgerFile("swap-0002", 2 * GIB, 0, "fallocate",
                                                      BOOT, NOW)
    # the next run: still off, nothing new to say, the time it went off kept
    again = reconcile(replace(snapshot(files=files), ledger=rec.ledger), NOW + 30)
    assert again.actions == () and again.notices == ()
    assert again.ledger == rec.ledger
    (_, off) = again.files
    assert off.off_by_operator and not off.active


def test_an_active_file_swapped_off_before_is_taken_back_with_this_boot() -> None:
    files = [F("swap-0001", boot_id="boot-before", off_since=NOW - 60)]
    rec = reconcile(snapshot(files=files), NOW)
    assert rec.ledger.file("swap-0001") == LedgerFile("swap-0001", GIB, 0, "fallocate", BOOT,
                                                      None)
    assert not rec.files[0].off_by_operator


def test_a_file_gone_from_disk_is_reported_with_its_path_and_size() -> None:
    facts = snapshot(files=AT_MIN)
    ghost = LedgerFile("swap-0009", 3 * GIB, 5, "fallocate", BOOT)
    rec = reconcile(replace(facts, ledger=Ledger((*facts.ledger.files, ghost))), NOW)
    path = f"{DIR}/swap-0009"
    assert rec.notices == (Notice("swap_missing", f"{path} is gone from disk; dropped from the "
                                  "ledger", {"path": path, "size_bytes": 3 * GIB}),)


def test_the_managed_files_show_ledger_size_creation_pages_priority_and_operator_off() -> None:
    files = [F("swap-0001", size_gib=2, used_gib=0.25, created=11),
             F("swap-0002", active=False, off_since=NOW - 5, created=12),
             F("swap-0003", size_gib=1, used_gib=0.5, in_ledger=False)]
    facts = snapshot(files=files)
    # the ledger remembers swap-0001 as 2G; its file on disk has grown a page
    entries = tuple(replace(e, size_bytes=e.size_bytes + 4096) if e.name == "swap-0001" else e
                    for e in facts.listing.entries)
    rec = reconcile(replace(facts, listing=replace(facts.listing, entries=entries)), NOW)
    assert rec.files == (
        ManagedFile("swap-0001", f"{DIR}/swap-0001", 2 * GIB, 11, True, GIB // 4, -10, False),
        ManagedFile("swap-0002", f"{DIR}/swap-0002", GIB, 12, False, 0, None, True),
        ManagedFile("swap-0003", f"{DIR}/swap-0003", GIB, 0.0, True, GIB // 2, -12, False),
    )


def test_a_swap_dir_written_with_a_trailing_slash_still_matches_proc_swaps() -> None:
    facts = snapshot(files=AT_MIN)
    facts = replace(facts, listing=replace(facts.listing, path=DIR + "/"))
    rec = reconcile(facts, NOW)
    assert rec.actions == () and rec.notices == ()
    assert [(f.path, f.active) for f in rec.files] == [(f"{DIR}/swap-0001", True),
                                                       (f"{DIR}/swap-0002", True)]


# -- swap expand -----------------------------------------------------------------------


def test_expand_keeps_the_repairs_notices_and_files_and_names_the_new_file() -> None:
    leftover = SwapDirEntry(".swap-0004.tmp", MIB, True, False)
    files = [*AT_MIN, F("swap-0003", active=False, in_ledger=False)]
    facts = snapshot(files=files, extra_entries=[leftover, SwapDirEntry("notes", 1, True, False)])
    ghost = LedgerFile("swap-0005", GIB, 5, "fallocate", BOOT)
    facts = replace(facts, ledger=Ledger((*facts.ledger.files, ghost)))
    plan = plan_expand(facts, CONFIG, NOW)
    rec = reconcile(facts, NOW)
    # swap-0003 is adopted, the leftover of swap-0004 discarded first and swap-0005 dropped
    # from the ledger (gone from disk): the lowest name nobody holds is swap-0004
    assert plan.actions == (*rec.actions,
                            Action("create", "swap-0004", GIB, "requested by `swap expand`"))
    assert (plan.notices, plan.ledger, plan.files, plan.foreign) == (
        rec.notices, rec.ledger, rec.files, ("notes",))
    assert plan.summary == "create swap-0004 (1G)"


def test_expand_to_exactly_max_size_is_allowed_one_byte_more_is_refused() -> None:
    files = [*AT_MIN, F("swap-0003", active=False, in_ledger=False)]  # 3G once activated
    plan = plan_expand(snapshot(files=files), CONFIG, NOW, 13 * GIB)
    assert plan.actions[-1] == Action("create", "swap-0004", 13 * GIB,
                                      "requested by `swap expand`")
    with pytest.raises(PolicyError) as info:
        plan_expand(snapshot(files=files), CONFIG, NOW, 13 * GIB + MIB)
    assert info.value.message == ("expanding by 13G would make managed swap 16G, above "
                                  "max_size 16G")
    assert info.value.fix == "raise [swap] max_size (clusterctl config set swap.max_size ...)"


def test_expand_takes_the_smallest_file_and_refuses_smaller() -> None:
    plan = plan_expand(snapshot(files=AT_MIN), CONFIG, NOW, MIN_FILE_BYTES)
    assert plan.actions[-1].size_bytes == MIN_FILE_BYTES
    with pytest.raises(PolicyError) as info:
        plan_expand(snapshot(files=AT_MIN), CONFIG, NOW, MIN_FILE_BYTES - MIB)
    assert info.value.message == "a swap file must be at least 64M"


def test_expand_counts_files_about_to_be_activated_against_the_kernels_area_limit() -> None:
    # one slot left, and the file reconciliation reactivates takes it: no room for another
    files = [AT_MIN[0], F("swap-0002", active=False, boot_id="boot-before")]
    facts = snapshot(files=files, other_areas=KERNEL_AREA_LIMIT - 2)
    assert len(facts.areas) == KERNEL_AREA_LIMIT - 1
    with pytest.raises(PolicyError) as info:
        plan_expand(facts, CONFIG, NOW)
    assert info.value.message == (f"cannot expand: {KERNEL_AREA_LIMIT} swap areas are "
                                  f"active, at the kernel's limit of about {KERNEL_AREA_LIMIT}")
    assert info.value.fix == "raise [swap] increment so fewer, larger files are needed"
    # without that reactivation the last slot is free
    alone = snapshot(files=[AT_MIN[0]], other_areas=KERNEL_AREA_LIMIT - 2)
    assert plan_expand(alone, CONFIG, NOW).actions[-1].kind == "create"


def test_expand_leaves_exactly_the_free_space_floor_and_not_a_byte_less() -> None:
    # 500G filesystem: the floor is 25G; 26G free takes a 1G file, 26G - 1 byte does not
    assert plan_expand(snapshot(files=AT_MIN, fs_free_gib=26), CONFIG, NOW).actions
    short = snapshot(files=AT_MIN, fs_free_gib=26)
    short = replace(short, fs=replace(short.fs, available_bytes=26 * GIB - 1))
    with pytest.raises(PolicyError) as info:
        plan_expand(short, CONFIG, NOW)
    assert info.value.fix == "free space there, lower [swap] increment, or move [swap] dir"


# -- swap shrink -----------------------------------------------------------------------


def test_shrink_shows_each_file_its_pages_the_total_and_keeps_the_repairs() -> None:
    leftover = SwapDirEntry(LEFTOVER, MIB, True, False)
    files = [F("swap-0001", created=1), F("swap-0002", created=2, used_gib=0.25),
             F("swap-0004", created=4, used_gib=0.5), F("swap-0005", active=False,
                                                        in_ledger=False, created=0)]
    facts = snapshot(files=files, extra_entries=[leftover, SwapDirEntry("mine", 1, True, False)])
    rec = reconcile(facts, NOW)
    plan = plan_shrink(facts, CONFIG, NOW, 2 * GIB)
    assert plan.actions == (
        *rec.actions,
        Action("remove", "swap-0004", GIB, "requested by `swap shrink`", used_bytes=GIB // 2),
        Action("remove", "swap-0002", GIB, "requested by `swap shrink`", used_bytes=GIB // 4))
    assert plan.summary == "remove swap-0004, swap-0002 (2G)"
    assert (plan.notices, plan.ledger, plan.files, plan.foreign) == (
        rec.notices, rec.ledger, rec.files, ("mine",))


def test_shrink_stops_as_soon_as_the_size_is_reached() -> None:
    plan = plan_shrink(snapshot(files=[*THREE, F("swap-0004", created=4)]), CONFIG, NOW, GIB)
    assert [(a.kind, a.name) for a in plan.actions] == [("remove", "swap-0004")]


def test_shrink_never_removes_a_file_that_is_only_about_to_be_activated() -> None:
    # swap-0003 comes back after a reboot: it counts towards min_size but is not removable
    files = [F("swap-0001", created=1), F("swap-0002", created=2),
             F("swap-0003", active=False, boot_id="boot-before", created=3)]
    plan = plan_shrink(snapshot(files=files), CONFIG, NOW)
    assert [(a.kind, a.name) for a in plan.actions] == [("activate", "swap-0003"),
                                                        ("remove", "swap-0002")]


def test_shrink_down_to_exactly_min_size_is_allowed() -> None:
    plan = plan_shrink(snapshot(files=THREE), CONFIG, NOW)
    assert [(a.kind, a.name) for a in plan.actions] == [("remove", "swap-0003")]
    with pytest.raises(PolicyError) as info:
        plan_shrink(snapshot(files=THREE), CONFIG, NOW, 2 * GIB)
    assert info.value.message == "removing 2G would leave 1G, below min_size 2G"
    assert info.value.fix == "lower [swap] min_size first, or use `swap clean` to remove everything"


def test_shrink_says_how_much_can_be_removed_when_asked_for_more() -> None:
    with pytest.raises(PolicyError) as info:
        plan_shrink(snapshot(files=THREE), CONFIG, NOW, 4 * GIB)
    assert info.value.message == "only 3G of managed swap can be removed"
    with pytest.raises(PolicyError) as none:
        plan_shrink(snapshot(files=[F("swap-0001", active=False, off_since=NOW)]), CONFIG, NOW)
    assert none.value.message == "no active managed swap file to remove"


def test_shrink_refused_for_pages_names_them_and_memavailable() -> None:
    # 40G of RAM, 20 % in use: MemAvailable 32G, so 16G of pages is the most
    files = [*AT_MIN, F("swap-0003", size_gib=20, used_gib=17, created=3)]
    config = replace(CONFIG, max_size_bytes=64 * GIB)
    with pytest.raises(PolicyError) as info:
        plan_shrink(snapshot(used_percent=20, total_gib=40, files=files), config, NOW)
    assert info.value.message == ("the files to remove hold 17G of pages; that is more than "
                                  "half of MemAvailable (32G)")
    assert info.value.fix == "free memory first; swapoff would push the node towards OOM"


# -- swap clean ------------------------------------------------------------------------


def test_clean_keeps_only_the_repairs_that_remove_and_shares_free_memory_between_files(
) -> None:
    # 80G of RAM, 50 % in use: MemAvailable 40G, 90 % of it (36G) may take pages back
    leftover = SwapDirEntry(LEFTOVER, MIB, True, False)
    files = [F("swap-0001", size_gib=20, used_gib=18, created=1),
             F("swap-0002", size_gib=20, used_gib=16, created=2),
             F("swap-0004", size_gib=2, used_gib=2, created=4),
             F("swap-0005", active=False, in_ledger=False, created=5),  # adopt + activate
             F("swap-0006", active=False, off_since=NOW, created=6)]
    plan = plan_clean(snapshot(used_percent=50, total_gib=80, files=files,
                               extra_entries=[leftover]), CONFIG, NOW)
    clean = "requested by `swap clean`"
    assert plan.actions == (
        Action("discard", LEFTOVER, MIB, "an unfinished file left by an interrupted create"),
        Action("discard", "swap-0006", GIB, clean),
        Action("remove", "swap-0004", 2 * GIB, clean, used_bytes=2 * GIB),
        Action("remove", "swap-0002", 20 * GIB, clean, used_bytes=16 * GIB),
        # 36G - 2G - 16G leaves 18G: swap-0001's 18G fits, to the byte
        Action("remove", "swap-0001", 20 * GIB, clean, used_bytes=18 * GIB),
        Action("discard", "swap-0005", GIB, clean))  # no ledger entry: its age is unknown
    assert plan.refused == ()
    assert plan.summary == "remove 6 file(s)"
    one_page_more = [*files[:2], replace(files[2], used_bytes=2 * GIB + 4096)]
    tighter = plan_clean(snapshot(used_percent=50, total_gib=80, files=one_page_more),
                         CONFIG, NOW)
    assert [a.name for a in tighter.actions] == ["swap-0004", "swap-0002"]
    assert tighter.refused == (f"{DIR}/swap-0001 holds 18G of pages, more than fit in free "
                               "memory now",)
    assert tighter.summary == "remove 2 file(s); refusing 1"


def test_clean_summary_counts_every_file_it_removes() -> None:
    plan = plan_clean(snapshot(files=THREE), CONFIG, NOW)
    assert plan.summary == "remove 3 file(s)"
    assert plan.refused == ()


# -- swap auto: the thresholds, exactly -------------------------------------------------


def test_pressure_exactly_at_the_threshold_grows() -> None:
    plan = plan_auto(snapshot(used_percent=40, psi_avg60=10.0, files=SWAP_NEARLY_FULL),
                     CONFIG, NOW)
    assert [(a.kind, a.name) for a in plan.actions] == [("create", "swap-0003")]


def test_pressure_grows_while_less_than_exactly_half_an_increment_is_free() -> None:
    def with_free(free_bytes: int) -> list[str]:
        files = [F("swap-0001", created=1, used_gib=1),
                 F("swap-0002", created=2, used_bytes=GIB - free_bytes)]
        plan = plan_auto(snapshot(used_percent=40, psi_avg60=10.0, files=files), CONFIG, NOW)
        return [a.name for a in plan.actions]

    assert with_free(CONFIG.increment_bytes // 2 - 4096) == ["swap-0003"]
    assert with_free(CONFIG.increment_bytes // 2) == []


def test_free_threshold_exactly() -> None:
    """15 % free is enough; a page less is not."""
    def with_free(free_bytes: int) -> list[str]:
        files = [F("swap-0001", created=1, used_gib=1),
                 F("swap-0002", created=2, used_bytes=GIB - free_bytes)]
        return [a.name for a in plan_auto(snapshot(files=files), CONFIG, NOW).actions]

    at = -(-15 * 2 * GIB // 100)  # 15 % of 2G, rounded up to a whole byte
    assert with_free(at) == []
    assert with_free(at - 4096) == ["swap-0003"]


def test_predicted_exhaustion_exactly_at_the_horizon() -> None:
    """Free swap that lasts exactly the horizon is enough; the rate's horizon is
    2 x online_s + 0.5 s, and the count covers what the rate needs beyond what is free."""
    trend = SwapTrend(100 * MIB, online_s=0.75)  # horizon 2 s: 200M
    assert trend.horizon_s == 2.0

    def grow(free_mib: int, config: SwapConfig = CONFIG) -> int:
        files = [F("swap-0001", created=1, used_gib=1),
                 F("swap-0002", created=2, used_bytes=GIB - free_mib * MIB)]
        facts = replace(snapshot(files=files), trend=trend)
        return len(plan_auto(facts, replace(config, free_threshold_percent=0), NOW).actions)

    assert grow(200) == 0 and grow(199) == 1
    small = replace(CONFIG, increment_bytes=64 * MIB)
    assert grow(199, small) == 1  # 1M short: one file
    assert grow(72, small) == 2  # 128M short: two
    assert grow(71, small) == 3


@pytest.mark.parametrize(("used", "psi", "low"), [(59.0, 4.9, True), (60.0, 0.0, False),
                                                  (30.0, 5.0, False), (30.0, None, True)])
def test_the_shrink_cooldown_starts_only_well_below_the_threshold(used: float,
                                                                  psi: float | None,
                                                                  low: bool) -> None:
    # low: 20 points under the 80 % threshold, and PSI under half of its 10 % (or none)
    plan = plan_auto(snapshot(used_percent=used, psi_avg60=psi, files=THREE), CONFIG, NOW)
    assert plan.ledger.low_since == (NOW if low else None)


def test_a_blocked_growth_is_one_event_with_the_reason() -> None:
    facts = snapshot(used_percent=85, files=AT_MIN, fs_free_gib=25.5)
    plan = plan_auto(facts, CONFIG, NOW)
    assert plan.failed is not None
    assert plan.notices == (Notice("swap_growth_blocked", plan.failed, {}),)
    assert plan.ledger.blocked == plan.failed


def test_the_auto_plan_keeps_the_files_and_the_foreign_entries() -> None:
    facts = snapshot(files=AT_MIN, extra_entries=[SwapDirEntry("swapfile", GIB, True, True)])
    plan = plan_auto(facts, CONFIG, NOW)
    assert plan.foreign == ("swapfile",)
    assert [f.name for f in plan.files] == ["swap-0001", "swap-0002"]
    assert plan.total_bytes == 2 * GIB


def test_an_emergency_below_min_size_still_only_makes_up_min_size() -> None:
    plan = plan_auto(snapshot(used_percent=95, files=[AT_MIN[0]]), CONFIG, NOW)
    assert [(a.kind, a.name, a.size_bytes) for a in plan.actions] == [
        ("create", "swap-0002", GIB)]
    assert plan.actions[0].reason == "managed swap 1G is below min_size 2G"


def test_growth_makes_bigger_files_only_when_the_slots_left_cannot_reach_max_size() -> None:
    # 14G to grow with 14 slots left: 1G files are enough
    config = replace(CONFIG, min_size_bytes=GIB, max_size_bytes=15 * GIB)
    files = [F("swap-0001")]
    plan = plan_auto(snapshot(used_percent=82, files=files,
                              other_areas=KERNEL_AREA_LIMIT - 15), config, NOW)
    assert [a.size_bytes for a in plan.actions] == [GIB]
    # one slot left: the whole remaining 14G in that file
    last = plan_auto(snapshot(used_percent=82, files=files,
                              other_areas=KERNEL_AREA_LIMIT - 2), config, NOW)
    assert [a.size_bytes for a in last.actions] == [14 * GIB]


def test_emergency_growth_counts_the_first_new_file_against_the_free_space() -> None:
    # 500G filesystem, floor 25G: 27G free holds two 1G files, 27G - 1 byte only one
    full = plan_auto(snapshot(used_percent=92, files=AT_MIN, fs_free_gib=27), CONFIG, NOW)
    assert [a.name for a in full.actions] == ["swap-0003", "swap-0004"]
    short = snapshot(used_percent=92, files=AT_MIN, fs_free_gib=27)
    short = replace(short, fs=replace(short.fs, available_bytes=27 * GIB - 1))
    one = plan_auto(short, CONFIG, NOW)
    assert [a.name for a in one.actions] == ["swap-0003"]
    assert one.failed is not None and "not enough free space" in one.failed


# -- the ledger on disk ------------------------------------------------------------------


@pytest.mark.parametrize("text", ['{"version": 1, "files": {"swap-0001": 1}}',
                                  '{"version": 1, "files": [{"name": "swap-0001"}]}',
                                  '{"version": 1, "files": [{"nom": "x"}]}'],
                         ids=["files-not-a-list", "entry-missing-fields", "unknown-field"])
def test_a_ledger_with_damaged_files_is_kept_aside_and_starts_empty(tmp_path: Path,
                                                                     text: str) -> None:
    (tmp_path / "swap.json").write_text(text)
    assert ledgers.load(tmp_path) == Ledger()
    assert not (tmp_path / "swap.json").exists()
    (aside,) = (p for p in tmp_path.iterdir() if p.name.startswith("swap.json."))
    assert aside.read_text() == text


def test_a_partial_ledger_keeps_what_it_has(tmp_path: Path) -> None:
    entry = {"name": "swap-0002", "size_bytes": GIB, "created_at": 4.0, "method": "zeros"}
    (tmp_path / "swap.json").write_text(json.dumps({"version": 1, "files": [entry]}))
    assert ledgers.load(tmp_path) == Ledger((LedgerFile("swap-0002", GIB, 4.0, "zeros"),))
    (tmp_path / "swap.json").write_text(json.dumps({"version": 1, "low_since": 7.5,
                                                    "blocked": "at max_size"}))
    assert ledgers.load(tmp_path) == Ledger((), 7.5, "at max_size")


def test_a_saved_ledger_is_json_with_every_field(tmp_path: Path) -> None:
    ledger = Ledger((LedgerFile("swap-0001", GIB, 1.5, "fallocate", "b", 9.0),), 3.0, "x")
    ledgers.save(tmp_path, ledger)
    data = json.loads((tmp_path / "swap.json").read_text())
    assert data["files"] == [{"name": "swap-0001", "size_bytes": GIB, "created_at": 1.5,
                              "method": "fallocate", "boot_id": "b", "off_since": 9.0}]
    assert (data["low_since"], data["blocked"]) == (3.0, "x")
    assert ledgers.load(tmp_path) == ledger


# -- the swap file itself, before the kernel sees it --------------------------------------
# Only what happens on an ordinary file in tmp_path: the header, the checks before swapon,
# removal. swapon/swapoff, create (which ends in swapon) and the executor need a real
# filesystem and the kernel's swap: they are the integration tests (loop filesystems).

SIZE = 64 * MIB


def test_the_swap_header_is_one_util_linux_reads_with_every_page_but_the_first(
        tmp_path: Path) -> None:
    path = tmp_path / "swap-0001"
    path.write_bytes(b"")
    os.truncate(path, SIZE)
    fd = os.open(path, os.O_RDWR)
    try:
        swapfiles.write_header(fd, SIZE)
    finally:
        os.close(fd)
    page = path.read_bytes()[:swapfiles.PAGE_SIZE]
    version, last_page, bad_pages = struct.unpack_from("<III", page, 1024)
    assert (version, last_page, bad_pages) == (1, SIZE // swapfiles.PAGE_SIZE - 1, 0)
    assert page.endswith(b"SWAPSPACE2")
    if shutil.which("blkid"):
        probe = subprocess.run(["blkid", "-p", "-o", "export", str(path)], capture_output=True,
                               text=True, check=True).stdout.splitlines()
        assert "TYPE=swap" in probe and "VERSION=1" in probe


def test_a_swap_area_of_fewer_than_ten_pages_is_refused(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "tiny", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(swapfiles.SwapError) as info:
            swapfiles.write_header(fd, 9 * swapfiles.PAGE_SIZE)
        assert info.value.message == "a swap area needs at least 10 pages, got 9"
        swapfiles.write_header(fd, 10 * swapfiles.PAGE_SIZE)
    finally:
        os.close(fd)


def swap_dir_with(tmp_path: Path, *, mode: int = 0o600, size: int = SIZE,
                  header: bool = True) -> Path:
    swap_dir = tmp_path / "swap"
    swap_dir.mkdir(mode=0o700)
    path = swap_dir / "swap-0001"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.truncate(fd, size)
        if header:
            swapfiles.write_header(fd, size)
    finally:
        os.close(fd)
    path.chmod(mode)
    return swap_dir


@pytest.mark.parametrize(("shape", "problem", "fix"), [
    ({"mode": 0o640}, "open to group or others (mode 0640)", "chmod 0600 {path}"),
    ({"mode": 0o602}, "open to group or others (mode 0602)", "chmod 0600 {path}"),
    ({"size": SIZE // 2}, "32M, shorter than the 64M recorded", "run `clusterctl swap clean`"),
    ({"header": False}, "without a swap header", "run `clusterctl swap clean`"),
], ids=["group-readable", "others-writable", "short", "no-header"])
def test_a_file_unfit_to_swap_on_is_refused_with_its_problem_and_fix(
        tmp_path: Path, shape: dict[str, Any], problem: str, fix: str) -> None:
    swap_dir = swap_dir_with(tmp_path, **shape)
    dfd = swapfiles.open_dir(swap_dir, create=False)
    try:
        with pytest.raises(swapfiles.SwapError) as info:
            swapfiles.open_swap_file(dfd, swap_dir, "swap-0001", SIZE)
    finally:
        os.close(dfd)
    path = swap_dir / "swap-0001"
    assert info.value.message == f"{path} is {problem}; refusing to swap on it"
    assert info.value.fix == fix.format(path=path)


def test_a_fit_file_is_opened_at_or_above_its_recorded_size(tmp_path: Path) -> None:
    swap_dir = swap_dir_with(tmp_path, size=SIZE + swapfiles.PAGE_SIZE)
    dfd = swapfiles.open_dir(swap_dir, create=False)
    try:
        for recorded in (SIZE, SIZE + swapfiles.PAGE_SIZE):
            os.close(swapfiles.open_swap_file(dfd, swap_dir, "swap-0001", recorded))
    finally:
        os.close(dfd)


def test_a_symlink_or_a_directory_in_a_swap_files_place_is_refused_and_left(
        tmp_path: Path) -> None:
    swap_dir = swap_dir_with(tmp_path)
    (swap_dir / "swap-0002").symlink_to(swap_dir / "swap-0001")
    (swap_dir / "swap-0003").mkdir()
    dfd = swapfiles.open_dir(swap_dir, create=False)
    try:
        with pytest.raises(swapfiles.SwapError) as link:
            swapfiles.open_swap_file(dfd, swap_dir, "swap-0002", SIZE)
        with pytest.raises(swapfiles.SwapError) as directory:
            swapfiles.open_swap_file(dfd, swap_dir, "swap-0003", SIZE)
        with pytest.raises(swapfiles.SwapError) as removing:
            swapfiles.remove(dfd, "swap-0003")
        with pytest.raises(swapfiles.SwapError) as removing_link:
            swapfiles.remove(dfd, "swap-0002")  # never through the link
        swapfiles.remove(dfd, "swap-0001")
    finally:
        os.close(dfd)
    assert link.value.message == (f"cannot open {swap_dir}/swap-0002 to swap on it: "
                                  "a symlink")
    assert directory.value.message == (f"{swap_dir}/swap-0003 is not a regular file; refusing "
                                       "to swap on it")
    assert removing.value.message == ("swap-0003 in the swap dir is not a regular file; "
                                      "leaving it alone")
    assert removing_link.value.message == ("swap-0002 in the swap dir is not a regular file; "
                                           "leaving it alone")
    assert sorted(p.name for p in swap_dir.iterdir()) == ["swap-0002", "swap-0003"]
