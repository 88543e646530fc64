"""optimize apply/revert and the planner's numbers, to the file mode and the value.

Every apply and revert here runs against a node built under ``tmp_path`` (``root=``), never
the host's "/": the files, their modes, /proc/sys and the saved originals are all in that
tree. systemd is the one thing a test cannot run in-process: where restarts matter, a
stand-in with the manager's API (``Systemd``: daemon-reload, restart-if-active) keeps
what it was asked to do, as the real one would act on it. These cases were written against
the mutants that survived ``scripts/mutate optimize``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusterctl import config as cfg
from clusterctl.optimize import executor as optimize
from clusterctl.optimize.plan import (
    DASK_ENV_FILE,
    DASK_UNIT,
    DASK_YAML_FILE,
    OLLAMA_DROPIN,
    OLLAMA_UNIT,
    SYSCTL_FILE,
    OptimizeFacts,
    plan,
    tier_profile,
)
from clusterctl.system.systemd import Systemd
from clusterctl.units import GIB, KIB
from tests.hosttree import laptop
from tests.test_optimize_plan import facts

OUR_FILES = (SYSCTL_FILE, OLLAMA_DROPIN, DASK_ENV_FILE, DASK_YAML_FILE)
OPERATORS_YAML = "# the operator's own\n"


class Node:
    """A laptop-shaped host tree under tmp_path; every command gets ``root`` explicitly, and
    a systemd stand-in, so that nothing can reach the host's own manager."""

    def __init__(self, root: Path) -> None:
        assert root != Path("/") and root.is_absolute()
        self.root = root
        self.config = cfg.Config(ollama=cfg.OllamaConfig(url="http://127.0.0.1:9"))

    def path(self, host_path: str) -> Path:
        return self.root / host_path.lstrip("/")

    def text(self, host_path: str) -> str:
        return self.path(host_path).read_text()

    def apply(self, *, dry_run: bool = False, systemd: Systemd | None = None
              ) -> optimize.ApplyResult:
        return optimize.apply(self.config, root=self.root, dry_run=dry_run,
                              systemd=systemd or RecordingSystemd(set()),
                              now=lambda: 1_800_000_000.0)

    def revert(self, *, dry_run: bool = False, systemd: Systemd | None = None
               ) -> optimize.RevertResult:
        return optimize.revert(self.config, root=self.root, dry_run=dry_run,
                               systemd=systemd or RecordingSystemd(set()),
                               now=lambda: 1_800_000_000.0)

    def systemd_runs(self) -> None:
        self.path("/run/systemd/system").mkdir(parents=True, exist_ok=True)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    root = tmp_path / "node"
    tree = laptop(root)
    (root / "run/systemd/system").rmdir()  # systemd is not PID 1 here (until systemd_runs)
    tree.file("proc/sys/vm/swappiness", "60\n").file("proc/sys/vm/vfs_cache_pressure", "100\n")
    tree.file("usr/local/bin/ollama", "")
    (root / "usr/local/bin/ollama").chmod(0o755)
    (root / "usr/lib/python3/dist-packages/dask-2024.8.0.dist-info").mkdir(parents=True)
    (root / "usr/lib/python3/dist-packages/distributed-2024.8.0.dist-info").mkdir()
    tree.file("etc/sysctl.d/10-console-messages.conf", "kernel.printk = 4 4 1 7\n")
    old = os.umask(0o022)  # what a root shell and systemd give apply
    try:
        yield Node(root)
    finally:
        os.umask(old)


class RecordingSystemd(Systemd):
    """The system manager's API, kept in a list: which units run, what it was asked."""

    def __init__(self, running: set[str]) -> None:
        super().__init__()
        self.running = running
        self.asked: list[str] = []

    def daemon_reload(self) -> None:
        self.asked.append("daemon-reload")

    def restart_if_active(self, unit: str, *, wait_s: float = 90.0) -> bool:
        self.asked.append(f"restart-if-active {unit}")
        return unit in self.running


