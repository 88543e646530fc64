"""The rest of dcgm-exporter's default set, GPM, and what idle GPUs cost (issue 18).

The fields through the fake NVML at the NVML boundary: each read in its unit, None where
the GPU lacks it and then never asked again (the fake counts the calls), counters read
every 30 s rather than every sample, GPM fractions from two samples, graphics and compute
processes in one list. The energy accounting over scripted runs (the counter, the power
integral, a counter that restarts), and where an operator sees it: /metrics, the
heartbeat, `clusterctl hibernate status` and the control plane's statistics.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from clusterctl.agent.service import Agent
from clusterctl.gpu import energy, energy_store
from clusterctl.host.nvml import COUNTERS_EVERY_S, GpuSample, GpuSnapshot, Nvml
from tests.conftest import H100, load_fake_nvml, quiet_host, wait_until
from tests.fleet import ADMIN, FleetServer, heartbeat
from tests.prometheus import tool
from tests.test_agent import Node, Ticker

KIB = 2**10


@pytest.fixture
def nv(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_fake_nvml(monkeypatch)


def one(nv: ModuleType, **gpu: Any) -> Nvml:
    nv.configure({"gpus": [{**H100, **gpu}]})
    return Nvml(module=nv)


# -- the fields -----------------------------------------------------------------------


def test_each_new_field_is_read_in_its_unit(nv: ModuleType) -> None:
    nvml = one(nv, energy_mj=123_456_789, encoder_utilization=12, decoder_utilization=34,
               memory_temperature=61, pcie_replay_count=5, remapped_rows=(3, 1, 0, 1),
               nvlink_tx_kib=1000, nvlink_rx_kib=2000)
    gpu = nvml.sample().gpus[0]
    assert gpu.energy_total_mj == 123_456_789
    assert (gpu.encoder_utilization_percent, gpu.decoder_utilization_percent) == (12, 34)
    assert gpu.memory_temperature_c == 61
    assert gpu.pcie_replay_count == 5
    assert (gpu.remapped_rows_correctable, gpu.remapped_rows_uncorrectable,
            gpu.remapped_rows_pending, gpu.remap_failure) == (3, 1, False, True)
    assert (gpu.nvlink_tx_bytes, gpu.nvlink_rx_bytes) == (1000 * KIB, 2000 * KIB)
    assert gpu.nvlink_bytes_total == 3000 * KIB
    assert gpu.error is None


UNSUPPORTED = {  # FakeGpu attribute -> (GpuSample attribute, the NVML call asked)
    "energy_mj": ("energy_total_mj", "nvmlDeviceGetTotalEnergyConsumption"),
    "encoder_utilization": ("encoder_utilization_percent", "nvmlDeviceGetEncoderUtilization"),
    "decoder_utilization": ("decoder_utilization_percent", "nvmlDeviceGetDecoderUtilization"),
    "pcie_replay_count": ("pcie_replay_count", "nvmlDeviceGetPcieReplayCounter"),
    "remapped_rows": ("remapped_rows_correctable", "nvmlDeviceGetRemappedRows"),
}


@pytest.mark.parametrize("lacking", sorted(UNSUPPORTED))
def test_a_field_the_gpu_lacks_is_none_and_never_asked_again(nv: ModuleType,
                                                             lacking: str) -> None:
    attribute, function = UNSUPPORTED[lacking]
    nvml = one(nv, **{lacking: None})
    for second in range(0, 5 * int(COUNTERS_EVERY_S), 30):  # past several counter reads
        gpu = nvml.sample(now=1000 + second).gpus[0]
        assert getattr(gpu, attribute) is None
        assert gpu.error is None
    assert nv.machine.calls[function] == 1


def test_an_older_driver_without_a_call_is_asked_once(nv: ModuleType) -> None:
    nv.configure({"gpus": [H100], "missing_functions": ["nvmlDeviceGetTotalEnergyConsumption",
                                                        "nvmlDeviceGetFieldValues"]})
    nvml = Nvml(module=nv)
    for _ in range(4):
        gpu = nvml.sample().gpus[0]
        assert gpu.energy_total_mj is None and gpu.memory_temperature_c is None
        assert gpu.error is None
    assert nv.machine.calls["nvmlDeviceGetTotalEnergyConsumption"] == 1
    assert nv.machine.calls["nvmlDeviceGetFieldValues"] == 2  # temperature; NVLink


def test_field_values_the_gpu_lacks_are_left_out_of_the_next_calls(nv: ModuleType) -> None:
    """Without NVLink (a PCIe card) and without a memory sensor, nvmlDeviceGetFieldValues
    answers each field NOT_SUPPORTED: each is asked once, then the call is not made."""
    nvml = one(nv, memory_temperature=None)  # nvlink_* are None in the fake by default
    for second in range(0, 100, 10):
        gpu = nvml.sample(now=1000 + second).gpus[0]
        assert gpu.memory_temperature_c is None and gpu.nvlink_tx_bytes is None
        assert gpu.nvlink_bytes_total is None
    assert nv.machine.calls["nvmlDeviceGetFieldValues"] == 2


def test_counters_are_read_every_30_s_and_their_last_value_kept_between(
        nv: ModuleType) -> None:
    nvml = one(nv, pcie_replay_count=[2, 9], remapped_rows=[(1, 0, 0, 0), (4, 0, 0, 0)],
               nvlink_tx_kib=[10, 50], nvlink_rx_kib=[20, 60], energy_mj=[100, 200, 300],
               encoder_utilization=[5, 6, 7])
    seen = [nvml.sample(now=1000.0 + s).gpus[0] for s in (0, 5, 10, 29)]
    assert {g.pcie_replay_count for g in seen} == {2}
    assert {g.remapped_rows_correctable for g in seen} == {1}
    assert {g.nvlink_tx_bytes for g in seen} == {10 * KIB}
    assert [g.energy_total_mj for g in seen] == [100, 200, 300, 300]  # every sample
    assert [g.encoder_utilization_percent for g in seen] == [5, 6, 7, 7]
    calls = nv.machine.calls
    assert calls["nvmlDeviceGetPcieReplayCounter"] == calls["nvmlDeviceGetRemappedRows"] == 1
    assert calls["nvmlDeviceGetTotalEnergyConsumption"] == 4
    later = nvml.sample(now=1000.0 + COUNTERS_EVERY_S).gpus[0]
    assert (later.pcie_replay_count, later.remapped_rows_correctable) == (9, 4)
    assert (later.nvlink_tx_bytes, later.nvlink_rx_bytes) == (50 * KIB, 60 * KIB)
    assert calls["nvmlDeviceGetPcieReplayCounter"] == 2


def test_a_counter_read_that_failed_is_tried_again_at_the_next_sample(
        nv: ModuleType) -> None:
    nvml = one(nv, pcie_replay_count=3, errors={"nvmlDeviceGetPcieReplayCounter": 10})
    first = nvml.sample(now=1000).gpus[0]
    assert first.pcie_replay_count is None
    assert first.error is not None and "nvmlDeviceGetPcieReplayCounter" in first.error
    nv.machine.gpus[0].errors.clear()
    assert nvml.sample(now=1001).gpus[0].pcie_replay_count == 3  # not 30 s later


def test_graphics_and_compute_processes_are_one_list_one_entry_per_pid(
        nv: ModuleType) -> None:
    nvml = one(nv, processes=[{"pid": 10, "name": "python3", "used_memory": 2**30},
                              {"pid": 11, "name": "blender", "used_memory": 2**29}],
               graphics_processes=[{"pid": 11, "name": "blender", "used_memory": 2**29},
                                   {"pid": 12, "name": "Xorg", "used_memory": 2**24}])
    processes = nvml.sample(processes=True).gpus[0].processes or ()
    assert [(p.pid, p.name, p.used_mib, p.kind) for p in processes] == [
        (10, "python3", 1024, "compute"), (11, "blender", 512, "compute"),
        (12, "Xorg", 16, "graphics")]


def test_a_gpu_with_graphics_processes_only_lists_them(nv: ModuleType) -> None:
    nv.configure({"gpus": [{**H100, "graphics_processes": [{"pid": 12, "name": "Xorg"}]}],
                  "missing_functions": ["nvmlDeviceGetComputeRunningProcesses"]})
    processes = Nvml(module=nv).sample(processes=True).gpus[0].processes
    assert processes is not None and [(p.pid, p.kind) for p in processes] == [(12, "graphics")]


def test_a_driver_without_the_v3_process_calls_is_asked_the_v2_ones(nv: ModuleType) -> None:
    """pynvml's unversioned process calls raise NVMLLibraryMismatchError (not an
    NVMLError) on a driver without their _v3: the sample still lists the processes."""
    nv.configure({"gpus": [{**H100, "processes": [{"pid": 10, "name": "python3"}],
                            "graphics_processes": [{"pid": 12, "name": "Xorg"}]}],
                  "missing_functions": ["nvmlDeviceGetComputeRunningProcesses_v3",
                                        "nvmlDeviceGetGraphicsRunningProcesses_v3"]})
    gpu = Nvml(module=nv).sample(processes=True).gpus[0]
    assert [(p.pid, p.kind) for p in gpu.processes or ()] == [(10, "compute"),
                                                               (12, "graphics")]
    assert gpu.error is None


# -- GPM --------------------------------------------------------------------------------

GPM = {"GRAPHICS_UTIL": [0, 40, 90], "ANY_TENSOR_UTIL": [0, 25, 50], "SM_UTIL": 30,
       "SM_OCCUPANCY": 20, "DRAM_BW_UTIL": 10}


def test_gpm_fractions_come_from_two_samples_and_its_samples_are_freed(
        nv: ModuleType) -> None:
    nvml = one(nv, gpm={k: list(v) if isinstance(v, list) else v for k, v in GPM.items()})
    first = nvml.sample().gpus[0]
    assert first.gpm_graphics_activity is None  # one sample: nothing to compare yet
    second = nvml.sample().gpus[0]
    assert (second.gpm_graphics_activity, second.gpm_tensor_activity) == (0.4, 0.25)
    assert (second.gpm_sm_activity, second.gpm_sm_occupancy,
            second.gpm_dram_activity) == (0.3, 0.2, 0.1)
    third = nvml.sample().gpus[0]
    assert (third.gpm_graphics_activity, third.gpm_tensor_activity) == (0.9, 0.5)
    assert nvml.gpm_problem(0) is None
    assert nv.machine.calls["nvmlGpmQueryDeviceSupport"] == 1
    assert nv.machine.calls["nvmlGpmSampleAlloc"] == 2  # two, taken in turn
    assert nv.machine.calls["nvmlGpmSampleGet"] == 3
    assert len(nv.machine.gpm_samples) == 2
    nvml.shutdown()
    assert nv.machine.gpm_samples == {}


def test_a_gpm_metric_the_gpu_lacks_is_none_and_the_others_still_come(
        nv: ModuleType) -> None:
    nvml = one(nv, gpm={"GRAPHICS_UTIL": 50})
    nvml.sample()
    gpu = nvml.sample().gpus[0]
    assert gpu.gpm_graphics_activity == 0.5
    assert gpu.gpm_tensor_activity is None and gpu.gpm_dram_activity is None


@pytest.mark.parametrize(("scenario", "why"), [
    ({}, "this GPU has no GPM (Hopper and newer have it)"),
    ({"missing_functions": ["nvmlGpmQueryDeviceSupport"]}, "the driver has no GPM"),
])
def test_without_gpm_the_fractions_are_left_out_and_why_is_said_once(
        nv: ModuleType, caplog: pytest.LogCaptureFixture, scenario: dict[str, Any],
        why: str) -> None:
    nv.configure({"gpus": [H100], **scenario})  # the fake's GPUs have no GPM by default
    nvml = Nvml(module=nv)
    with caplog.at_level(logging.INFO, logger="clusterctl.host.nvml"):
        for _ in range(5):
            gpu = nvml.sample().gpus[0]
            assert gpu.gpm_graphics_activity is None and gpu.gpm_tensor_activity is None
    assert why in (nvml.gpm_problem(0) or "")
    assert [r.getMessage() for r in caplog.records].count(
        f"GPU 0: {nvml.gpm_problem(0)}; DCGM_FI_PROF_* are left out for it") == 1
    assert nv.machine.calls["nvmlGpmQueryDeviceSupport"] == 1
    assert nv.machine.calls["nvmlGpmSampleGet"] == 0


def test_gpm_on_a_gpu_lost_and_found_starts_again(nv: ModuleType) -> None:
    nvml = one(nv, gpm={"GRAPHICS_UTIL": 70})
    nvml.sample()
    assert nvml.sample().gpus[0].gpm_graphics_activity == 0.7
    nv.machine.gpus[0].lost = True
    assert nvml.sample().gpus[0].lost
    assert nv.machine.gpm_samples == {}  # given back with the lost GPU
    nv.machine.gpus[0].lost = False
    assert nvml.sample().gpus[0].gpm_graphics_activity is None  # a fresh first sample
    assert nvml.sample().gpus[0].gpm_graphics_activity == 0.7


# -- the fake is pynvml's shape ------------------------------------------------------------

NEW_CALLS = ("nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetEncoderUtilization",
             "nvmlDeviceGetDecoderUtilization", "nvmlDeviceGetFieldValues",
             "nvmlDeviceGetPcieReplayCounter", "nvmlDeviceGetGraphicsRunningProcesses",
             "nvmlGpmQueryDeviceSupport", "nvmlGpmSampleAlloc", "nvmlGpmSampleGet",
             "nvmlGpmMetricsGet", "nvmlGpmSampleFree")


def test_the_fakes_new_calls_take_pynvmls_arguments(nv: ModuleType) -> None:
    pynvml = pytest.importorskip("pynvml")
    for name in NEW_CALLS:
        ours = list(inspect.signature(getattr(nv, name)).parameters)
        theirs = list(inspect.signature(inspect.unwrap(getattr(pynvml, name))).parameters)
        assert ours == theirs, name
    for name in ("c_nvmlFieldValue_t", "c_nvmlGpmMetricsGet_t", "c_nvmlGpmMetric_t",
                 "c_nvmlGpmSupport_t"):
        assert [f[0] for f in getattr(nv, name)._fields_] == [
            f[0] for f in getattr(pynvml, name)._fields_], name


# -- energy: busy and idle ------------------------------------------------------------------


def sample(util: int | None, total_mj: int | None = None, power_w: float | None = 100.0,
           *, lost: bool = False) -> GpuSample:
    return GpuSample(0, "H100", "GPU-a", None, lost=lost, error=None,
                     utilization_gpu_percent=util, energy_total_mj=total_mj,
                     power_draw_w=power_w)


def snapshot(*gpus: GpuSample) -> GpuSnapshot:
    return GpuSnapshot(gpus, None, None, None, 0.0)


def never(err: BaseException) -> None:
    raise AssertionError(f"the energy accounting failed: {err}")


def run(steps: list[tuple[float, GpuSample]], threshold: float = 5.0
        ) -> energy.GpuEnergy:
    ledger = energy.EMPTY
    for at, s in steps:
        ledger = energy.account(ledger, [s], at, threshold)
    return ledger.gpus["GPU-a"]


def test_energy_from_the_counter_splits_busy_and_idle_as_hibernation_does() -> None:
    """Idle is utilization under [hibernate] gpu_usage_threshold (5 %); each interval goes
    to the state of the sample that ends it."""
    gpu = run([(0, sample(0, 1_000_000)), (10, sample(0, 1_700_000)),  # idle: 700 J
               (20, sample(80, 8_700_000)), (30, sample(5, 15_700_000)),  # busy: 7 + 7 kJ
               (40, sample(4, 16_400_000))])  # idle again: 700 J
    assert (gpu.idle_j, gpu.busy_j) == (1400.0, 14000.0)
    assert (gpu.idle_s, gpu.busy_s) == (20.0, 20.0)
    assert gpu.idle_power_w == 70.0
    assert gpu.source == "counter"


def test_a_counter_that_restarts_counts_what_it_read_since() -> None:
    gpu = run([(0, sample(0, 9_000_000)), (10, sample(0, 9_700_000)),
               (20, sample(0, 500_000)),  # the driver was reloaded: 500 J since
               (30, sample(0, 1_200_000))])
    assert gpu.idle_j == 700 + 500 + 700
    assert gpu.busy_j == 0


def test_without_the_counter_power_is_integrated_over_time() -> None:
    gpu = run([(0, sample(90, None, 300.0)), (10, sample(90, None, 500.0)),  # 4000 J busy
               (20, sample(0, None, 100.0)), (30, sample(0, None, 60.0))])  # 3000 + 800 idle
    assert (gpu.busy_j, gpu.idle_j) == (4000.0, 3800.0)
    assert gpu.source == "power_integral"
    assert gpu.idle_power_w == 190.0


def test_unread_utilization_counts_as_busy_and_a_gap_or_a_lost_gpu_counts_nothing() -> None:
    gpu = run([(0, sample(0, 0)), (10, sample(None, 1_000_000)),  # unread: busy 1 kJ
               (500, sample(0, 90_000_000)),  # 490 s unwatched: not shared out
               (510, sample(0, 91_000_000)),  # idle 1 kJ
               (520, sample(0, lost=True)),  # lost: nothing
               (530, sample(0, 99_000_000)),  # the first look after it: nothing
               (540, sample(0, 99_500_000))])  # idle 500 J
    assert (gpu.busy_j, gpu.idle_j) == (1000.0, 1500.0)


def test_a_scripted_run_through_nvml_splits_the_energy(nv: ModuleType) -> None:
    """The counter and the utilization as the fake driver gives them, over six samples."""
    nvml = one(nv, utilization_gpu=[0, 0, 90, 90, 1, 1],
               energy_mj=[0, 800_000, 5_800_000, 10_800_000, 11_600_000, 12_400_000])
    ledger = energy.EMPTY
    for second in range(0, 60, 10):
        ledger = energy.account(ledger, nvml.sample().gpus, 100.0 + second, 5.0)
    gpu = ledger.gpus[str(H100["uuid"])]
    assert (gpu.idle_j, gpu.busy_j) == (800 + 800 + 800, 5000 + 5000)
    assert gpu.idle_power_w == 80.0 and gpu.source == "counter"
    nv.configure({"gpus": [{**H100, "energy_mj": None, "power_draw_mw": [200_000, 200_000],
                            "utilization_gpu": 50}]})
    nvml = Nvml(module=nv)
    ledger = energy.EMPTY
    for second in (0, 10):
        ledger = energy.account(ledger, nvml.sample().gpus, 100.0 + second, 5.0)
    assert ledger.gpus[str(H100["uuid"])].busy_j == 2000.0
    assert ledger.gpus[str(H100["uuid"])].source == "power_integral"


def test_the_ledger_file_belongs_to_one_boot(tmp_path: Path) -> None:
    keeper = energy_store.EnergyKeeper(tmp_path, failed=never, boot_id="boot-1")
    keeper.after(snapshot(sample(0, 0)), 0.0, 5.0, 60.0)
    keeper.after(snapshot(sample(0, 3_600_000)), 10.0, 5.0, 60.0)
    again = energy_store.EnergyKeeper(tmp_path, failed=never, boot_id="boot-1")
    assert again.ledger.idle_j == 3600.0  # an agent restarted: it goes on
    again.after(snapshot(sample(0, 4_600_000)), 20.0, 5.0, 60.0)
    assert again.ledger.idle_j == 4600.0
    assert energy_store.EnergyKeeper(tmp_path, failed=never,
                                     boot_id="boot-2").ledger.gpus == {}  # a reboot
    assert energy_store.peek(tmp_path, "boot-2") is None
    (tmp_path / energy_store.ENERGY_FILE).write_text('{"version": 1, "gpus": [{"key": 1}]}')
    assert energy_store.EnergyKeeper(tmp_path, failed=never,
                                     boot_id="boot-1").ledger.gpus == {}  # damaged: afresh


# -- where an operator sees it ----------------------------------------------------------------


def metric(text: str, name: str, gpu: int, **labels: str) -> float | None:
    """The value of ``name`` for GPU ``gpu`` (and ``labels``) in an exposition text."""
    for line in text.splitlines():
        if line.startswith(name + "{") and f'gpu="{gpu}"' in line and all(
                f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_the_agent_exports_the_new_fields_under_dcgm_exporters_names(
        tmp_path: Path, nv: ModuleType) -> None:
    """Two GPUs: GPU 0 a Hopper with GPM, NVLink and the energy counter, idle then busy;
    GPU 1 without any of them (its power integrated)."""
    nv.configure({"gpus": [
        {**H100, "uuid": "GPU-0", "utilization_gpu": [0, 0, 0, 80],
         "energy_mj": [0, 1_000_000, 2_000_000, 9_000_000], "encoder_utilization": 12,
         "decoder_utilization": 3, "memory_temperature": 55, "pcie_replay_count": 4,
         "remapped_rows": (2, 0, 0, 0), "nvlink_tx_kib": 100, "nvlink_rx_kib": 50,
         "gpm": {"GRAPHICS_UTIL": 40, "ANY_TENSOR_UTIL": 25, "SM_UTIL": 30,
                 "SM_OCCUPANCY": 20, "DRAM_BW_UTIL": 10}},
        {**H100, "uuid": "GPU-1", "pci_bus_id": "00000000:1A:00.0", "energy_mj": None,
         "memory_temperature": None, "encoder_utilization": None, "decoder_utilization": None,
         "power_draw_mw": 60_000, "utilization_gpu": 0}]})
    clock = Ticker()
    n = Node(tmp_path, nv)
    agent = Agent(n.conf, nvml=Nvml(module=nv), notify=n.notes.append, clock=clock.wall,
                  owns_swap_policy=False, monotonic=lambda: clock.now)
    quiet_host(agent, tmp_path)
    try:
        for _ in range(4):  # four samples, 1 s apart
            agent.gpu_step(clock.now)
            clock.now += 1.0
        text = agent.metrics.text().decode()
        beat = agent.gpu_metrics()["gpus"]
    finally:
        agent.stop()
    expected = {"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": 9_000_000, "DCGM_FI_DEV_ENC_UTIL": 12,
                "DCGM_FI_DEV_DEC_UTIL": 3, "DCGM_FI_DEV_MEMORY_TEMP": 55,
                "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": 4, "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": 2,
                "DCGM_FI_DEV_ROW_REMAP_FAILURE": 0, "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL": 150 * KIB,
                "DCGM_FI_PROF_GR_ENGINE_ACTIVE": 0.4, "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": 0.25,
                "DCGM_FI_PROF_SM_ACTIVE": 0.3, "DCGM_FI_PROF_SM_OCCUPANCY": 0.2,
                "DCGM_FI_PROF_DRAM_ACTIVE": 0.1}
    for name, value in expected.items():
        assert metric(text, name, 0) == value, name
    for name in ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "DCGM_FI_DEV_ENC_UTIL",
                 "DCGM_FI_DEV_MEMORY_TEMP", "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
                 "DCGM_FI_PROF_GR_ENGINE_ACTIVE", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"):
        assert metric(text, name, 1) is None, name  # not reported: no sample, never a 0
    assert metric(text, "clusterctl_gpu_energy_joules_total", 0, state="idle") == 2000.0
    assert metric(text, "clusterctl_gpu_energy_joules_total", 0, state="busy") == 7000.0
    assert metric(text, "clusterctl_gpu_idle_power_watts", 0) == 1000.0
    assert metric(text, "clusterctl_gpu_energy_joules_total", 1, state="idle") == 180.0
    assert metric(text, "clusterctl_gpu_idle_power_watts", 1) == 60.0
    assert beat[0]["energy"] == {"total_mj": 9_000_000, "busy_j": 7000.0, "idle_j": 2000.0,
                                 "idle_power_w": 1000.0, "source": "counter"}
    assert beat[1]["energy"]["source"] == "power_integral"
    assert beat[0]["gpm"] == {"graphics_activity": 0.4, "sm_activity": 0.3,
                              "sm_occupancy": 0.2, "tensor_activity": 0.25,
                              "dram_activity": 0.1}
    assert beat[1]["gpm"]["graphics_activity"] is None
    assert beat[0]["nvlink"] == {"tx_bytes": 100 * KIB, "rx_bytes": 50 * KIB}
    assert beat[0]["remapped_rows"] == {"uncorrectable": 0, "pending": False,
                                        "correctable": 2, "failure": False}
    assert (beat[0]["encoder_utilization"], beat[0]["decoder_utilization"],
            beat[0]["memory_temperature"], beat[0]["pcie_replay_count"]) == (12, 3, 55, 4)
    saved = json.loads((tmp_path / "run" / energy_store.ENERGY_FILE).read_text())
    assert {g["key"]: g["idle_j"] for g in saved["gpus"]} == {"GPU-0": 2000.0, "GPU-1": 180.0}


def test_hibernate_status_shows_what_idle_time_cost_since_boot(tmp_path: Path) -> None:
    """The agent's ledger of this boot, in kWh, as an operator reads it (a subprocess)."""
    conf = tmp_path / "clusterctl.toml"
    conf.write_text(f'[paths]\nstate_dir = "{tmp_path / "state"}"\n'
                    f'run_dir = "{tmp_path / "run"}"\n')

    def status(*flags: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "CLUSTERCTL_CONFIG"}
        done = subprocess.run([sys.executable, "-m", "clusterctl", "hibernate", "status",
                               "--config", str(conf), *flags], capture_output=True, text=True,
                              timeout=60, check=False, env=env)
        assert done.returncode == 0, done.stderr
        return done

    assert "GPU energy since boot: not measured" in status().stdout
    assert json.loads(status("--json").stdout)["gpu_energy"] is None
    keeper = energy_store.EnergyKeeper(tmp_path / "run", failed=never)  # this boot's
    for at, gpu in ((0.0, sample(0, 0, 70.0)), (3600.0, sample(0, 252_000_000, 70.0)),
                    (3630.0, sample(90, 270_000_000, 300.0))):  # an hour idle, 30 s busy
        keeper.after(snapshot(gpu), at, 5.0, 7200.0)
    assert ("GPU energy since boot: idle time cost 0.070 kWh (1 GPU-hours idle, drawing "
            "70 W); busy 0.005 kWh") in status().stdout
    assert json.loads(status("--json").stdout)["gpu_energy"] == {
        "idle_kwh": 0.07, "busy_kwh": 0.005, "idle_hours": 1.0, "idle_power_w": 70.0,
        "sources": ["counter"]}


