"""The GPU throttle, power records, placement and the monitor's views at their edges
(in-process, on the fake NVML): each test asserts what an operator sees (the limit on the
GPU, the records on disk, the decision's move and watts, the GPU chosen, the refusal), and
together they kill the mutants of ``scripts/mutate gpu`` that change such an outcome."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from clusterctl import config as cfg
from clusterctl import locks
from clusterctl.config import GpuConfig
from clusterctl.errors import TemporaryError, UsageError
from clusterctl.gpu import placement, power
from clusterctl.gpu.history import Point
from clusterctl.gpu.monitor import GpuMonitor, load_history, view_now
from clusterctl.gpu.placement import Allocation, NoFit
from clusterctl.gpu.states import GpuState
from clusterctl.gpu.throttle import Decision, Throttled, decide, floor_w
from clusterctl.host.nvml import GpuSample, GpuSnapshot, Nvml
from tests.conftest import H100, load_fake_nvml
from tests.test_gpu_monitor import Clock, config, events, saved_limits

CFG = GpuConfig(throttle_enabled=True)  # 85/90 C, steps of 10 %, floor 50 %, 15 s, 60 s
T, C, N = GpuState.THROTTLED, GpuState.CRITICAL, GpuState.NORMAL
T0 = 1_700_000_000.0
U = "GPU-two"
GPU = GpuSample(2, "NVIDIA H100 80GB HBM3", U, "00000000:1B:00.0", lost=False, error=None,
                temperature_c=60, power_limit_w=700.0, power_default_limit_w=700.0,
                power_min_limit_w=200.0, power_max_limit_w=700.0, memory_total_mib=81559,
                memory_used_mib=1000)


def at(temp: int, limit: float) -> GpuSample:
    return replace(GPU, temperature_c=temp, power_limit_w=limit)


def outcome(d: Decision) -> tuple[object, ...]:
    """What the operator sees of a decision: which GPU, the move, the watts, the record."""
    return d.uuid, d.index, d.move, d.limit_w, d.record


# -- the throttle ------------------------------------------------------------------------


def test_the_throttle_starts_at_exactly_temp_throttle_and_the_floor_at_exactly_temp_critical(
        ) -> None:
    d = decide(at(85, 700), T, None, CFG, T0)
    assert outcome(d) == (U, 2, "lower", 630.0, Throttled(U, 700.0, 630.0, T0))
    assert "85 C" in d.reason
    cool = decide(at(84, 700), T, None, CFG, T0)
    assert outcome(cool) == (U, 2, "hold", None, None) and cool.reason
    d = decide(at(90, 700), C, None, CFG, T0)
    assert outcome(d) == (U, 2, "floor", 350.0, Throttled(U, 700.0, 350.0, T0))
    assert "90 C" in d.reason
    # still CRITICAL by hysteresis but below temp_critical: one step, not the floor
    assert outcome(decide(at(89, 700), C, None, CFG, T0))[2:4] == ("lower", 630.0)


def test_within_half_a_watt_of_the_floor_counts_as_at_the_floor() -> None:
    rec = Throttled(U, 700.0, 560.0, T0 - 100)
    for limit in (350.0, 350.5):
        held = decide(at(95, limit), C, rec, CFG, T0)
        assert outcome(held) == (U, 2, "hold", None, rec) and "95 C" in held.reason
        held = decide(at(86, limit), T, rec, CFG, T0)
        assert outcome(held) == (U, 2, "hold", None, rec) and "86 C" in held.reason
    assert outcome(decide(at(95, 351), C, rec, CFG, T0)) == (
        U, 2, "floor", 350.0, Throttled(U, 700.0, 350.0, T0))
    assert outcome(decide(at(86, 351), T, rec, CFG, T0)) == (
        U, 2, "lower", 350.0, Throttled(U, 700.0, 350.0, T0))


def test_hot_steps_wait_the_step_interval_from_the_last_change() -> None:
    rec = Throttled(U, 700.0, 630.0, T0)
    held = decide(at(86, 630), T, rec, CFG, T0 + 14.9)
    assert outcome(held) == (U, 2, "hold", None, rec)
    assert "86 C" in held.reason and "15 s" in held.reason
    assert outcome(decide(at(86, 630), T, rec, CFG, T0 + 15)) == (
        U, 2, "lower", 560.0, Throttled(U, 700.0, 560.0, T0 + 15))


def test_a_hot_spell_while_cooling_starts_the_cool_down_again() -> None:
    rec = Throttled(U, 700.0, 560.0, T0)
    cooling = decide(at(70, 560), T, rec, CFG, T0 + 5).record
    assert cooling == Throttled(U, 700.0, 560.0, T0, T0 + 5)
    hot = decide(at(86, 560), T, cooling, CFG, T0 + 10)  # within the step interval
    assert outcome(hot) == (U, 2, "hold", None, Throttled(U, 700.0, 560.0, T0))
    cooling = decide(at(70, 560), T, hot.record, CFG, T0 + 12).record
    assert cooling == Throttled(U, 700.0, 560.0, T0, T0 + 12)
    waiting = decide(at(70, 560), T, cooling, CFG, T0 + 65)  # 60 s after the first cool
    assert outcome(waiting) == (U, 2, "hold", None, cooling)
    assert "70 C" in waiting.reason and "60 s" in waiting.reason
    up = decide(at(70, 560), T, cooling, CFG, T0 + 72)
    assert outcome(up) == (U, 2, "raise", 630.0, Throttled(U, 700.0, 630.0, T0 + 72, T0 + 72))
    assert "60 s" in up.reason


def test_the_way_back_restores_the_original_within_half_a_watt_else_steps_up() -> None:
    rec = Throttled(U, 700.0, 629.5, T0, T0)
    back = decide(at(60, 629.5), N, rec, CFG, T0 + 60)
    assert outcome(back) == (U, 2, "restore", 700.0, None) and "700 W" in back.reason
    rec = Throttled(U, 700.0, 629.0, T0, T0)
    assert outcome(decide(at(60, 629), N, rec, CFG, T0 + 60)) == (
        U, 2, "raise", 699.0, Throttled(U, 700.0, 699.0, T0 + 60, T0 + 60))


def test_steps_and_floor_are_shares_of_the_default_limit_not_the_maximum() -> None:
    small = replace(GPU, temperature_c=86, power_limit_w=300.0, power_default_limit_w=300.0,
                    power_max_limit_w=700.0, power_min_limit_w=100.0)
    assert floor_w(small, CFG) == 150.0
    assert outcome(decide(small, T, None, CFG, T0)) == (
        U, 2, "lower", 270.0, Throttled(U, 300.0, 270.0, T0))
    # no minimum reported: the share of the default is the floor, however small
    tiny = replace(small, power_default_limit_w=50.0, power_min_limit_w=None)
    assert floor_w(tiny, GpuConfig(throttle_floor_percent=1)) == 0.5


# -- the power records -------------------------------------------------------------------


@pytest.fixture
def two(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Two hot H100s, GPU-0 and GPU-1, at their 700 W default."""
    nv = load_fake_nvml(monkeypatch)
    nv.configure({"gpus": [{**H100, "uuid": "GPU-0", "pci_bus_id": "00000000:19:00.0"},
                           {**H100, "uuid": "GPU-1", "pci_bus_id": "00000000:1A:00.0"}]})
    for gpu in nv.machine.gpus:
        gpu.temperature = 88
    return nv