# -- apply: files, modes, directories ---------------------------------------------------


def test_apply_writes_its_files_0644_and_makes_missing_directories_0755(node: Node) -> None:
    node.path("/etc/dask").mkdir(mode=0o750)  # the operator's, with their mode
    result = node.apply()
    assert sorted(result.written) == sorted(OUR_FILES)
    for path in OUR_FILES:
        assert oct(node.path(path).stat().st_mode & 0o777) == "0o644", path
    for made in ("/etc/clusterctl", "/etc/systemd/system/ollama.service.d"):
        assert node.path(made).is_dir()
        assert oct(node.path(made).stat().st_mode & 0o777) == "0o755", made
    assert oct(node.path("/etc/dask").stat().st_mode & 0o777) == "0o750"  # not ours: as it was


def test_apply_keeps_the_mode_of_a_file_it_replaces(node: Node) -> None:
    node.path("/etc/dask").mkdir()
    node.path(DASK_YAML_FILE).write_text(OPERATORS_YAML)
    node.path(DASK_YAML_FILE).chmod(0o640)
    node.apply()
    assert node.text(DASK_YAML_FILE) != OPERATORS_YAML
    assert oct(node.path(DASK_YAML_FILE).stat().st_mode & 0o777) == "0o640"


def test_apply_with_nothing_to_change_reports_nothing_and_writes_no_state(node: Node) -> None:
    first = node.apply()
    assert first.written
    state = sorted(p.name for p in node.path("/var/lib/clusterctl").iterdir())
    again = node.apply()
    assert (again.written, again.set_live, again.restarted, again.notes) == ((), {}, (), ())
    assert again.plan.tier == first.plan.tier
    assert sorted(p.name for p in node.path("/var/lib/clusterctl").iterdir()) == state


def test_a_dry_run_apply_names_every_change_and_touches_nothing(node: Node) -> None:
    result = node.apply(dry_run=True)
    assert sorted(result.written) == sorted(OUR_FILES)
    assert result.set_live == {"vm.swappiness": "10", "vm.vfs_cache_pressure": "50"}
    assert (result.restarted, result.notes) == ((), ())
    assert not any(node.path(p).exists() for p in OUR_FILES)
    assert not node.path("/var/lib/clusterctl").exists()
    assert node.text("/proc/sys/vm/swappiness") == "60\n"


# -- restarts ----------------------------------------------------------------------------


def test_apply_reloads_unit_files_and_restarts_only_the_running_units_it_changed(
        node: Node) -> None:
    node.systemd_runs()
    systemd = RecordingSystemd(running={OLLAMA_UNIT})
    result = node.apply(systemd=systemd)
    # the Ollama drop-in is a unit file: systemd must read it before the restart
    assert systemd.asked == ["daemon-reload", f"restart-if-active {DASK_UNIT}",
                             f"restart-if-active {OLLAMA_UNIT}"]
    assert (result.restarted, result.notes) == ((OLLAMA_UNIT,), ())


def test_a_change_outside_systemds_unit_files_restarts_without_a_reload(node: Node) -> None:
    node.apply()
    node.path(DASK_ENV_FILE).write_text("# edited\n")  # drifted: only this file is rewritten
    node.systemd_runs()
    systemd = RecordingSystemd(running={DASK_UNIT, OLLAMA_UNIT})
    result = node.apply(systemd=systemd)
    assert result.written == (DASK_ENV_FILE,)
    assert systemd.asked == [f"restart-if-active {DASK_UNIT}"]
    assert result.restarted == (DASK_UNIT,)


def test_a_sysctl_only_change_restarts_nothing(node: Node) -> None:
    node.apply()
    node.path("/proc/sys/vm/swappiness").write_text("60\n")
    node.systemd_runs()
    systemd = RecordingSystemd(running={DASK_UNIT, OLLAMA_UNIT})
    result = node.apply(systemd=systemd)
    assert (result.written, result.set_live) == ((), {"vm.swappiness": "10"})
    assert systemd.asked == [] and result.restarted == ()


