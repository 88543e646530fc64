"""The optimize planner: the hardware table as the floor, disk types, GPU-less and multi-GPU
nodes."""

from __future__ import annotations

import math
from typing import Any

import pytest

from clusterctl.config import Config, OptimizeConfig
from clusterctl.optimize.plan import (
    DASK_ENV_FILE,
    DASK_YAML_FILE,
    GB,
    OLLAMA_DROPIN,
    SYSCTL_FILE,
    OptimizeFacts,
    SysctlOverride,
    plan,
)
from clusterctl.units import KIB, MIB


def facts(*, cores: int, memtotal_kib: int, vram_mib: tuple[int, ...] = (),
          media: str | None = "ssd", ollama: bool = True, dask: bool = True,
          **over: Any) -> OptimizeFacts:
    base: dict[str, Any] = {
        "logical_cores": cores, "ram_bytes": memtotal_kib * KIB, "swap_media": media,
        "gpu_vram_bytes": tuple(m * MIB for m in vram_mib), "ollama_installed": ollama,
        "dask_installed": dask,
        "sysctl_live": {"vm.swappiness": "60", "vm.vfs_cache_pressure": "100"},
        "sysctl_overrides": (), "ollama_env": {}, "files_now": {}}
    base.update(over)
    return OptimizeFacts(**base)


# The hardware table's three example machines, each at the top of its row, MemTotal as such
# machines show it.
EXAMPLE_MACHINES = {
    # 2 cores, "4 GB", a 4 GB GPU (GTX 1650)
    "basic": facts(cores=2, memtotal_kib=3_995_000, vram_mib=(4096,)),
    # 6 cores, "16 GB", an 8 GB GPU (RTX 4060)
    "intermediate": facts(cores=6, memtotal_kib=16_310_000, vram_mib=(8188,)),
    # 16 cores, "32 GB", a 24 GB GPU (RTX 4090)
    "advanced": facts(cores=16, memtotal_kib=32_780_000, vram_mib=(24564,)),
}
# DASK_NWORKERS, DASK_NTHREADS, DASK_MEMORY_LIMIT, num_gpu, OLLAMA_MAX_LOADED_MODELS
TABLE = {
    "basic": ("2", "1", "1.5GB", "10", "1"),
    "intermediate": ("4", "2", "3GB", "20", "2"),
    "advanced": ("6", "2", "4GB", "35", "3"),
}


@pytest.mark.parametrize("tier", TABLE)
def test_the_tables_example_machines_get_its_rows(tier: str) -> None:
    p = plan(EXAMPLE_MACHINES[tier], Config())
    assert p.tier == tier
    got = tuple(p.setting(k).value for k in ("DASK_NWORKERS", "DASK_NTHREADS",
                                             "DASK_MEMORY_LIMIT", "num_gpu",
                                             "OLLAMA_MAX_LOADED_MODELS"))
    assert got == TABLE[tier]


def test_ssd_and_hdd_get_their_sysctls() -> None:
    ssd = plan(facts(cores=8, memtotal_kib=32_000_000, media="ssd"), Config())
    hdd = plan(facts(cores=8, memtotal_kib=32_000_000, media="hdd"), Config())
    unknown = plan(facts(cores=8, memtotal_kib=32_000_000, media=None), Config())
    assert ssd.sysctl == {"vm.swappiness": "10", "vm.vfs_cache_pressure": "50"}
    assert hdd.sysctl == {"vm.swappiness": "30", "vm.vfs_cache_pressure": "100"}
    assert unknown.sysctl == hdd.sysctl  # the conservative values
    assert ssd.setting("vm.swappiness").reason == "swap dir on an SSD"
    assert ssd.setting("vm.swappiness").current == "60"
    sysctl_file = next(f for f in ssd.files if f.path == SYSCTL_FILE)
    assert sysctl_file.content.endswith("vm.swappiness = 10\nvm.vfs_cache_pressure = 50\n")
    custom = Config(optimize=OptimizeConfig(swappiness_ssd=1))
    assert plan(facts(cores=8, memtotal_kib=32_000_000), custom).sysctl["vm.swappiness"] == "1"