def lower_both(nv: ModuleType, nvml: Nvml, state: Path) -> dict[str, Throttled]:
    records: dict[str, Throttled] = {}
    for sample in nvml.sample().gpus:
        records = power.apply(decide(sample, T, None, CFG, T0), nvml, state, records)
    assert [g.power_limit_mw for g in nv.machine.gpus] == [630_000, 630_000]
    return records


def test_a_hold_that_starts_the_cool_down_saves_it_and_leaves_the_limit(
        two: ModuleType, tmp_path: Path) -> None:
    nvml, state = Nvml(module=two), tmp_path / "state"
    records = lower_both(two, nvml, state)
    two.machine.gpus[0].temperature = 70
    sample = nvml.sample().gpus[0]
    records = power.apply(decide(sample, T, records["GPU-0"], CFG, T0 + 5), nvml, state,
                          records)
    assert two.machine.gpus[0].set_limit_calls == [630_000]  # no limit set by a hold
    assert saved_limits(state) == {
        "GPU-0": asdict(Throttled("GPU-0", 700.0, 630.0, T0, T0 + 5)),
        "GPU-1": asdict(Throttled("GPU-1", 700.0, 630.0, T0))}
    assert records["GPU-0"].cool_since == T0 + 5


def test_giving_one_gpu_back_leaves_the_other_gpus_record_on_disk(
        two: ModuleType, tmp_path: Path) -> None:
    nvml, state = Nvml(module=two), tmp_path / "state"
    records = lower_both(two, nvml, state)
    back = Decision("GPU-0", 0, "restore", 700.0, "cool", None)
    records = power.apply(back, nvml, state, records)
    assert [g.power_limit_mw for g in two.machine.gpus] == [700_000, 630_000]
    assert saved_limits(state) == {"GPU-1": asdict(Throttled("GPU-1", 700.0, 630.0, T0))}
    assert set(records) == {"GPU-1"}