def test_without_systemd_apply_says_which_units_to_restart(node: Node) -> None:
    result = node.apply(systemd=RecordingSystemd(running={OLLAMA_UNIT}))
    assert result.restarted == ()
    assert result.notes == tuple(f"systemd is not running here: restart {unit} yourself to "
                                 "use the new settings" for unit in (DASK_UNIT, OLLAMA_UNIT))


def test_revert_reloads_and_restarts_the_units_whose_files_it_put_back(node: Node) -> None:
    node.apply()
    node.systemd_runs()
    systemd = RecordingSystemd(running={DASK_UNIT})
    result = node.revert(systemd=systemd)
    assert systemd.asked == ["daemon-reload", f"restart-if-active {DASK_UNIT}",
                             f"restart-if-active {OLLAMA_UNIT}"]
    assert (result.restarted, result.notes) == ((DASK_UNIT,), ())


# -- revert ------------------------------------------------------------------------------


def applied_over_an_operators_yaml(node: Node) -> None:
    node.path("/etc/dask").mkdir()
    node.path(DASK_YAML_FILE).write_text(OPERATORS_YAML)
    node.apply()


def test_a_dry_run_revert_names_what_it_would_restore_and_remove_and_touches_nothing(
        node: Node) -> None:
    applied_over_an_operators_yaml(node)
    node.path(DASK_ENV_FILE).unlink()  # already gone: nothing to remove there
    before = {p: node.text(p) for p in OUR_FILES if node.path(p).exists()}
    result = node.revert(dry_run=True)
    assert result.restored_sysctl == {"vm.swappiness": "60", "vm.vfs_cache_pressure": "100"}
    assert result.restored_files == (DASK_YAML_FILE,)
    assert sorted(result.removed_files) == sorted([SYSCTL_FILE, OLLAMA_DROPIN])
    assert (result.restarted, result.notes) == ((), ())
    assert {p: node.text(p) for p in OUR_FILES if node.path(p).exists()} == before
    assert node.text("/proc/sys/vm/swappiness") == "10\n"
    assert node.revert().restored_files == (DASK_YAML_FILE,)  # the real one still can


def test_revert_removes_only_the_files_apply_created_and_says_which(node: Node) -> None:
    applied_over_an_operators_yaml(node)
    node.path(DASK_ENV_FILE).unlink()  # the operator removed it already
    result = node.revert()
    assert sorted(result.removed_files) == sorted([SYSCTL_FILE, OLLAMA_DROPIN])
    assert result.restored_files == (DASK_YAML_FILE,)
    assert node.text(DASK_YAML_FILE) == OPERATORS_YAML
    assert not any(node.path(p).exists() for p in (SYSCTL_FILE, OLLAMA_DROPIN, DASK_ENV_FILE))
    assert node.path("/etc/dask").is_dir()
    assert not node.path("/etc/clusterctl").exists()  # made by apply, empty again
    assert node.text("/etc/sysctl.d/10-console-messages.conf") == "kernel.printk = 4 4 1 7\n"


def test_revert_leaves_a_directory_apply_made_when_someone_else_put_files_in_it(
        node: Node) -> None:
    node.apply()
    node.path("/etc/clusterctl/clusterctl.toml").write_text("[swap]\n")
    node.revert()
    assert not node.path(DASK_ENV_FILE).exists()
    assert node.text("/etc/clusterctl/clusterctl.toml") == "[swap]\n"
    assert not node.path("/etc/systemd/system/ollama.service.d").exists()


