from __future__ import annotations

import math
from typing import Any

import pytest

from clusterctl.check.report import Report, build_report
from clusterctl.config import Config
from clusterctl.host import HostFacts
from clusterctl.host.disk_speed import WriteTestResult
from clusterctl.optimize.plan import OptimizeFacts, plan, tier_profile
from clusterctl.units import GIB, KIB, MIB
from tests.factories import ADVANCED, BASIC, INTERMEDIATE, machine

CONFIG = Config()


def optimize_facts(host: HostFacts, *, dask: bool = True) -> OptimizeFacts:
    """What `optimize` reads on the machine the factory describes (sysctls at their defaults,
    none of clusterctl's files yet)."""
    media = host.swap_dir.media
    return OptimizeFacts(
        logical_cores=host.cpu.logical_cores, ram_bytes=host.memory.total_bytes,
        swap_media="ssd" if media == "ssd" else "hdd" if media == "hdd" else None,
        gpu_vram_bytes=tuple(g.memory_total_bytes for g in host.gpus.gpus
                             if not g.lost and g.memory_total_bytes),
        ollama_installed=host.ollama.installed, dask_installed=dask,
        sysctl_live={"vm.swappiness": "60", "vm.vfs_cache_pressure": "100"},
        sysctl_overrides=(), ollama_env={}, files_now={})


def report_for(**spec: Any) -> Report:
    host = machine(**spec)
    return build_report(host, CONFIG, plan=plan(optimize_facts(host), CONFIG))


def codes(report: Report) -> dict[str, str]:
    return {f.code: f.severity for f in report.findings}


def recommended(report: Report, *keys: str) -> dict[str, str]:
    values = {s.key: s.value for s in report.recommendations}
    return {k: values.get(k, "(not recommended)") for k in keys}


# -- the hardware table's three example machines: tier, recommendations, score ---------
# The recommendations are the optimize plan: the tier's row is the floor, the node's
# cores, RAM and VRAM bound it.


def test_basic_machine() -> None:
    report = report_for(**BASIC)
    assert report.tier == "basic"
    expected = {"DASK_NWORKERS": "2", "DASK_NTHREADS": "1", "DASK_MEMORY_LIMIT": "1.5GB",
                "vm.swappiness": "30", "vm.vfs_cache_pressure": "100"}  # HDD values
    assert recommended(report, *expected) == expected
    assert report.recommendations_skipped == (
        "ollama: not installed (no ollama binary or ollama.service)",)
    ram_gib = 3_995_000 * KIB / GIB
    score = 25 * 2 / 16 + 25 * ram_gib / 64 + (4 + 5 * 50 / 100) + 0
    assert report.score == round(score) == 11
    assert report.ready  # "4 GB" with 3.8 GiB MemTotal meets the 4 GiB minimum


def test_intermediate_machine() -> None:
    report = report_for(**INTERMEDIATE)
    assert report.tier == "intermediate"
    expected = {"DASK_NWORKERS": "4", "DASK_NTHREADS": "2",
                "vm.swappiness": "10", "vm.vfs_cache_pressure": "50"}  # SSD values
    assert recommended(report, *expected) == expected
    # "12 GB" cannot give 4 workers the tier's 3GB each: 0.8 x 12.4 GB / 4 = 2.49 -> 2GB
    limit = next(s for s in report.recommendations if s.key == "DASK_MEMORY_LIMIT")
    assert (limit.value, limit.floor) == ("2GB", "3GB")
    assert limit.reason.startswith("intermediate tier floor 3GB, lowered: 80% of RAM")
    gpu = 35 * math.log2(1 + 8188 * MIB / GIB) / math.log2(81)
    score = 25 * 6 / 16 + 25 * (12_150_000 * KIB / GIB) / 64 + 15 + gpu
    assert report.score == round(score) == 46


def test_advanced_machine() -> None:
    report = report_for(**ADVANCED, ollama="running")
    assert report.tier == "advanced"
    expected = {"DASK_NWORKERS": "6", "DASK_NTHREADS": "2", "DASK_MEMORY_LIMIT": "4GB",
                "num_gpu": "35", "OLLAMA_MAX_LOADED_MODELS": "3"}
    assert recommended(report, *expected) == expected
    assert report.score == 78
    assert [p.name for p in report.score_parts] == ["cpu", "memory", "storage", "gpu"]
    assert sum(p.max_points for p in report.score_parts) == 100


