"""One record of saved originals: ``originals.json``, one section per owner.

optimize (the sysctls and files `optimize apply` changed) and the GPU power limits the
agent lowered keep their originals in one file, each owner in its own section, written
under one lock so that two processes writing different sections lose neither. The files
each kept before (``optimize.json``, ``gpu-power.json``) move in on first load; a move
cut short is finished when both copies agree and refused, naming both, when they differ.
"""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from clusterctl import config as cfg
from clusterctl.errors import ClusterctlError
from clusterctl.gpu import power
from clusterctl.gpu.monitor import GpuMonitor
from clusterctl.gpu.throttle import Throttled
from clusterctl.host.nvml import Nvml
from clusterctl.optimize import state as optimize_state
from tests.conftest import H100, load_fake_nvml

NOW = 1_800_000_000.0
OPTIMIZE_OLD = {"version": 1,
                "originals": {"sysctl": {"vm.swappiness": "60"},
                              "files": {"/etc/sysctl.d/90-clusterctl.conf": None},
                              "dirs": ["/etc/dask"]},
                "applied": {"sysctl": {"vm.swappiness": "10"},
                            "files": {"/etc/sysctl.d/90-clusterctl.conf": "ab12"}}}
OPTIMIZE_STATE = optimize_state.OptimizeState(
    original_sysctl={"vm.swappiness": "60"},
    original_files={"/etc/sysctl.d/90-clusterctl.conf": None}, created_dirs=("/etc/dask",),
    applied_sysctl={"vm.swappiness": "10"},
    applied_files={"/etc/sysctl.d/90-clusterctl.conf": "ab12"})
POWER_OLD = {"version": 1, "gpus": {"GPU-0": {"uuid": "GPU-0", "original_limit_w": 700.0,
                                              "limit_w": 630.0, "changed_at": NOW,
                                              "cool_since": None}}}
POWER_RECORDS = {"GPU-0": Throttled("GPU-0", 700.0, 630.0, NOW)}


@dataclass(frozen=True)
class Old:
    name: str  # the file the owner kept before
    content: dict[str, Any]  # as the owner wrote it there
    value: object  # what the owner loads from it
    load: Callable[[Path], object]


OLD = {"optimize": Old("optimize.json", OPTIMIZE_OLD, OPTIMIZE_STATE, optimize_state.load),
       "gpu-power": Old("gpu-power.json", POWER_OLD, POWER_RECORDS, power.load)}


def sections(state: Path) -> dict[str, Any] | None:
    """originals.json as stored (None: no file)."""
    path = state / "originals.json"
    return json.loads(path.read_text()) if path.exists() else None


def plant_old(state: Path, owner: str) -> Path:
    old = OLD[owner]
    state.mkdir(exist_ok=True)
    (state / old.name).write_text(json.dumps(old.content, indent=2) + "\n")
    return state / old.name


# -- the move from the old files ----------------------------------------------------------


@pytest.mark.parametrize("owners", [["optimize"], ["gpu-power"], ["optimize", "gpu-power"],
                                    ["gpu-power", "optimize"]], ids="+".join)
def test_an_old_record_moves_into_its_section_and_the_old_file_goes(
        tmp_path: Path, owners: list[str]) -> None:
    state = tmp_path / "state"
    for owner in owners:
        plant_old(state, owner)
    for done, owner in enumerate(owners, 1):
        name, content, value, load = (OLD[owner].name, OLD[owner].content, OLD[owner].value,
                                      OLD[owner].load)
        assert load(state) == value
        assert not (state / name).exists()
        stored = sections(state)
        assert stored is not None and stored["version"] == 1
        assert stored[owner] == content  # the old schema is the section's version 1
        for earlier in owners[:done - 1]:  # a later move keeps every section moved before
            assert stored[earlier] == OLD[earlier].content
        assert load(state) == value  # and reads the same from the section
    assert sorted(p.name for p in state.iterdir()) == ["originals.json", "originals.lock"]