def test_revert_after_the_directory_of_a_created_file_is_gone_still_reverts_the_rest(
        node: Node) -> None:
    node.apply()
    node.path(OLLAMA_DROPIN).unlink()
    node.path(OLLAMA_DROPIN).parent.rmdir()
    result = node.revert()
    assert OLLAMA_DROPIN not in result.removed_files
    assert result.restored_sysctl == {"vm.swappiness": "60", "vm.vfs_cache_pressure": "100"}
    assert node.text("/proc/sys/vm/swappiness") == "60\n"
    assert not node.path(SYSCTL_FILE).exists() and not node.path(DASK_ENV_FILE).exists()
    assert node.revert() == optimize.RevertResult({}, (), (), (), ())  # nothing left


def test_revert_with_nothing_applied_changes_nothing(node: Node) -> None:
    node.systemd_runs()
    systemd = RecordingSystemd(running={DASK_UNIT, OLLAMA_UNIT})
    assert node.revert(systemd=systemd) == optimize.RevertResult({}, (), (), (), ())
    assert node.revert(dry_run=True) == optimize.RevertResult({}, (), (), (), ())
    assert systemd.asked == []
    assert node.text("/proc/sys/vm/swappiness") == "60\n"


# -- verify ------------------------------------------------------------------------------


def test_verify_names_a_removed_file_and_a_changed_sysctl(node: Node) -> None:
    node.apply()
    node.path(SYSCTL_FILE).unlink()
    node.path("/proc/sys/vm/vfs_cache_pressure").write_text("70\n")
    assert set(optimize.verify(node.config, root=node.root)) == {
        optimize.Drift("vm.vfs_cache_pressure", "50", "70"),
        optimize.Drift(SYSCTL_FILE, "as written by apply", None)}


# -- the planner's numbers (README: the hardware table and the limits) -------------------

GB = 1000**3


def value(f: OptimizeFacts, key: str) -> str:
    return plan(f, cfg.Config()).setting(key).value


@pytest.mark.parametrize(("cores", "gib", "tier"), [
    (8, 16, "advanced"), (7, 64, "intermediate"), (64, 15.9, "intermediate"),
    (4, 8, "intermediate"), (3, 64, "basic"), (64, 7.9, "basic"), (1, 1, "basic")])
def test_the_tier_takes_the_cores_and_the_ram_of_its_row(cores: int, gib: float,
                                                         tier: str) -> None:
    # RAM counts as N GB from 90 % of N GiB: the figures here are of the machine's label
    assert tier_profile(cores, math.ceil(0.9 * gib * GIB)).tier == tier


def test_ram_counts_as_its_label_from_exactly_90_percent() -> None:
    line = math.ceil(0.9 * 16 * GIB)
    assert tier_profile(8, line).tier == "advanced"
    assert tier_profile(8, line - KIB).tier == "intermediate"


@pytest.mark.parametrize(("vram_mib", "parallel"), [
    ((16 * 1024 - 1,), "1"), ((16 * 1024,), "2"), ((48 * 1024 - 1,), "2"),
    ((48 * 1024,), "4"), ((80 * 1024, 16 * 1024), "2"), ((), "1")])
def test_ollama_parallel_requests_follow_the_smallest_gpus_vram(vram_mib: tuple[int, ...],
                                                                parallel: str) -> None:
    f = facts(cores=16, memtotal_kib=64 * 1024 * 1024, vram_mib=vram_mib)
    assert value(f, "OLLAMA_NUM_PARALLEL") == parallel


@pytest.mark.parametrize(("vram_mib", "ram_gib", "keep", "why"), [
    ((24 * 1024,), 8, "30m", "VRAM to spare: keep models warm"),
    ((24 * 1024 - 1,), 8, "5m", "Ollama's default"),
    ((), 15.9, "2m", "memory is tight: unload idle models sooner"),
    ((), 16, "5m", "Ollama's default")])
def test_ollama_keep_alive_follows_vram_and_tight_ram(vram_mib: tuple[int, ...], ram_gib: float,
                                                      keep: str, why: str) -> None:
    f = facts(cores=16, memtotal_kib=int(ram_gib * 1024 * 1024), vram_mib=vram_mib)
    s = plan(f, cfg.Config()).setting("OLLAMA_KEEP_ALIVE")
    assert (s.value, s.reason) == (keep, why)