def test_the_fleet_statistics_add_up_the_nodes_energy(tmp_path: Path) -> None:
    with FleetServer(tmp_path, f"sqlite:///{tmp_path}/f.db") as srv:
        tokens = {}
        for name, gpus in (("a", [{"energy": {"idle_j": 3.6e6, "busy_j": 7.2e6}},
                                  {"energy": {"idle_j": 1.8e6, "busy_j": 0}}]),
                           ("b", [{"energy": {"idle_j": 1.8e6, "busy_j": None}}]),
                           ("c", [{"energy": {"idle_j": "lots", "busy_j": float("1e300")}},
                                  {"energy": "none"}, "garbage"]),
                           ("d", [])):
            tokens[name] = srv.enrol(name)
            status, _ = srv.request("POST", "/api/agent/status",
                                    heartbeat(name, gpus=0) | {"gpus": gpus},
                                    token=tokens[name])
            assert status == 200
        status, stats = srv.admin("GET", "/api/hibernation/stats")
        assert status == 200
        assert (stats["idle_gpu_kwh"], stats["busy_gpu_kwh"]) == (2.0, 2.0)
        status, _ = srv.request(  # b's next heartbeat takes the place of its last
            "POST", "/api/agent/status", heartbeat("b", gpus=0) | {
                "sequence": 2, "gpus": [{"energy": {"idle_j": 7.2e6}}]}, token=tokens["b"])
        assert status == 200
        _, stats = srv.admin("GET", "/api/hibernation/stats")
        assert stats["idle_gpu_kwh"] == 3.5


