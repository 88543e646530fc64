from __future__ import annotations

import math
from typing import Any

import pytest

from clusterctl.check.report import build_report, tier_profile
from clusterctl.config import Config
from clusterctl.host.disk_speed import WriteTestResult
from clusterctl.units import GIB, KIB, MIB
from tests.factories import ADVANCED, BASIC, INTERMEDIATE, machine

CONFIG = Config()


def report_for(**spec: Any):  # type: ignore[no-untyped-def]
    return build_report(machine(**spec), CONFIG)


def codes(report) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {f.code: f.severity for f in report.findings}


# -- the seed's three machines: tier, recommendations, score -------------------


def test_basic_machine() -> None:
    report = report_for(**BASIC)
    assert report.tier == "basic"
    assert report.recommendations == {
        "DASK_WORKERS": 2, "DASK_THREADS": 1, "MEMORY_LIMIT": "1.5GB",
        "OLLAMA_LAYERS": 10, "OLLAMA_MODELS": 1,
        "vm.swappiness": 30, "vm.vfs_cache_pressure": 100,  # HDD values
    }
    ram_gib = 3_995_000 * KIB / GIB
    expected = 25 * 2 / 16 + 25 * ram_gib / 64 + (4 + 5 * 50 / 100) + 0
    assert report.score == round(expected) == 11
    assert report.ready  # "4 GB" with 3.8 GiB MemTotal meets the 4 GiB minimum


def test_intermediate_machine() -> None:
    report = report_for(**INTERMEDIATE)
    assert report.tier == "intermediate"
    assert report.recommendations == {
        "DASK_WORKERS": 4, "DASK_THREADS": 2, "MEMORY_LIMIT": "3GB",
        "OLLAMA_LAYERS": 20, "OLLAMA_MODELS": 2,
        "vm.swappiness": 10, "vm.vfs_cache_pressure": 50,  # SSD values
    }
    gpu = 35 * math.log2(1 + 8188 * MIB / GIB) / math.log2(81)
    expected = 25 * 6 / 16 + 25 * (12_150_000 * KIB / GIB) / 64 + 15 + gpu
    assert report.score == round(expected) == 46


def test_advanced_machine() -> None:
    report = report_for(**ADVANCED)
    assert report.tier == "advanced"
    assert report.recommendations["DASK_WORKERS"] == 6
    assert report.recommendations["DASK_THREADS"] == 2
    assert report.recommendations["MEMORY_LIMIT"] == "4GB"
    assert report.recommendations["OLLAMA_LAYERS"] == 35
    assert report.recommendations["OLLAMA_MODELS"] == 3
    assert report.score == 78
    assert [p.name for p in report.score_parts] == ["cpu", "memory", "storage", "gpu"]
    assert sum(p.max_points for p in report.score_parts) == 100


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
    report = build_report(facts, CONFIG, mode="full", write_test=slow)
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