def test_an_old_record_moves_in_beside_the_other_owners_section(tmp_path: Path) -> None:
    state = tmp_path / "state"
    power.save(state, POWER_RECORDS)  # the agent, already on originals.json
    plant_old(state, "optimize")  # an optimize.json from before
    assert optimize_state.load(state) == OPTIMIZE_STATE
    assert power.load(state) == POWER_RECORDS
    assert not (state / "optimize.json").exists()


@pytest.mark.parametrize("owner", list(OLD))
def test_a_damaged_old_record_is_refused_never_skipped(tmp_path: Path, owner: str) -> None:
    """A damaged old file holds the only copy of its originals: its owner stops, naming it,
    and nothing is written nor moved; the other owner goes on."""
    state = tmp_path / "state"
    other = "gpu-power" if owner == "optimize" else "optimize"
    plant_old(state, other)
    OLD[other].load(state)  # the other owner's record is in originals.json already
    name, load = OLD[owner].name, OLD[owner].load
    (state / name).write_bytes(b'{"gpus": {"GPU-0": ')
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    with pytest.raises(ClusterctlError) as refused:
        load(state)
    assert str(state / name) in refused.value.message
    assert name in (refused.value.fix or "")
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before
    assert OLD[other].load(state) == OLD[other].value


# -- a move cut short between its write and the removal of the old file -------------------


@pytest.mark.parametrize("owner", list(OLD))
def test_a_move_cut_short_with_both_copies_equal_finishes(tmp_path: Path, owner: str) -> None:
    state = tmp_path / "state"
    name, content, value, load = (OLD[owner].name, OLD[owner].content, OLD[owner].value,
                                  OLD[owner].load)
    plant_old(state, owner)
    (state / "originals.json").write_text(json.dumps({"version": 1, owner: content}))
    assert load(state) == value
    assert not (state / name).exists()
    assert sections(state) == {"version": 1, owner: content}


@pytest.mark.parametrize("owner", list(OLD))
def test_a_move_cut_short_with_copies_that_differ_is_refused_naming_both(
        tmp_path: Path, owner: str) -> None:
    """Killed between the write and the removal, then one copy changed by hand: clusterctl
    cannot tell which holds the values to put back, and says both files."""
    state = tmp_path / "state"
    name, content, load = OLD[owner].name, OLD[owner].content, OLD[owner].load
    plant_old(state, owner)
    section = json.loads(json.dumps(content))
    if owner == "optimize":
        section["originals"]["sysctl"]["vm.swappiness"] = "30"
    else:
        section["gpus"]["GPU-0"]["original_limit_w"] = 650.0
    (state / "originals.json").write_text(json.dumps({"version": 1, owner: section}))
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    attempts: list[Callable[[], object]] = [lambda: load(state), lambda: _save(owner, state)]
    for attempt in attempts:
        with pytest.raises(ClusterctlError) as refused:
            attempt()
        said = refused.value.message + " " + (refused.value.fix or "")
        assert str(state / name) in said and str(state / "originals.json") in said
        after = {p.name: p.read_bytes() for p in state.iterdir() if p.name != "originals.lock"}
        assert after == before  # both copies kept as they were


def _save(owner: str, state: Path) -> None:
    if owner == "optimize":
        optimize_state.save(state, OPTIMIZE_STATE)
    else:
        power.save(state, POWER_RECORDS)


# -- a damaged originals.json --------------------------------------------------------------


@pytest.mark.parametrize("damage", [b'{"version": 1, "optimize": {"orig', b"[]",
                                    b'{"version": 1, "gpu-power": 42}'])
def test_a_damaged_originals_file_refuses_both_owners_with_a_fix_naming_it(
        tmp_path: Path, damage: bytes) -> None:
    state = tmp_path / "state"
    state.mkdir()
    path = state / "originals.json"
    path.write_bytes(damage)
    attempts: list[Callable[[], object]] = [
        lambda: optimize_state.load(state), lambda: power.load(state),
        lambda: optimize_state.save(state, OPTIMIZE_STATE),
        lambda: power.save(state, POWER_RECORDS), lambda: optimize_state.forget(state),
        lambda: power.save(state, {})]
    for attempt in attempts:
        with pytest.raises(ClusterctlError) as refused:
            attempt()
        assert str(path) in refused.value.message
        assert "originals.json" in (refused.value.fix or "")
    assert path.read_bytes() == damage
    assert not list(state.glob("originals.json.corrupt-*"))