# -- attacks: a broken driver, a damaged file, hostile heartbeats (issue 18's review) ------


@pytest.mark.parametrize("then_mj", [10**9 + 10**15, 10**9 - 5, -5, 2**64 - 1])
def test_a_counter_that_jumps_or_goes_back_adds_no_energy_no_gpu_can_burn(then_mj: int
                                                                           ) -> None:
    """Samples 1 s apart: a broken driver's figure (10^15 mJ more, a few mJ back without a
    restart, below zero, 2^64) would be megawatts or negative for that second; that
    interval is not accounted, and the ones around it are."""
    gpu = run([(0, sample(0, 10**9)), (1, sample(0, 10**9 + 70_000)),  # idle: 70 J
               (2, sample(0, then_mj)),  # the broken figure
               (3, sample(0, then_mj + 70_000))])  # and on from it: 70 J
    assert (gpu.idle_j, gpu.busy_j) == (140.0, 0.0)
    assert gpu.idle_power_w == 70.0


def test_a_draw_no_gpu_has_is_not_integrated() -> None:
    gpu = run([(0, sample(0, None, 70.0)), (1, sample(0, None, 70.0)),  # idle: 70 J
               (2, sample(0, None, 4_294_967.295)),  # 2^32 - 1 mW
               (3, sample(0, None, 70.0)), (4, sample(0, None, 70.0))])  # idle: 70 J
    assert (gpu.idle_j, gpu.idle_power_w) == (140.0, 70.0)