def test_without_a_plan_the_check_recommends_nothing_but_still_judges() -> None:
    report = build_report(machine(**BASIC), CONFIG, plan=None)
    assert report.recommendations == () and report.recommendations_skipped == ()
    assert report.tier == "basic" and report.ready


@pytest.mark.parametrize(
    ("cores", "memtotal_kib", "tier"),
    [
        (8, 16_300_000, "advanced"),  # a "16 GB" machine: 15.5 GiB MemTotal
        (8, 15_000_000, "intermediate"),  # 14.3 GiB is below 90 % of 16
        (7, 64_000_000, "intermediate"),  # cores decide too
        (4, 8_000_000, "intermediate"),
        (4, 7_000_000, "basic"),
        (3, 32_000_000, "basic"),
    ],
)
def test_tier_boundaries(cores: int, memtotal_kib: int, tier: str) -> None:
    assert tier_profile(cores, memtotal_kib * KIB).tier == tier


def test_a_big_gpu_node_scores_near_full_marks() -> None:
    report = report_for(cores=64, memtotal_kib=528_032_108, vram_mib=[81559] * 8, free_gib=1000)
    assert report.score == 100


def test_measured_write_speed_replaces_the_media_guess() -> None:
    facts = machine(**ADVANCED)
    slow = WriteTestResult("/var/lib", 256 * MIB, seconds=2.56)  # 100 MiB/s
    report = build_report(facts, CONFIG, plan=None, mode="full", write_test=slow)
    storage = next(p for p in report.score_parts if p.name == "storage")
    assert storage.points == pytest.approx(10 * (256 * MIB / 2.56) / 500e6 + 5)
    assert "measured 105 MB/s" in storage.detail


# -- readiness -------------------------------------------------------------------


def test_a_host_below_the_minimum_fails_with_every_reason() -> None:
    report = report_for(cores=1, memtotal_kib=2_000_000, fstype="tmpfs", media=None, free_gib=3)
    assert not report.ready
    fails = {f.code: f for f in report.findings if f.severity == "fail"}
    assert set(fails) == {"cpu.cores", "memory.total", "swap.filesystem", "swap.free_space"}
    assert fails["cpu.cores"].message == "1 CPU core(s); at least 2 needed"
    assert "tmpfs lives in memory" in fails["swap.filesystem"].message
    assert fails["swap.filesystem"].fix is not None
    assert "3G free for the swap dir" in fails["swap.free_space"].message


@pytest.mark.parametrize("fstype", ["zfs", "nfs4", "overlay", "fuse.sshfs", "exfat"])
def test_filesystems_that_cannot_hold_swap_files(fstype: str) -> None:
    assert codes(report_for(**ADVANCED, fstype=fstype))["swap.filesystem"] == "fail"


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs", "f2fs"])
def test_filesystems_that_can(fstype: str) -> None:
    assert "swap.filesystem" not in codes(report_for(**ADVANCED, fstype=fstype))


def test_warnings_do_not_fail_the_check() -> None:
    report = report_for(**BASIC, psi=False, systemd=False, ollama="installed", used_percent=90,
                        cpu_busy=95)
    found = codes(report)
    assert found["swap.media"] == "warn"
    assert found["kernel.psi"] == "warn"
    assert found["system.systemd"] == "warn"
    assert found["ollama.down"] == "warn"
    assert found["memory.busy"] == "warn"
    assert found["cpu.busy"] == "warn"
    assert report.ready


def test_no_gpu_is_information_with_the_reason() -> None:
    report = report_for(**BASIC)
    gpu = next(f for f in report.findings if f.code == "gpu.none")
    assert gpu.severity == "info"
    assert "libnvidia-ml.so.1" in gpu.message


def test_a_lost_gpu_is_a_warning_with_a_fix() -> None:
    report = report_for(**ADVANCED, lost_gpu=True)
    lost = next(f for f in report.findings if f.code == "gpu.lost")
    assert lost.severity == "warn" and lost.fix is not None and "reboot" in lost.fix


def test_running_ollama_is_not_a_finding() -> None:
    assert not {"ollama.down", "ollama.absent"} & set(codes(report_for(**BASIC,
                                                                       ollama="running")))