def test_restore_all_goes_on_past_a_gpu_that_is_gone_and_keeps_its_original(
        two: ModuleType, tmp_path: Path) -> None:
    nvml, state = Nvml(module=two), tmp_path / "state"
    gone = Throttled("GPU-gone", 300.0, 250.0, T0)
    power.save(state, {"GPU-gone": gone, **lower_both(two, nvml, state)})
    done = power.restore_all(nvml, state, {"GPU-0": 0, "GPU-1": 1})
    assert [g.power_limit_mw for g in two.machine.gpus] == [700_000, 700_000]
    assert saved_limits(state) == {"GPU-gone": asdict(gone)}
    assert done == ["GPU-gone: not present now; its original 300 W kept on record",
                    "GPU 0: power limit back to 700 W", "GPU 1: power limit back to 700 W"]


def test_restore_all_gives_back_the_other_gpus_when_one_refuses_its_limit(
        two: ModuleType, tmp_path: Path) -> None:
    nvml, state = Nvml(module=two), tmp_path / "state"
    records = lower_both(two, nvml, state)
    two.machine.gpus[0].errors["nvmlDeviceSetPowerManagementLimit"] = 4  # no permission
    done = power.restore_all(nvml, state, {"GPU-0": 0, "GPU-1": 1})
    assert [g.power_limit_mw for g in two.machine.gpus] == [630_000, 700_000]
    assert saved_limits(state) == {"GPU-0": asdict(records["GPU-0"])}  # still to give back
    assert done[1] == "GPU 1: power limit back to 700 W" and "GPU 0" in done[0]


# -- placement ---------------------------------------------------------------------------


def card(index: int, free: int, used: int = 1000, util: int | None = 10, **extra: Any
         ) -> GpuSample:
    return GpuSample(index, "NVIDIA H100 80GB HBM3", f"GPU-{index}", None, lost=False,
                     error=None, memory_total_mib=81559, memory_free_mib=free,
                     memory_used_mib=used, utilization_gpu_percent=util, **extra)


def snap(*gpus: GpuSample, reason: str | None = None, fix: str | None = None) -> GpuSnapshot:
    return GpuSnapshot(tuple(gpus), "550.54.15", reason, fix, T0)


def chosen(snapshot: GpuSnapshot, vram: int = 1000, allocations: list[Allocation] | None = None,
           reserve: int = 512, gpu_index: int | None = None) -> int:
    room, existing = placement.choose(snapshot, allocations or [], "m", vram, reserve,
                                      gpu_index)
    assert not existing
    return room.index


def test_the_least_busy_gpu_wins_then_the_most_room_then_the_lowest_index() -> None:
    assert chosen(snap(card(0, 40000, util=50), card(1, 20000), card(2, 30000))) == 2
    assert chosen(snap(card(1, 30000), card(0, 30000))) == 0
    # utilization not reported ranks as fully busy: against a 100 % GPU, room decides
    assert chosen(snap(card(0, 70000, util=None), card(1, 20000, util=100))) == 0
    assert chosen(snap(card(0, 70000, util=None), card(1, 20000, util=99))) == 1


def test_a_gpu_fits_with_exactly_the_room_asked_after_the_reserve() -> None:
    small, big = card(0, 5000), card(1, 10000)
    assert chosen(snap(small, big), vram=9488) == 1
    with pytest.raises(NoFit) as refused:
        chosen(snap(small, big), vram=9489)
    assert refused.value.message == (
        "no GPU has 9489 MiB for m: GPU 1 has 9488 MiB to give (free 10000 - 0 handed out, "
        "not yet in use - 512 kept back)")
    assert refused.value.fix == ("release an allocation (clusterctl gpu allocations), "
                                 "or ask for less")
    with pytest.raises(NoFit) as refused:
        chosen(snap(card(0, 300)))
    assert "GPU 0 has 0 MiB to give (free 300 - 0" in refused.value.message