GOOD_ENERGY = {"key": "GPU-a", "index": 0, "busy_j": 1.0, "idle_j": 2.0, "busy_s": 1.0,
               "idle_s": 2.0, "source": "counter", "total_mj": 5, "last_at": 3.0,
               "last_power_w": 70.0}


@pytest.mark.parametrize("damage", ['"index": Infinity', '"index": 1e400', '"busy_j": NaN',
                                    '"idle_j": Infinity', '"idle_s": 1e400',
                                    '"last_at": NaN', '"last_power_w": -Infinity'])
def test_an_energy_file_with_numbers_no_ledger_holds_is_damaged_never_a_crash(
        tmp_path: Path, damage: str) -> None:
    """The agent starts (afresh, the file set aside) and `hibernate status` says "not
    measured": never an OverflowError, never NaN in the API, heartbeats or /metrics."""
    name = damage.split(":", 1)[0].strip('"')
    text = json.dumps({"version": 1, "boot_id": "boot-1", "gpus": [GOOD_ENERGY]})
    good = f'"{name}": {json.dumps(GOOD_ENERGY[name])}'
    assert text.count(good) == 1
    (tmp_path / energy_store.ENERGY_FILE).write_text(text.replace(good, damage))
    assert energy_store.peek(tmp_path, "boot-1") is None  # hibernate status
    keeper = energy_store.EnergyKeeper(tmp_path, failed=never, boot_id="boot-1")  # the agent
    assert keeper.ledger.gpus == {}
    assert list(tmp_path.glob(energy_store.ENERGY_FILE + ".corrupt-*"))