def test_a_damaged_section_refuses_its_owner_and_leaves_the_other_owner_working(
        tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    bad = {"originals": {"sysctl": ["not", "a", "map"]}}
    (state / "originals.json").write_text(json.dumps({"version": 1, "optimize": bad}))
    with pytest.raises(ClusterctlError) as refused:
        optimize_state.load(state)
    assert "'optimize' section" in (refused.value.fix or "")
    power.save(state, POWER_RECORDS)
    assert power.load(state) == POWER_RECORDS
    assert sections(state) == {"version": 1, "optimize": bad, "gpu-power": POWER_OLD}


# -- two writers at once -------------------------------------------------------------------

ROUNDS = 60


def _writer(owner: str, state: str, barrier: Barrier) -> None:
    """One owner, in its own process: load, add one original, save, ROUNDS times."""
    where = Path(state)
    barrier.wait(30)
    for n in range(ROUNDS):
        if owner == "optimize":
            saved = optimize_state.load(where)
            optimize_state.save(where, saved.remembering({f"key.{n}": str(n)}, {}, ()))
        else:
            records = power.load(where)
            records[f"GPU-{n}"] = Throttled(f"GPU-{n}", 700.0, 630.0, NOW + n)
            power.save(where, records)


def test_two_processes_writing_different_sections_at_once_lose_neither(tmp_path: Path) -> None:
    """The agent's throttle loop and `optimize apply` write at the same time, in different
    processes: every original either one saved is on disk at the end."""
    state = tmp_path / "state"
    state.mkdir()
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(2)
    writers = [spawn.Process(target=_writer, args=(owner, str(state), barrier))
               for owner in ("optimize", "gpu-power")]
    for process in writers:
        process.start()
    for process in writers:
        process.join(60)
        assert process.exitcode == 0
    assert optimize_state.load(state).original_sysctl == {
        f"key.{n}": str(n) for n in range(ROUNDS)}
    assert sorted(power.load(state)) == sorted(f"GPU-{n}" for n in range(ROUNDS))


# -- what was saved before the move is still given back -----------------------------------


def test_power_limits_saved_in_the_old_file_are_given_back_at_the_next_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run before the move lowered GPU 0 and died: the start of the new agent reads the
    old file, gives the limit back, and leaves nothing on record."""
    nv: ModuleType = load_fake_nvml(monkeypatch)
    nv.configure({"gpus": [{**H100, "uuid": "GPU-0"}]})
    gpu = nv.machine.gpus[0]
    gpu.power_limit_mw = 630_000
    state = tmp_path / "state"
    plant_old(state, "gpu-power")
    config = cfg.Config(paths=cfg.PathsConfig(state_dir=state, run_dir=tmp_path / "run"))
    monitor = GpuMonitor(config, Nvml(module=nv))
    monitor.start()
    try:
        assert gpu.power_limit_mw == 700_000
        assert gpu.set_limit_calls == [700_000]
        assert not (state / "gpu-power.json").exists()
        assert not (state / "originals.json").exists()  # nothing left to give back
    finally:
        monitor.stop()


@pytest.mark.parametrize("owner", list(OLD))
def test_a_damaged_section_is_never_written_over_nor_removed_by_its_owner(
        tmp_path: Path, owner: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    path = state / "originals.json"
    path.write_text(json.dumps({"version": 1, owner: {"gpus": 42, "originals": 42}}))
    before = path.read_bytes()
    attempts: list[Callable[[], object]] = (
        [lambda: optimize_state.save(state, OPTIMIZE_STATE),
         lambda: optimize_state.forget(state)] if owner == "optimize" else
        [lambda: power.save(state, POWER_RECORDS), lambda: power.save(state, {})])
    for attempt in attempts:
        with pytest.raises(ClusterctlError) as refused:
            attempt()
        assert f"'{owner}' section" in (refused.value.fix or "")
    assert path.read_bytes() == before