def test_a_gpu_less_node_keeps_ollamas_models_out_of_dasks_ram() -> None:
    p = plan(facts(cores=8, memtotal_kib=32_780_000), Config())  # 31.3 GiB, no GPU
    assert p.setting("num_gpu").value == "0"
    assert p.setting("num_gpu").applied_by is None  # advice: a model parameter
    # models in RAM: half of it holds 5 models of 3G, the tier allows 3
    assert p.setting("OLLAMA_MAX_LOADED_MODELS").value == "3"
    # 0.8 x (33.6 GB - 3 x 3 GiB) / 6 workers = 3.19 GB -> 3GB
    assert p.setting("DASK_MEMORY_LIMIT").value == "3GB"
    assert "less 9G for Ollama's models" in p.setting("DASK_MEMORY_LIMIT").reason
    assert p.setting("OLLAMA_NUM_PARALLEL").value == "1"
    without_ollama = plan(facts(cores=8, memtotal_kib=32_780_000, ollama=False), Config())
    assert without_ollama.setting("DASK_MEMORY_LIMIT").value == "4GB"  # 4.47 GB
    assert "ollama: not installed" in without_ollama.skipped[0]
    small = plan(facts(cores=4, memtotal_kib=8_000_000), Config())
    assert small.setting("OLLAMA_KEEP_ALIVE").value == "2m"  # tight: unload sooner


def test_a_multi_gpu_node_loads_more_models_and_serves_in_parallel() -> None:
    p = plan(facts(cores=64, memtotal_kib=1_056_000_000, vram_mib=(81559,) * 8), Config())
    assert p.tier == "advanced"
    assert p.setting("OLLAMA_MAX_LOADED_MODELS").value == "24"  # 3 per GPU, all fit
    assert p.setting("OLLAMA_NUM_PARALLEL").value == "4"  # 80G each
    assert p.setting("OLLAMA_KEEP_ALIVE").value == "30m"
    assert p.setting("DASK_MEMORY_LIMIT").value == "144GB"  # 0.8 x 1081 GB / 6
    dropin = next(f for f in p.files if f.path == OLLAMA_DROPIN)
    assert dropin.restarts == "ollama.service"
    assert 'Environment="OLLAMA_MAX_LOADED_MODELS=24"\n' in dropin.content
    assert "num_gpu" not in dropin.content


def test_threads_never_exceed_the_cores() -> None:
    p = plan(facts(cores=3, memtotal_kib=64_000_000), Config())  # basic by cores
    assert (p.setting("DASK_NWORKERS").value, p.setting("DASK_NTHREADS").value) == ("2", "1")
    one = plan(facts(cores=1, memtotal_kib=4_000_000), Config())
    assert one.setting("DASK_NWORKERS").value == "1"
    assert "at most one per core (1)" in one.setting("DASK_NWORKERS").reason


def test_a_later_sysctl_file_wins_and_is_left_alone() -> None:
    over = SysctlOverride("vm.swappiness", "/etc/sysctl.d/99-local.conf", "1")
    p = plan(facts(cores=8, memtotal_kib=32_000_000, sysctl_overrides=(over,)), Config())
    assert "vm.swappiness" not in p.sysctl
    s = p.setting("vm.swappiness")
    assert s.applied_by is None and not s.changes
    assert s.reason == "left alone: /etc/sysctl.d/99-local.conf sets 1 and wins at boot"
    assert p.overridden == (over,)


def test_missing_software_is_skipped_with_a_reason() -> None:
    p = plan(facts(cores=8, memtotal_kib=32_000_000, ollama=False, dask=False), Config())
    assert [f.path for f in p.files] == [SYSCTL_FILE]
    assert p.skipped == ("ollama: not installed (no ollama binary or ollama.service)",
                         "dask: not installed (no distributed package found)")
    assert {s.group for s in p.settings} == {"sysctl"}


def test_the_dask_files_carry_the_settings() -> None:
    p = plan(EXAMPLE_MACHINES["advanced"], Config())
    env = next(f for f in p.files if f.path == DASK_ENV_FILE).content
    assert "DASK_SCHEDULER_ADDRESS=tcp://127.0.0.1:8786\nDASK_NWORKERS=6\n" in env
    yaml = next(f for f in p.files if f.path == DASK_YAML_FILE).content
    assert "    memory:\n      target: 0.6\n      spill: 0.7\n      pause: 0.8\n" \
           "      terminate: 0.95\n" in yaml
    now = {DASK_YAML_FILE: yaml, DASK_ENV_FILE: env}
    again = plan(facts(cores=16, memtotal_kib=32_780_000, vram_mib=(24564,), files_now=now),
                 Config())
    assert not [s.key for s in again.settings if s.group == "dask" and s.changes]




# -- the tier row is the floor -------------------------------------------------------