SAMPLE_ATTRIBUTE = {"memory_temperature": "memory_temperature_c",
                    "nvlink_tx_kib": "nvlink_tx_bytes", "nvlink_rx_kib": "nvlink_rx_bytes"}


@pytest.mark.parametrize(("attribute", "value_type", "value"), [
    ("memory_temperature", 0, float("nan")),  # NVML_VALUE_TYPE_DOUBLE
    ("memory_temperature", 0, float("inf")),
    ("nvlink_tx_kib", 0, float("nan")),
    ("nvlink_rx_kib", 0, float("-inf")),
    ("memory_temperature", 7, 45),  # NVML_VALUE_TYPE_COUNT: no type
    ("memory_temperature", 255, 45),
])
def test_a_field_value_not_a_number_or_of_no_known_type_is_none_and_sampling_goes_on(
        nv: ModuleType, attribute: str, value_type: int, value: float) -> None:
    nvml = one(nv, **{"nvlink_tx_kib": 100, "nvlink_rx_kib": 50, "energy_mj": 5,
                      "temperature": 41, attribute: value},
               field_value_types={attribute: value_type})
    for second in (0, 10, 40):  # the counters (NVLink) read twice
        gpu = nvml.sample(now=1000.0 + second).gpus[0]
        assert not gpu.lost and (gpu.temperature_c, gpu.energy_total_mj) == (41, 5)
        assert getattr(gpu, SAMPLE_ATTRIBUTE[attribute]) is None
        if attribute == "memory_temperature":  # the other fields as the driver gave them
            assert gpu.nvlink_bytes_total == 150 * KIB
        else:
            assert gpu.memory_temperature_c == 45 and gpu.nvlink_bytes_total is None