@pytest.mark.parametrize("unusable", [
    {"memory_used_mib": None}, {"memory_free_mib": None}, {"uuid": None}, {"lost": True}],
    ids=["no-used-figure", "no-free-figure", "no-uuid", "lost"])
def test_a_gpu_without_memory_figures_a_uuid_or_lost_is_never_chosen(
        unusable: dict[str, Any]) -> None:
    bad = replace(card(0, 70000), **unusable)
    assert chosen(snap(bad, card(1, 20000))) == 1
    with pytest.raises(NoFit) as refused:
        chosen(snap(bad))
    assert refused.value.message == ("no usable GPU for m: every candidate is lost or "
                                     "reports no memory")
    assert refused.value.fix == "clusterctl gpu status"


def test_handed_out_vram_counts_until_nvml_sees_it_used() -> None:
    loading = [Allocation("a", "GPU-0", 0, 10000, T0, 1000)]
    room, _ = placement.choose(snap(card(0, 37000, used=4000)), loading, "m", 1000, 512)
    assert (room.pending_mib, room.available_mib) == (7000, 37000 - 7000 - 512)
    room, _ = placement.choose(snap(card(0, 27000, used=14000)), loading, "m", 1000, 512)
    assert (room.pending_mib, room.available_mib) == (0, 27000 - 512)


def test_a_gpu_index_limits_the_choice_to_that_gpu() -> None:
    two = snap(card(0, 70000), card(1, 20000))
    assert chosen(two, gpu_index=1) == 1
    with pytest.raises(UsageError) as refused:
        chosen(two, gpu_index=5)
    assert refused.value.message == "--gpu 5: this node has GPUs 0-1"
    with pytest.raises(NoFit) as none:
        chosen(snap(reason="NVML: no driver", fix="install the driver"))
    assert (none.value.message, none.value.fix) == ("no GPU to place m on: NVML: no driver",
                                                    "install the driver")


def test_place_records_the_allocation_on_the_gpu_asked_for(tmp_path: Path) -> None:
    state, run = tmp_path / "state", tmp_path / "run"
    gpus = snap(card(0, 70000, used=2000), card(1, 30000, used=3000))
    done = placement.place(state, run, lambda: gpus, "m", 5000, 512, gpu_index=1, now=T0)
    want = Allocation("m", "GPU-1", 1, 5000, T0, 3000)
    assert (done.allocation, done.existing, done.room.index) == (want, False, 1)
    assert done.room.available_mib == 30000 - 512
    assert placement.load(state) == [want]


def test_a_name_already_placed_gets_its_allocation_back_and_the_ledger_is_unchanged(
        tmp_path: Path) -> None:
    state, run = tmp_path / "state", tmp_path / "run"
    ledger = [Allocation("other", "GPU-0", 0, 2000, T0, 1000),
              Allocation("llama", "GPU-1", 1, 10000, T0, 1000)]
    placement.save(state, ledger)
    gpus = snap(card(0, 70000), card(1, 30000, used=1000))
    done = placement.place(state, run, lambda: gpus, "llama", 5000, 512, now=T0 + 9)
    assert (done.allocation, done.existing, done.room.index) == (ledger[1], True, 1)
    assert done.room.available_mib == 30000 - 10000 - 512
    assert placement.load(state) == ledger
    with pytest.raises(NoFit) as gone:
        placement.place(state, run, lambda: snap(card(0, 70000)), "llama", 5000, 512, now=T0)
    assert gone.value.message == ("llama is placed on GPU 1 (GPU-1), which NVML no longer "
                                  "reports")
    assert gone.value.fix == "clusterctl gpu release llama, then place it again"


def test_place_refuses_a_size_or_a_name_out_of_range(tmp_path: Path) -> None:
    state, run = tmp_path / "state", tmp_path / "run"
    gpus = snap(card(0, 70000))
    with pytest.raises(UsageError) as refused:
        placement.place(state, run, lambda: gpus, "m", 0, 512, now=T0)
    assert refused.value.message == "--vram must be a positive number of MiB, got 0"
    for name in ("", "x" * 201):
        with pytest.raises(UsageError) as refused:
            placement.place(state, run, lambda: gpus, name, 1000, 512, now=T0)
        assert refused.value.message == "a placement needs a name of 1-200 characters"
    assert placement.load(state) == []
    placement.place(state, run, lambda: gpus, "x" * 200, 1, 512, now=T0)
    assert [(a.name, a.vram_mib) for a in placement.load(state)] == [("x" * 200, 1)]