def test_models_are_the_rows_count_per_gpu_cut_to_what_fits() -> None:
    # advanced row: 3 per GPU; 3G models (the default size); two 24G GPUs hold 8 each
    two = facts(cores=16, memtotal_kib=64 * 1024 * 1024, vram_mib=(24 * 1024, 24 * 1024))
    s = plan(two, cfg.Config()).setting("OLLAMA_MAX_LOADED_MODELS")
    assert (s.value, s.floor) == ("6", "6")
    assert s.reason == "advanced tier floor 3 per GPU x 2; 16 of 3G fit (2 GPU(s), 24G VRAM each)"
    # one 8G GPU holds two
    small = facts(cores=16, memtotal_kib=64 * 1024 * 1024, vram_mib=(8 * 1024,))
    s = plan(small, cfg.Config()).setting("OLLAMA_MAX_LOADED_MODELS")
    assert (s.value, s.floor) == ("2", "3")
    assert s.reason == ("advanced tier floor 3 models, lowered: only 2 of 3G fit (1 GPU(s), "
                        "8G VRAM each)")
    # without a GPU, half the RAM: 6G of 12G holds two, 2G of 4G none, and one is the least
    cpu = facts(cores=16, memtotal_kib=12 * 1024 * 1024)
    assert value(cpu, "OLLAMA_MAX_LOADED_MODELS") == "2"
    tiny = facts(cores=16, memtotal_kib=4 * 1024 * 1024)
    assert value(tiny, "OLLAMA_MAX_LOADED_MODELS") == "1"


def test_num_gpu_is_the_rows_layers_with_a_gpu_and_none_without() -> None:
    with_gpu = plan(facts(cores=6, memtotal_kib=16 * 1024 * 1024, vram_mib=(8192,)),
                    cfg.Config()).setting("num_gpu")
    assert (with_gpu.value, with_gpu.floor, with_gpu.applied_by) == ("20", "20", None)
    assert with_gpu.reason.startswith("intermediate tier floor 20 layers on the GPU")
    without = plan(facts(cores=6, memtotal_kib=16 * 1024 * 1024), cfg.Config()
                   ).setting("num_gpu")
    assert (without.value, without.floor) == ("0", "20")
    assert without.reason == ("intermediate tier floor 20 layers, lowered: no GPU, every layer "
                              "on the CPU")


@pytest.mark.parametrize(("cores", "workers", "threads"), [
    (16, "6", "2"), (8, "6", "2"), (7, "4", "2"),  # advanced needs 8 cores
    (5, "4", "2"), (4, "4", "1"), (3, "2", "1"), (2, "2", "1"), (1, "1", "1")])
def test_dask_workers_and_threads_never_exceed_the_row_or_the_cores(cores: int, workers: str,
                                                                     threads: str) -> None:
    f = facts(cores=cores, memtotal_kib=64 * 1024 * 1024, vram_mib=(24 * 1024,))
    assert (value(f, "DASK_NWORKERS"), value(f, "DASK_NTHREADS")) == (workers, threads)


def test_below_the_floor_workers_and_threads_say_lowered_and_name_the_cores() -> None:
    one = plan(facts(cores=1, memtotal_kib=64 * 1024 * 1024, vram_mib=(8192,)), cfg.Config())
    s = one.setting("DASK_NWORKERS")
    assert (s.value, s.floor) == ("1", "2")
    assert s.reason == "basic tier floor 2 workers, lowered: at most one per core (1)"
    four = plan(facts(cores=4, memtotal_kib=64 * 1024 * 1024, vram_mib=(8192,)), cfg.Config())
    t = four.setting("DASK_NTHREADS")
    assert (t.value, t.floor) == ("1", "2")
    assert t.reason == ("intermediate tier floor 2 threads per worker, lowered: 4 cores for 4 "
                        "workers")
    at_row = four.setting("DASK_NWORKERS")
    assert (at_row.value, at_row.reason) == ("4", "intermediate tier floor 4 workers")


