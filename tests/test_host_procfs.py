from __future__ import annotations

from pathlib import Path

import pytest

from clusterctl.errors import HostError
from clusterctl.host import procfs
from clusterctl.units import KIB
from tests.conftest import HOSTS
from tests.hosttree import gpu_server, laptop, old_kernel

# -- memory -------------------------------------------------------------------


def test_meminfo_of_the_ci_vm() -> None:
    mem = procfs.read_memory(HOSTS / "ci-vm")
    assert mem.total_bytes == 24684096 * KIB
    assert mem.available_bytes is not None
    assert mem.swap_total_bytes == 0
    assert mem.swap_used_percent is None  # no swap: no percentage, not 0 %


def test_meminfo_with_zram_and_a_swap_file_active() -> None:
    mem = procfs.read_memory(HOSTS / "ci-vm-zram")
    assert mem.swap_total_bytes == (1048572 + 262140) * KIB


def test_laptop_memory_use_counts_like_free(tmp_path: Path) -> None:
    mem = procfs.read_memory(laptop(tmp_path).root)
    assert mem.total_bytes == 16082128 * KIB
    assert mem.used_bytes == (16082128 - 9873264) * KIB
    assert mem.used_percent == pytest.approx(38.6, abs=0.1)
    assert mem.swap_used_bytes == (8388604 - 8210940) * KIB
    assert mem.committed_as_bytes == 21406832 * KIB


def test_old_kernel_without_memavailable_estimates_use(tmp_path: Path) -> None:
    mem = procfs.read_memory(old_kernel(tmp_path).root)
    assert mem.available_bytes is None
    assert mem.used_bytes == (8058956 - 391204 - 204352 - 3581208) * KIB


def test_meminfo_without_memtotal_is_an_error() -> None:
    with pytest.raises(ValueError, match="MemTotal"):
        procfs.parse_meminfo("MemFree: 1 kB\n")


# -- swaps --------------------------------------------------------------------


def test_swaps_with_zram_and_a_file() -> None:
    areas = procfs.read_swaps(HOSTS / "ci-vm-zram")
    assert [(a.path, a.type, a.priority, a.is_zram) for a in areas] == [
        ("/dev/zram0", "partition", 100, True),
        ("/var/tmp/capture.swap", "file", -2, False),
    ]
    assert areas[0].size_bytes == 1048572 * KIB


def test_no_swap_is_an_empty_tuple() -> None:
    assert procfs.read_swaps(HOSTS / "ci-vm") == ()


def test_swap_paths_with_spaces_are_unescaped() -> None:
    text = (
        "Filename\tType\tSize\tUsed\tPriority\n"
        "/var/lib/my\\040swap/file\tfile\t1024\t0\t-3\n"
    )
    assert procfs.parse_swaps(text)[0].path == "/var/lib/my swap/file"


# -- PSI ----------------------------------------------------------------------


def test_pressure_on_the_ci_vm() -> None:
    psi = procfs.read_pressure(HOSTS / "ci-vm")
    assert psi.available
    assert psi.memory is not None and psi.memory.full is not None
    assert psi.reason is None


def test_laptop_pressure_values(tmp_path: Path) -> None:
    psi = procfs.read_pressure(laptop(tmp_path).root)
    assert psi.memory is not None
    assert psi.memory.some.avg10 == 1.25
    assert psi.memory.full is not None and psi.memory.full.total_us == 6112055


def test_old_kernel_has_no_psi_and_says_why(tmp_path: Path) -> None:
    psi = procfs.read_pressure(old_kernel(tmp_path).root)
    assert not psi.available
    assert psi.memory is None and psi.cpu is None
    assert psi.reason is not None and "4.20" in psi.reason


def test_psi_disabled_at_boot_is_told_apart(tmp_path: Path) -> None:
    (tmp_path / "proc/pressure").mkdir(parents=True)  # files exist but cannot be read
    psi = procfs.read_pressure(tmp_path)
    assert psi.reason is not None and "psi=1" in psi.reason


def test_cpu_pressure_without_a_full_line() -> None:
    pressure = procfs.parse_pressure("some avg10=0.10 avg60=0.20 avg300=0.30 total=42\n")
    assert pressure.full is None
    assert pressure.some.total_us == 42


# -- CPU ----------------------------------------------------------------------


def test_cpu_of_the_ci_vm() -> None:
    cpu = procfs.read_cpu(HOSTS / "ci-vm")
    assert cpu.logical_cores == 2
    assert cpu.model == "AMD EPYC"
    assert cpu.usage_percent is None  # not sampled
    assert cpu.load_1m is not None


def test_hyperthreaded_laptop_counts_physical_cores(tmp_path: Path) -> None:
    cpu = procfs.read_cpu(laptop(tmp_path).root)
    assert (cpu.logical_cores, cpu.physical_cores) == (8, 4)
    assert cpu.model is not None and "i7-1165G7" in cpu.model


def test_two_socket_server(tmp_path: Path) -> None:
    cpu = procfs.read_cpu(gpu_server(tmp_path).root)
    assert (cpu.logical_cores, cpu.physical_cores) == (64, 32)


def test_arm_style_cpuinfo_falls_back_to_sysfs_topology(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text(
        "processor\t: 0\nBogoMIPS\t: 50.00\n\nprocessor\t: 1\nBogoMIPS\t: 50.00\n\n"
    )
    for cpu, core in ((0, 0), (1, 1)):
        topo = tmp_path / f"sys/devices/system/cpu/cpu{cpu}/topology"
        topo.mkdir(parents=True)
        (topo / "core_id").write_text(f"{core}\n")
        (topo / "physical_package_id").write_text("0\n")
    cpu = procfs.read_cpu(tmp_path)
    assert (cpu.logical_cores, cpu.physical_cores, cpu.model) == (2, 2, None)


def test_cpu_usage_between_two_samples() -> None:
    first = procfs.parse_stat_cpu("cpu  100 0 100 800 0 0 0 0 0 0\n")
    second = procfs.parse_stat_cpu("cpu  150 0 150 900 0 0 0 0 0 0\n")
    assert procfs.cpu_usage_percent(first, second) == pytest.approx(50.0)
    assert procfs.cpu_usage_percent(first, first) is None


def test_a_tree_without_proc_is_a_clear_host_error(tmp_path: Path) -> None:
    with pytest.raises(HostError, match=r"cannot read .*proc/meminfo") as info:
        procfs.read_memory(tmp_path)
    assert info.value.fix is not None and "--root" in info.value.fix


def test_garbled_proc_files_degrade_instead_of_crashing(tmp_path: Path) -> None:
    (tmp_path / "proc/pressure").mkdir(parents=True)
    (tmp_path / "proc/pressure/memory").write_text("some avg10=zero\n")
    (tmp_path / "proc/stat").write_text("intr 0\n")
    (tmp_path / "proc/loadavg").write_text("n/a\n")
    (tmp_path / "proc/meminfo").write_text("MemFree: 1 kB\n")
    assert not procfs.read_pressure(tmp_path).available
    assert procfs.read_cpu_times(tmp_path) is None
    assert procfs.read_cpu(tmp_path).load_1m is None
    with pytest.raises(HostError, match=r"cannot parse .*meminfo: meminfo has no MemTotal"):
        procfs.read_memory(tmp_path)