def test_a_held_placement_lock_refuses_after_the_wait_given_naming_the_placement(
        tmp_path: Path) -> None:
    state, run = tmp_path / "state", tmp_path / "run"
    placement.save(state, [Allocation("m", "GPU-0", 0, 1000, T0, 1000)])
    with locks.exclusive(run / placement.LOCK_NAME, what="a test", wait_s=0):
        for attempt in (lambda: placement.place(state, run, lambda: snap(card(0, 70000)), "n",
                                                1000, 512, now=T0, wait_s=0.2),
                        lambda: placement.release(state, run, "m", wait_s=0.2)):
            started = time.monotonic()
            with pytest.raises(TemporaryError, match="another clusterctl gpu placement"):
                attempt()
            assert time.monotonic() - started < 5
    assert placement.load(state) == [Allocation("m", "GPU-0", 0, 1000, T0, 1000)]


# -- the monitor's views and history -----------------------------------------------------


def test_view_now_shows_the_table_state_and_what_the_throttle_would_do(tmp_path: Path) -> None:
    c = config(tmp_path)
    hot = view_now(at(88, 700), c, None, T0)
    assert (hot.state, hot.throttled) == (T, False)
    assert hot.decision is not None and outcome(hot.decision) == (
        U, 2, "lower", 630.0, Throttled(U, 700.0, 630.0, T0))
    rec = Throttled(U, 700.0, 630.0, T0 - 5)
    mine = view_now(at(88, 630), c, rec, T0)
    assert mine.throttled and mine.decision is not None
    assert outcome(mine.decision) == (U, 2, "hold", None, rec)
    full = view_now(replace(GPU, temperature_c=40, memory_used_mib=78000), c, None, T0)
    assert full.state is C and full.decision is not None and full.decision.move == "hold"
    lost = view_now(replace(GPU, lost=True, temperature_c=None), c, None, T0)
    assert (lost.state, lost.decision, lost.throttled) == (C, None, False)