def test_a_live_scrape_with_every_field_xids_and_energy_is_valid_exposition(
        tmp_path: Path, nv: ModuleType) -> None:
    """promtool on /metrics as served, with GPM values a broken driver gives (NaN, inf,
    negative, 10^9 %): every DCGM_FI_PROF_* within [0, 1]; XIDs 0, 999 and 2^63 too."""
    nv.configure({"gpus": [
        {**H100, "uuid": "GPU-0", "utilization_gpu": [0, 0, 80], "energy_mj": [0, 70_000, 10**6],
         "encoder_utilization": 1, "decoder_utilization": 2, "memory_temperature": 50,
         "pcie_replay_count": 3, "remapped_rows": (1, 0, 1, 1), "nvlink_tx_kib": 7,
         "nvlink_rx_kib": 8, "gpm": {"GRAPHICS_UTIL": float("nan"), "ANY_TENSOR_UTIL": 1e9,
                                     "SM_UTIL": -50, "SM_OCCUPANCY": float("inf"),
                                     "DRAM_BW_UTIL": [100, 250, 30]}},
        {**H100, "uuid": "GPU-1", "pci_bus_id": "00000000:1A:00.0", "energy_mj": None,
         "power_draw_mw": 60_000, "gpm": {"GRAPHICS_UTIL": [0, 40, 120]}}]})
    n = Node(tmp_path, nv)
    agent = n.start()
    try:
        wait_until(lambda: nv.xid_listeners(0) and nv.xid_listeners(1))
        for index, code in ((0, 0), (0, 999), (1, 2**63), (1, 13), (0, 79)):
            nv.inject_xid(index, code)
        wait_until(lambda: sum(g.count for g in agent.snapshot().xids.gpus) == 5)
        wait_until(lambda: "DCGM_FI_PROF_DRAM_ACTIVE{" in n.get("/metrics")[1]
                   and "clusterctl_gpu_xid_errors_total{" in n.get("/metrics")[1])
        time.sleep(0.3)  # a few more samples
        status, text = n.get("/metrics")
    finally:
        n.stop()
    assert status == 200
    checked = subprocess.run([tool("promtool"), "check", "metrics"], input=text,
                             capture_output=True, text=True, timeout=60, check=False)
    complaints = {line.split(" ", 1)[1] for line in (checked.stdout + checked.stderr)
                  .splitlines() if line.strip()}  # lint only, on dcgm-exporter's own names
    assert complaints <= {"label names should be written in 'snake_case' not 'camelCase'",
                          "metric name should not include type 'counter'"}, \
        checked.stdout + checked.stderr
    prof = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("DCGM_FI_PROF_")]
    assert prof and all(0.0 <= v <= 1.0 for v in prof), prof
    assert metric(text, "DCGM_FI_DEV_XID_ERRORS", 1) == 13.0  # the last
    assert metric(text, "clusterctl_gpu_xid_errors_total", 1, xid=str(2**63)) == 1.0
    assert metric(text, "clusterctl_gpu_xid_errors_total", 0, xid="0") == 1.0
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")]
    assert all(math.isfinite(v) for v in values)