@pytest.mark.parametrize(("ram_bytes", "limit"), [
    (10 * GB, "4GB"),        # 80 % of 10GB over 2 workers: 4GB, exactly a step
    (10 * GB - 1, "3.5GB"),  # a byte less: the step below
    (GB, "0.5GB"),           # 0.4GB each: never under 0.5GB
])
def test_the_memory_limit_is_the_ram_share_in_half_gb_steps(ram_bytes: int, limit: str) -> None:
    f = facts(cores=2, memtotal_kib=1, vram_mib=(8192,))
    f = OptimizeFacts(**{**f.__dict__, "ram_bytes": ram_bytes})
    assert value(f, "DASK_MEMORY_LIMIT") == limit


def test_a_gpu_less_node_reserves_its_models_ram_and_says_so() -> None:
    # basic row (2 cores), 24G without a GPU: its one model of 3G is held back from Dask's
    # share: 80 % of 21G over 2 workers is 9.02GB, so 9GB
    p = plan(facts(cores=2, memtotal_kib=24 * 1024 * 1024), cfg.Config())
    s = p.setting("DASK_MEMORY_LIMIT")
    assert s.value == "9GB"
    assert s.reason == ("basic tier floor 1.5GB, raised: 80% of RAM (24G less 3G for "
                        "Ollama's models) / 2 workers, in 0.5GB steps")
    with_gpu = plan(facts(cores=2, memtotal_kib=24 * 1024 * 1024, vram_mib=(8192,)),
                    cfg.Config())
    assert with_gpu.setting("DASK_MEMORY_LIMIT").value == "10GB"  # 80 % of 24G / 2


def test_the_rows_memory_limit_exactly_says_floor_with_the_share() -> None:
    # 2 workers x 1.5GB = 3GB = 80 % of 3.75GB
    f = facts(cores=2, memtotal_kib=1, vram_mib=(8192,))
    f = OptimizeFacts(**{**f.__dict__, "ram_bytes": int(3.75 * GB)})
    s = plan(f, cfg.Config()).setting("DASK_MEMORY_LIMIT")
    assert (s.value, s.floor) == ("1.5GB", "1.5GB")
    assert s.reason.startswith("basic tier floor 1.5GB = 80% of RAM (")


def test_the_ollama_drop_in_and_the_dask_env_carry_exactly_the_applied_settings() -> None:
    p = plan(facts(cores=16, memtotal_kib=64 * 1024 * 1024, vram_mib=(24 * 1024,)),
             cfg.Config())
    dropin = next(f for f in p.files if f.path == OLLAMA_DROPIN)
    assert dropin.restarts == OLLAMA_UNIT
    assert dropin.content.endswith('[Service]\nEnvironment="OLLAMA_MAX_LOADED_MODELS=3"\n'
                                   'Environment="OLLAMA_NUM_PARALLEL=2"\n'
                                   'Environment="OLLAMA_KEEP_ALIVE=30m"\n')
    env = next(f for f in p.files if f.path == DASK_ENV_FILE)
    assert env.restarts == DASK_UNIT
    assert env.content.splitlines()[1:] == [
        f"DASK_SCHEDULER_ADDRESS={cfg.Config().optimize.dask_scheduler}", "DASK_NWORKERS=6",
        "DASK_NTHREADS=2", "DASK_MEMORY_LIMIT=9GB"]


def test_values_already_in_effect_are_read_back_from_the_files(node: Node) -> None:
    node.apply()
    _, p = optimize.plan_now(node.config, root=node.root)
    changing = [s.key for s in p.settings if s.changes]
    assert changing == []
    assert p.setting("DASK_NWORKERS").current == p.setting("DASK_NWORKERS").value
    assert p.setting("distributed.worker.memory.target").current == \
        p.setting("distributed.worker.memory.target").value