@pytest.fixture
def one(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    nv = load_fake_nvml(monkeypatch)
    nv.configure({"gpus": [{**H100, "uuid": "GPU-0", "memory_used": 8 * 2**30}]})
    nv.machine.gpus[0].processes = [{"pid": 4242, "name": "ollama", "used_memory": 2**30}]
    return nv


def test_the_history_file_holds_the_last_samples_and_loads_back(
        one: ModuleType, tmp_path: Path) -> None:
    gpu = one.machine.gpus[0]
    gpu.temperature, gpu.utilization_gpu = [60, 61, 62], [5, 6, 7]
    clock = Clock()
    c = config(tmp_path, history_size=2)
    monitor = GpuMonitor(c, Nvml(module=one), clock=clock, write_history=True)
    for _ in range(3):
        monitor.step()
        clock.now += 3
    mem = 100.0 * 8192 / (H100["memory_total"] // 2**20)  # type: ignore[operator]
    want = [Point(T0 + 3, 61, 6, mem), Point(T0 + 6, 62, 7, mem)]
    assert list(monitor.histories["GPU-0"].points()) == want
    history_file = tmp_path / "run/gpu-history.json"
    assert history_file.stat().st_mode & 0o777 == 0o644  # what nvidia-smi shows anyone
    loaded = load_history(tmp_path / "run", 200)
    assert list(loaded) == ["GPU-0"] and list(loaded["GPU-0"].points()) == want
    assert list(load_history(tmp_path / "run", 1)["GPU-0"].points()) == want[1:]
    assert load_history(tmp_path / "elsewhere", 200) == {}


def test_a_monitor_writes_no_history_unless_asked_and_an_unwritable_one_never_stops_it(
        one: ModuleType, tmp_path: Path) -> None:
    GpuMonitor(config(tmp_path), Nvml(module=one), clock=Clock()).step()
    assert not (tmp_path / "run/gpu-history.json").exists()
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the run dir should be\n")
    c = cfg.with_changes(config(tmp_path), "paths", {"run_dir": str(blocked)})
    monitor = GpuMonitor(c, Nvml(module=one), clock=Clock(), write_history=True)
    assert monitor.step()[0].sample.temperature_c == 40
    assert monitor.step()


def test_a_damaged_history_file_is_set_aside_and_forgotten(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "gpu-history.json").write_text('{"GPU-0": [[1, 2]]}\n')
    seen: list[str] = []

    def record(event_type: str, reason: str, details: dict[str, Any], *, now: float
               ) -> object:
        seen.append(event_type)
        return None

    assert load_history(run, 200, record=record) == {}
    assert not (run / "gpu-history.json").exists() and seen


def test_processes_are_read_every_tenth_sample_at_the_monitors_clock(
        one: ModuleType, tmp_path: Path) -> None:
    clock = Clock()
    monitor = GpuMonitor(config(tmp_path), Nvml(module=one), clock=clock)
    read = []
    for _ in range(11):
        monitor.step()
        assert monitor.snapshot is not None and monitor.snapshot.sampled_at == clock.now
        read.append(monitor.snapshot.gpus[0].processes is not None)
        clock.now += 1
    assert read == [True] + [False] * 9 + [True]


def test_power_and_state_events_say_what_happened_to_which_gpu(
        one: ModuleType, tmp_path: Path) -> None:
    one.machine.gpus[0].temperature = [60, 88]
    c = cfg.with_changes(config(tmp_path, throttle_enabled=True), "heartbeat",
                         {"instance_id": "vast_777"})
    monitor = GpuMonitor(c, Nvml(module=one), clock=Clock())
    monitor.step()
    monitor.step()
    mem = 100.0 * 8192 / (H100["memory_total"] // 2**20)  # type: ignore[operator]
    seen = {e["event_type"]: e for e in events(tmp_path)}
    assert [e["move"] for e in events(tmp_path)
            if e["event_type"] == "gpu_power_limited"] == ["lower"]  # none for a hold
    limited = seen["gpu_power_limited"]
    assert {k: limited[k] for k in ("instance_id", "gpu", "uuid", "temperature_c", "move",
                                    "limit_w")} == {
        "instance_id": "vast_777", "gpu": 0, "uuid": "GPU-0", "temperature_c": 88,
        "move": "lower", "limit_w": 630.0}
    assert limited["memory_used_percent"] == pytest.approx(mem)
    assert "88 C" in str(limited["reason"])
    changed = seen["gpu_state_changed"]
    assert (changed["reason"], changed["state_from"], changed["state_to"],
            changed["speed_multiplier"]) == ("optimal -> throttled", "optimal", "throttled", 0.5)
    monitor.stop()
    assert one.machine.gpus[0].power_limit_mw == 700_000


# -- the monitor: who gives what back, and what the views show ---------------------------


def test_a_viewer_sees_a_limit_the_owner_lowered_since_its_last_sample(
        one: ModuleType, tmp_path: Path) -> None:
    one.machine.gpus[0].temperature = 88
    c = config(tmp_path, throttle_enabled=True)
    viewer = GpuMonitor(c, Nvml(module=one), plan_only=True, clock=Clock())
    assert viewer.views == ()  # nothing sampled yet
    assert not viewer.step()[0].throttled
    GpuMonitor(c, Nvml(module=one), clock=Clock()).step()  # the agent lowers it
    assert one.machine.gpus[0].power_limit_mw == 630_000
    assert viewer.step()[0].throttled


def test_a_monitor_that_does_not_own_the_records_gives_back_its_own_past_one_it_must_leave(
        two: ModuleType, tmp_path: Path) -> None:
    state = tmp_path / "state"
    actor = GpuMonitor(config(tmp_path, throttle_enabled=True), Nvml(module=two),
                       owns_power_records=False, clock=Clock())
    actor.step()
    assert [g.power_limit_mw for g in two.machine.gpus] == [630_000, 630_000]
    theirs = Throttled("GPU-0", 700.0, 560.0, T0 + 1)  # another writer took GPU-0 over
    power.save(state, {**power.load(state), "GPU-0": theirs})
    assert actor.restore() == [
        "GPU-0: its power record changed since this process lowered it; left to the "
        "process that changed it", "GPU 1: power limit back to 700 W"]
    assert [g.power_limit_mw for g in two.machine.gpus] == [630_000, 700_000]
    assert saved_limits(state) == {"GPU-0": asdict(theirs)}
    actor.step()  # still hot, and sampled again: GPU 1 goes down again
    assert two.machine.gpus[1].power_limit_mw == 630_000


def test_a_monitor_that_does_not_own_the_records_goes_on_past_a_gpu_refusing_its_limit(
        two: ModuleType, tmp_path: Path) -> None:
    actor = GpuMonitor(config(tmp_path, throttle_enabled=True), Nvml(module=two),
                       owns_power_records=False, clock=Clock())
    actor.step()
    two.machine.gpus[0].errors["nvmlDeviceSetPowerManagementLimit"] = 4  # no permission
    done = actor.restore()
    assert done[0].startswith("GPU 0: ") and "no permission" in done[0]
    assert done[1:] == ["GPU 1: power limit back to 700 W"]
    assert [g.power_limit_mw for g in two.machine.gpus] == [630_000, 700_000]
    assert set(saved_limits(tmp_path / "state") or {}) == {"GPU-0"}


def test_a_limit_the_monitor_already_gave_back_is_not_reported_again_at_stop(
        one: ModuleType, tmp_path: Path) -> None:
    gpu = one.machine.gpus[0]
    gpu.temperature = 88
    clock = Clock()
    actor = GpuMonitor(config(tmp_path, throttle_enabled=True), Nvml(module=one),
                       owns_power_records=False, clock=clock)
    actor.step()
    gpu.temperature = 70
    for seconds in (1, 60):  # cool from T0+1, one cool-down later: back to 700 W
        clock.now += seconds
        actor.step()
    assert gpu.power_limit_mw == 700_000 and saved_limits(tmp_path / "state") is None
    assert actor.restore() == []


def test_the_owner_throttles_again_after_giving_every_limit_back(
        one: ModuleType, tmp_path: Path) -> None:
    gpu = one.machine.gpus[0]
    gpu.temperature = 88
    owner = GpuMonitor(config(tmp_path, throttle_enabled=True), Nvml(module=one),
                       clock=Clock())
    owner.step()
    assert owner.restore() == ["GPU 0: power limit back to 700 W"]
    assert gpu.power_limit_mw == 700_000
    owner.step()
    assert gpu.power_limit_mw == 630_000


def test_a_lost_gpu_and_a_gpu_with_full_vram_read_critical(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    nv = load_fake_nvml(monkeypatch)
    total = H100["memory_total"]
    assert isinstance(total, int)
    nv.configure({"gpus": [{**H100, "uuid": "GPU-0", "lost": True},
                           {**H100, "uuid": "GPU-1", "pci_bus_id": "00000000:1A:00.0",
                            "memory_used": int(total * 0.96)}]})
    lost, full = GpuMonitor(config(tmp_path), Nvml(module=nv), clock=Clock()).step()
    assert (lost.state, lost.decision) == (C, None)
    assert full.state is C and full.sample.temperature_c == 40


def test_view_now_drops_a_critical_gpu_to_the_floor(tmp_path: Path) -> None:
    sample = at(92, 700)
    view = view_now(sample, config(tmp_path), None, T0)
    assert view.sample == sample and view.state is C and view.decision is not None
    assert outcome(view.decision) == (U, 2, "floor", 350.0, Throttled(U, 700.0, 350.0, T0))


def test_a_new_history_size_keeps_the_latest_samples(one: ModuleType, tmp_path: Path) -> None:
    one.machine.gpus[0].temperature = [60, 61, 62, 63]
    clock = Clock()
    monitor = GpuMonitor(config(tmp_path), Nvml(module=one), clock=clock)
    for _ in range(3):
        monitor.step()
        clock.now += 1
    monitor.with_config(config(tmp_path, history_size=2))
    assert monitor.config.gpu.history_size == 2
    assert [p.temperature_c for p in monitor.histories["GPU-0"].points()] == [61, 62]
    monitor.step()
    assert [p.temperature_c for p in monitor.histories["GPU-0"].points()] == [62, 63]


def test_an_unwritable_event_log_never_stops_sampling(one: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "state/events.jsonl").mkdir(parents=True)  # not a file: every record fails
    one.machine.gpus[0].temperature = [60, 88]
    monitor = GpuMonitor(config(tmp_path), Nvml(module=one), clock=Clock())
    assert [monitor.step()[0].state for _ in range(2)] == [GpuState.OPTIMAL, T]