def test_the_fleet_statistics_stay_finite_json_whatever_the_heartbeats_hold(
        tmp_path: Path) -> None:
    """NaN, Infinity, 1e308, negatives, strings, nesting and a node listing 4,000 GPUs:
    stats_now counts what a GPU can have burned, in strict JSON, never a 500."""
    hostile = [{"energy": {"idle_j": float("nan"), "busy_j": float("inf")}},
               {"energy": {"idle_j": 1e308, "busy_j": -3.6e6}},
               {"energy": {"idle_j": "3.6e6", "busy_j": [3.6e6]}},
               {"energy": {"idle_j": {"j": 1}, "busy_j": True}},
               {"energy": [1, 2]}, {"energy": None}, [], 7]
    many = [{"energy": {"idle_j": 3.6e6, "busy_j": 0}}] * 4000
    with FleetServer(tmp_path, f"sqlite:///{tmp_path}/f.db") as srv:
        for name, gpus in (("hostile", hostile), ("many", many),
                           ("fine", [{"energy": {"idle_j": 7.2e6, "busy_j": 3.6e6}}])):
            token = srv.enrol(name)
            status, answer = srv.request("POST", "/api/agent/status",
                                         heartbeat(name, gpus=0) | {"gpus": gpus}, token=token)
            assert status == 200, answer
        status, raw = srv.request("GET", "/api/hibernation/stats", token=ADMIN)
    assert status == 200
    stats = json.loads(json.dumps(raw), parse_constant=pytest.fail)  # strict JSON
    assert stats["idle_gpu_kwh"] == 2.0 + energy.MAX_GPUS_COUNTED
    assert stats["busy_gpu_kwh"] == 1.0