def test_this_node_gives_each_worker_its_ram_share_above_the_basic_floor() -> None:
    """The 2-core, 23.5 GiB node of the report: the basic row says 1.5GB per worker, the
    node's RAM gives 10GB, and that is what `optimize` writes and `check` recommends."""
    limit = plan(facts(cores=2, memtotal_kib=24_684_096, ollama=False), Config()
                 ).setting("DASK_MEMORY_LIMIT")
    assert (limit.value, limit.floor) == ("10GB", "1.5GB")
    assert limit.reason == ("basic tier floor 1.5GB, raised: 80% of RAM (23.5G) / 2 workers, "
                            "in 0.5GB steps")


def test_a_node_below_its_rows_memory_figure_is_lowered_and_says_why() -> None:
    p = plan(facts(cores=4, memtotal_kib=8_058_956, media="hdd", ollama=False), Config())
    assert p.tier == "intermediate"  # 4 cores, "8 GB"
    limit = p.setting("DASK_MEMORY_LIMIT")  # 4 x 3GB would not fit in 80 % of 8.25 GB
    assert (limit.value, limit.floor) == ("1.5GB", "3GB")
    assert limit.reason.startswith("intermediate tier floor 3GB, lowered: 80% of RAM (7.7G)")
    threads = p.setting("DASK_NTHREADS")
    assert (threads.value, threads.floor) == ("1", "2")
    assert threads.reason.endswith("lowered: 4 cores for 4 workers")


SHAPES = {
    **{f"{tier} example": m for tier, m in EXAMPLE_MACHINES.items()},
    "2 cores, 23.5 GiB, no GPU": facts(cores=2, memtotal_kib=24_684_096, ollama=False),
    "2 cores, 23.5 GiB, Ollama on the CPU": facts(cores=2, memtotal_kib=24_684_096),
    "2 cores, 3.8 GiB, Ollama on the CPU": facts(cores=2, memtotal_kib=3_995_000),
    "1 core, 4 GiB": facts(cores=1, memtotal_kib=4_000_000),
    "3 cores, 61 GiB": facts(cores=3, memtotal_kib=64_000_000),
    "4 cores, 7.7 GiB": facts(cores=4, memtotal_kib=8_058_956),
    "8 threads, 15.3 GiB, Ollama on the CPU": facts(cores=8, memtotal_kib=16_082_128),
    "16 cores, 126 GiB, a 4 GB GPU": facts(cores=16, memtotal_kib=131_981_020, vram_mib=(4096,)),
    "64 cores, 1 TiB, 8 x 80 GB": facts(cores=64, memtotal_kib=1_056_000_000,
                                        vram_mib=(81559,) * 8),
}


def _number(value: str) -> float:
    return float(value.removesuffix("GB"))


@pytest.mark.parametrize("shape", SHAPES)
def test_the_tier_row_is_a_floor_left_only_where_the_node_bounds_it(shape: str) -> None:
    """Every setting from the table starts at its row's value; it ends below only where the
    node cannot hold it (and the reason says "lowered" and names the limit), above only as
    a share of what the node has ("raised"); and the limits do hold."""
    node = SHAPES[shape]
    config = Config()
    p = plan(node, config)
    floored = [s for s in p.settings if s.floor is not None]
    ollama_keys = {"OLLAMA_MAX_LOADED_MODELS", "num_gpu"} if node.ollama_installed else set()
    assert {s.key for s in floored} == {"DASK_NWORKERS", "DASK_NTHREADS",
                                        "DASK_MEMORY_LIMIT"} | ollama_keys
    for s in floored:
        value, floor = _number(s.value), _number(s.floor or "")
        assert s.reason.startswith(f"{p.tier} tier floor "), s
        assert ("lowered: " in s.reason) == (value < floor), s
        assert ("raised: " in s.reason) == (value > floor), s
    workers = int(p.setting("DASK_NWORKERS").value)
    threads = int(p.setting("DASK_NTHREADS").value)
    limit = _number(p.setting("DASK_MEMORY_LIMIT").value) * GB
    assert workers <= node.logical_cores or workers == 1
    assert threads <= math.ceil(node.logical_cores / workers)  # about a thread per core
    reserve = 0
    if node.ollama_installed:
        models = int(p.setting("OLLAMA_MAX_LOADED_MODELS").value)
        model = config.optimize.ollama_model_size_bytes
        fit = (sum(v // model for v in node.gpu_vram_bytes) if node.gpu_vram_bytes
               else node.ram_bytes // 2 // model)
        assert models <= max(1, fit)
        assert p.setting("num_gpu").value == (p.setting("num_gpu").floor
                                              if node.gpu_vram_bytes else "0")
        reserve = 0 if node.gpu_vram_bytes else models * model
    share = config.optimize.dask_memory_fraction * (node.ram_bytes - reserve)
    assert workers * limit <= share or limit == 0.5 * GB  # Dask's smallest useful limit
