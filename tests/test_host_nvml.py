from __future__ import annotations

import ctypes.util
from pathlib import Path
from types import ModuleType

import pytest

from clusterctl.host.nvml import Nvml
from tests.conftest import A100, H100, load_fake_nvml

NVML_LIB = ctypes.util.find_library("nvidia-ml")


@pytest.fixture
def nv(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_fake_nvml(monkeypatch)


# -- the real pynvml -----------------------------------------------------------


@pytest.mark.skipif(NVML_LIB is not None, reason="this machine has an NVIDIA driver")
def test_real_pynvml_without_a_driver_is_a_reason_not_a_traceback() -> None:
    with Nvml() as nvml:
        inventory = nvml.inventory()
    assert inventory.gpus == ()
    assert not inventory.available
    assert inventory.reason == "no NVIDIA driver: libnvidia-ml.so.1 was not found"
    assert inventory.fix is not None and "install the NVIDIA driver" in inventory.fix


@pytest.mark.gpu
@pytest.mark.skipif(NVML_LIB is None, reason="needs an NVIDIA driver and GPU")
def test_real_gpu_inventory() -> None:
    with Nvml() as nvml:
        inventory = nvml.inventory()
    assert inventory.available, inventory.reason
    assert inventory.driver_version
    for gpu in inventory.gpus:
        assert gpu.name and gpu.uuid and gpu.uuid.startswith("GPU-")
        assert gpu.memory_total_bytes and gpu.memory_total_bytes > 2**30
        assert gpu.pci_bus_id and ":" in gpu.pci_bus_id


# -- scenarios on the fake, named after what happens on real nodes --------------


def test_two_gpu_server(nv: ModuleType) -> None:
    nv.configure({"driver_version": "535.161.08", "cuda_version": 12020,
                  "gpus": [H100, {**A100, "uuid": "GPU-a", "pci_bus_id": "00000000:9A:00.0"}]})
    inventory = Nvml(module=nv).inventory()
    assert [g.name for g in inventory.gpus] == ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"]
    assert inventory.gpus[0].pci_bus_id == "00000000:19:00.0"  # bytes from NVML, decoded
    assert inventory.driver_version == "535.161.08"
    assert inventory.cuda_driver_version == "12.2"
    assert inventory.memory_total_bytes == H100["memory_total"] + A100["memory_total"]
    assert inventory.reason is None


@pytest.mark.parametrize(
    ("code", "reason", "fix"),
    [
        (12, "no NVIDIA driver: libnvidia-ml.so.1 was not found", "install the NVIDIA driver"),
        (9, "the NVIDIA kernel driver is not loaded", "modprobe nvidia"),
        (18, "driver updated without reboot", "reboot"),
        (4, "no permission to open the NVIDIA devices", "run as root"),
    ],
)
def test_init_failures_become_reasons(nv: ModuleType, code: int, reason: str, fix: str) -> None:
    nv.configure({"init_error": code})
    inventory = Nvml(module=nv).inventory()
    assert inventory.gpus == ()
    assert inventory.reason is not None and reason in inventory.reason
    assert inventory.fix is not None and fix in inventory.fix


def test_unexpected_init_error_keeps_nvml_s_words(nv: ModuleType) -> None:
    nv.configure({"init_error": 999})
    assert Nvml(module=nv).inventory().reason == "NVML failed to initialise: Unknown Error"


def test_driver_loaded_but_no_gpu(nv: ModuleType) -> None:
    nv.configure({"gpus": []})
    inventory = Nvml(module=nv).inventory()
    assert inventory.driver_version == "550.54.15"
    assert inventory.reason == "the NVIDIA driver is loaded but reports no GPU"


def test_a_gpu_that_fell_off_the_bus_is_lost_and_the_others_still_report(nv: ModuleType) -> None:
    nv.configure({"gpus": [{**H100, "lost": True}, A100]})
    lost, ok = Nvml(module=nv).inventory().gpus
    assert lost.lost and lost.name is None and lost.memory_total_bytes is None
    assert lost.error is not None and "fell off the bus" in lost.error
    assert not ok.lost and ok.name == "NVIDIA A100-SXM4-80GB"


def test_handle_lookup_failing_for_one_gpu(nv: ModuleType) -> None:
    nv.configure({"gpus": [{**H100, "errors": {"nvmlDeviceGetHandleByIndex": 15}}, A100]})
    lost, ok = Nvml(module=nv).inventory().gpus
    assert lost.lost and ok.name == "NVIDIA A100-SXM4-80GB"


def test_an_unsupported_field_is_none_not_zero(nv: ModuleType) -> None:
    nv.configure({"gpus": [{**H100, "errors": {"nvmlDeviceGetPciInfo": 3}}]})
    (gpu,) = Nvml(module=nv).inventory().gpus
    assert gpu.pci_bus_id is None
    assert gpu.error is None  # not supported is normal, not an error
    assert gpu.memory_total_bytes == H100["memory_total"]


def test_a_failing_field_is_reported_without_losing_the_gpu(nv: ModuleType) -> None:
    nv.configure({"gpus": [{**H100, "errors": {"nvmlDeviceGetMemoryInfo": 10}}]})
    (gpu,) = Nvml(module=nv).inventory().gpus
    assert gpu.memory_total_bytes is None and not gpu.lost
    assert gpu.error == "nvmlDeviceGetMemoryInfo: Timeout"


def test_older_driver_without_the_v2_cuda_call_falls_back(nv: ModuleType) -> None:
    nv.configure({"cuda_version": 11040, "gpus": [H100],
                  "missing_functions": ["nvmlSystemGetCudaDriverVersion_v2"]})
    assert Nvml(module=nv).inventory().cuda_driver_version == "11.4"


def test_nvml_is_initialised_once_and_shut_down(nv: ModuleType) -> None:
    nv.configure({"gpus": [H100]})
    nvml = Nvml(module=nv)
    nvml.inventory()
    nvml.inventory()
    assert nv.machine.init_count == 1
    nvml.shutdown()
    assert nv.machine.init_count == 0


def test_fake_is_honest_about_pynvml_names_codes_and_classes(nv: ModuleType) -> None:
    """The fake's constants, error classes and functions all exist in pynvml, the same."""
    pynvml = pytest.importorskip("pynvml")
    err = nv.NVMLError(nv.NVML_ERROR_GPU_IS_LOST)
    assert type(err) is nv.NVMLError_GpuIsLost
    assert isinstance(err, nv.NVMLError) and err.value == 15
    for name in (n for n in dir(nv) if n.startswith("NVML_ERROR_")):
        assert getattr(pynvml, name) == getattr(nv, name), name
        real = type(pynvml.NVMLError(getattr(pynvml, name))).__name__
        assert type(nv.NVMLError(getattr(nv, name))).__name__ == real
    for name in (n for n in dir(nv) if n.startswith("nvml")):
        if callable(getattr(nv, name)):
            assert callable(getattr(pynvml, name, None)), f"pynvml has no {name}"
        else:
            assert getattr(pynvml, name) == getattr(nv, name), name
    for name in (n for n in dir(nv) if n.startswith("NVML_") and not n.startswith("NVML_ERR")):
        assert getattr(pynvml, name) == getattr(nv, name), name


# -- sampling ------------------------------------------------------------------


def test_a_sample_reads_every_gauge_in_its_unit(nv: ModuleType) -> None:
    nv.configure({"gpus": [{**H100, "utilization_gpu": 87, "utilization_memory": 41,
                            "temperature": 71, "power_draw_mw": 512_345,
                            "clocks_event_reasons": 0x4 | 0x20 | 0x400,
                            "processes": [{"pid": 4242, "name": "ollama",
                                           "used_memory": 6 * 2**30},
                                          {"pid": 4343, "name": "python3",
                                           "used_memory": None}]}]})
    nvml = Nvml(module=nv)
    gpu = nvml.sample(processes=True, now=1_700_000_000).gpus[0]
    assert (gpu.utilization_gpu_percent, gpu.utilization_memory_percent) == (87, 41)
    assert gpu.memory_total_mib == H100["memory_total"] // 2**20
    assert gpu.memory_used_mib == H100["memory_used"] // 2**20
    assert gpu.temperature_c == 71
    assert gpu.power_draw_w == 512.345
    assert (gpu.power_limit_w, gpu.power_default_limit_w, gpu.power_min_limit_w,
            gpu.power_max_limit_w) == (700.0, 700.0, 200.0, 700.0)
    assert (gpu.clock_graphics_mhz, gpu.clock_sm_mhz, gpu.clock_memory_mhz) == (1980, 1980, 2619)
    assert gpu.performance_state == 0
    assert gpu.fan_percent is None  # not supported: None, never a made-up 0
    assert gpu.clock_event_reasons == ("sw_power_cap", "sw_thermal_slowdown", "other_0x400")
    assert (gpu.ecc_uncorrected_volatile, gpu.remapped_rows_uncorrectable,
            gpu.remapped_rows_pending) == (0, 0, False)
    assert [(p.pid, p.name, p.used_mib) for p in gpu.processes or ()] == [
        (4242, "ollama", 6144), (4343, "python3", None)]
    assert gpu.error is None and not gpu.lost
    assert nvml.sample().gpus[0].processes is None  # the slow read only when asked


def test_static_fields_are_read_once(nv: ModuleType) -> None:
    nv.configure({"gpus": [H100]})
    nvml = Nvml(module=nv)
    nvml.sample()
    nv.machine.gpus[0].name = "renamed"  # a driver does not rename a GPU while loaded
    nv.machine.gpus[0].temperature = 55
    again = nvml.sample().gpus[0]
    assert (again.name, again.temperature_c) == (H100["name"], 55)


def test_a_gpu_lost_mid_run_is_lost_then_found_again(nv: ModuleType) -> None:
    nv.configure({"gpus": [H100, {**A100, "uuid": "GPU-a"}]})
    nvml = Nvml(module=nv)
    assert [g.lost for g in nvml.sample().gpus] == [False, False]
    nv.machine.gpus[0].lost = True
    first, second = nvml.sample().gpus
    assert first.lost and first.temperature_c is None and "GPU is lost" in (first.error or "")
    assert not second.lost and second.temperature_c == 40
    nv.machine.gpus[0].lost = False  # reset by the operator
    assert not nvml.sample().gpus[0].lost


def test_older_drivers_use_the_throttle_reasons_call(nv: ModuleType) -> None:
    nv.configure({"gpus": [{**H100, "clocks_event_reasons": 0x40}],
                  "missing_functions": ["nvmlDeviceGetCurrentClocksEventReasons"]})
    gpu = Nvml(module=nv).sample().gpus[0]
    assert gpu.clock_event_reasons == ("hw_thermal_slowdown",)
    assert gpu.error is None


def test_no_driver_is_a_snapshot_with_a_reason(nv: ModuleType) -> None:
    nv.configure({"init_error": nv.NVML_ERROR_LIBRARY_NOT_FOUND})
    snap = Nvml(module=nv).sample()
    assert snap.gpus == ()
    assert snap.reason == "no NVIDIA driver: libnvidia-ml.so.1 was not found"


@pytest.mark.gpu
@pytest.mark.skipif(NVML_LIB is None, reason="needs an NVIDIA driver and GPU")
def test_real_sample_agrees_with_nvidia_smi() -> None:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        pytest.skip("nvidia-smi is not installed")
    fields = ("index,uuid,memory.total,memory.used,temperature.gpu,power.limit,"
              "power.default_limit,power.min_limit,power.max_limit,pstate")
    rows = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    with Nvml() as nvml:
        snap = nvml.sample(processes=True)
    assert len(snap.gpus) == len(rows)
    for gpu, row in zip(snap.gpus, rows, strict=True):
        smi = [x.strip() for x in row.split(",")]
        assert gpu.uuid == smi[1]
        assert gpu.memory_total_mib == int(smi[2])
        assert abs((gpu.memory_used_mib or 0) - int(smi[3])) <= 64
        assert gpu.temperature_c is not None and abs(gpu.temperature_c - int(smi[4])) <= 3
        for ours, theirs in ((gpu.power_limit_w, smi[5]), (gpu.power_default_limit_w, smi[6]),
                             (gpu.power_min_limit_w, smi[7]), (gpu.power_max_limit_w, smi[8])):
            if theirs not in ("[N/A]", "N/A"):
                assert ours is not None and abs(ours - float(theirs)) <= 1.0
        assert f"P{gpu.performance_state}" == smi[9]
        assert gpu.utilization_gpu_percent is not None and 0 <= gpu.utilization_gpu_percent <= 100
        assert gpu.clock_sm_mhz and gpu.clock_memory_mhz
        assert gpu.power_draw_w is not None and 0 < gpu.power_draw_w < 2000
        assert gpu.clock_event_reasons is not None
        assert gpu.processes is not None
        assert gpu.error is None, gpu.error


def test_used_memory_leaves_out_the_drivers_reserve_like_nvidia_smi(nv: ModuleType) -> None:
    nv.configure({"gpus": [{**H100, "memory_used": 0, "memory_reserved": 480 * 2**20}]})
    gpu = Nvml(module=nv).sample().gpus[0]
    assert gpu.memory_used_mib == 0
    assert gpu.memory_free_mib == (H100["memory_total"] - 480 * 2**20) // 2**20
    nv.configure({"gpus": [{**H100, "memory_used": 0, "memory_reserved": 480 * 2**20}],
                  "missing_functions": ["nvmlDeviceGetMemoryInfo_v2"]})  # an older driver
    assert Nvml(module=nv).sample().gpus[0].memory_used_mib == 480


def test_a_field_the_gpu_lacks_is_asked_once(nv: ModuleType) -> None:
    nv.configure({"gpus": [{**H100, "fan_percent": None}]})
    calls = []
    real = nv.nvmlDeviceGetFanSpeed

    def counting(handle: object) -> int:
        calls.append(handle)
        return int(real(handle))

    nv.nvmlDeviceGetFanSpeed = counting
    counting.__name__ = "nvmlDeviceGetFanSpeed"
    nvml = Nvml(module=nv)
    for _ in range(5):
        assert nvml.sample().gpus[0].fan_percent is None
    assert len(calls) == 1


@pytest.mark.gpu
@pytest.mark.skipif(NVML_LIB is None, reason="needs an NVIDIA driver and GPU")
def test_real_gpu_placement_and_throttle_plan_change_no_setting(tmp_path: Path) -> None:
    """Placement on the real GPU's numbers; the controller in plan-only mode."""
    from clusterctl import config as cfg
    from clusterctl.gpu import placement
    from clusterctl.gpu.monitor import GpuMonitor

    config = cfg.with_changes(cfg.Config(paths=cfg.PathsConfig(
        state_dir=tmp_path / "state", run_dir=tmp_path / "run")), "gpu",
        {"throttle_enabled": True, "temp_optimal": 1, "temp_normal": 2,
         "temp_throttle": 3})  # so any GPU is "hot": the plan must lower, and never act
    with Nvml() as nvml:
        before = nvml.sample().gpus[0]
        free = before.memory_free_mib or 0
        first = placement.place(config.paths.state_dir, config.paths.run_dir, nvml.sample,
                                "a", free // 2, 512, now=0)
        with pytest.raises(placement.NoFit):
            placement.place(config.paths.state_dir, config.paths.run_dir, nvml.sample, "b",
                            free // 2, 512, gpu_index=first.room.index, now=1)
        monitor = GpuMonitor(config, nvml, plan_only=True)
        view = monitor.step()[0]
        monitor.stop()
        after = nvml.sample().gpus[0]
    assert view.decision is not None and view.decision.move in ("lower", "floor")
    assert after.power_limit_w == before.power_limit_w  # nothing was set
    assert not (tmp_path / "state/originals.json").exists()


# -- one error policy for every NVML call ------------------------------------------

DEVICE_CALLS = ("nvmlDeviceGetHandleByIndex", "nvmlDeviceGetName", "nvmlDeviceGetUUID",
                "nvmlDeviceGetPciInfo", "nvmlDeviceGetMemoryInfo",
                "nvmlDeviceGetPowerManagementLimitConstraints",
                "nvmlDeviceGetPowerManagementDefaultLimit", "nvmlDeviceGetUtilizationRates",
                "nvmlDeviceGetTemperature", "nvmlDeviceGetPowerUsage",
                "nvmlDeviceGetPowerManagementLimit", "nvmlDeviceGetClockInfo",
                "nvmlDeviceGetPerformanceState", "nvmlDeviceGetFanSpeed",
                "nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetTotalEccErrors",
                "nvmlDeviceGetRemappedRows", "nvmlDeviceGetComputeRunningProcesses")


@pytest.mark.parametrize("code", [1, 2, 4, 6, 10, 15, 16, 17, 20, 999])
def test_no_nvml_failure_leaves_the_nvml_layer_as_pynvml_s_own_error(nv: ModuleType,
                                                                     code: int) -> None:
    """Whatever call fails, and however: a sample, an inventory and a GPU's handle give a
    reason (a field error, a lost GPU, a HostError), never pynvml's NVMLError."""
    from clusterctl.errors import HostError

    for call in DEVICE_CALLS:
        nv.configure({"gpus": [{**H100, "errors": {call: code},
                                "processes": [{"pid": 7, "name": "ollama"}]}, A100]})
        nvml = Nvml(module=nv)
        for _ in range(2):
            sample = nvml.sample(processes=True)
            assert sample.gpus[0].lost or sample.gpus[0].error, (call, code)
            assert sample.gpus[1].temperature_c == 40  # the other GPU still reports
            assert nvml.inventory().gpus[1].name == A100["name"]
        try:
            nvml.handle(0)
        except HostError as err:
            assert call in str(err) and str(err).startswith("GPU 0: "), str(err)
        assert nvml.handle(1) is not None


def test_a_gpu_that_needs_a_reset_is_lost_and_says_so(nv: ModuleType) -> None:
    """NVML_ERROR_RESET_REQUIRED from every call of one GPU: it is lost, as one that fell off
    the bus, with the reason an operator acts on; the others keep reporting."""
    needs_reset = dict.fromkeys(DEVICE_CALLS[1:], nv.NVML_ERROR_RESET_REQUIRED)
    nv.configure({"gpus": [{**H100, "errors": needs_reset}, A100]})
    nvml = Nvml(module=nv)
    broken, ok = nvml.sample().gpus
    assert broken.lost and "needs a reset" in (broken.error or "")
    assert not ok.lost and ok.temperature_c == 40
    info = nvml.inventory().gpus[0]
    assert info.lost and "needs a reset" in (info.error or "")


def test_a_fixed_fact_that_fails_is_said_with_every_sample_not_taken_for_unsupported(
        nv: ModuleType) -> None:
    """None with no error means "this GPU does not report it"; a read that failed says so
    (the default power limit, read once, refused here), in every sample."""
    nv.configure({"gpus": [{**H100, "errors": {
        "nvmlDeviceGetPowerManagementDefaultLimit": nv.NVML_ERROR_NO_PERMISSION}}]})
    nvml = Nvml(module=nv)
    for _ in range(2):
        gpu = nvml.sample().gpus[0]
        assert gpu.power_default_limit_w is None and not gpu.lost
        assert gpu.error == "nvmlDeviceGetPowerManagementDefaultLimit: Insufficient Permissions"
        assert gpu.temperature_c == 40


# -- XID events on the real GPU (read only: an event set changes no setting) -----------


@pytest.mark.gpu
@pytest.mark.skipif(NVML_LIB is None, reason="needs an NVIDIA driver and GPU")
def test_real_xid_event_set_registers_and_a_wait_times_out_cleanly() -> None:
    """pynvml itself: the event set takes the XID event on every GPU that reports it, and
    a wait with nothing to hear raises NVML's TIMEOUT after its timeout, as the fake's
    does."""
    import time

    import pynvml

    pynvml.nvmlInit()
    try:
        event_set = pynvml.nvmlEventSetCreate()
        registered = []
        try:
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                supported = pynvml.nvmlDeviceGetSupportedEventTypes(handle)
                if supported & pynvml.nvmlEventTypeXidCriticalError:
                    pynvml.nvmlDeviceRegisterEvents(
                        handle, pynvml.nvmlEventTypeXidCriticalError, event_set)
                    registered.append(index)
            assert registered, "no GPU here reports XID events"
            started = time.monotonic()
            with pytest.raises(pynvml.NVMLError) as timed_out:
                pynvml.nvmlEventSetWait_v2(event_set, 500)
            took = time.monotonic() - started
            assert timed_out.value.value == pynvml.NVML_ERROR_TIMEOUT
            assert 0.3 <= took < 3.0, took
        finally:
            pynvml.nvmlEventSetFree(event_set)
    finally:
        pynvml.nvmlShutdown()


@pytest.mark.gpu
@pytest.mark.skipif(NVML_LIB is None, reason="needs an NVIDIA driver and GPU")
def test_real_xid_watcher_watches_every_gpu_and_hears_nothing_on_a_healthy_one() -> None:
    import time

    from clusterctl.host.nvml_events import XidWatcher

    failed: list[Exception] = []
    with Nvml() as nvml:
        count = len(nvml.inventory().gpus)
        watcher = XidWatcher(nvml, failed=failed.append)
        try:
            started = time.monotonic()
            events = watcher.wait(1.0) + watcher.wait(0.5)
            took = time.monotonic() - started
            watched, problem = watcher.watched, watcher.problem
        finally:
            watcher.close()
    assert failed == []
    assert watched == frozenset(range(count)), problem
    assert events == []
    assert 1.2 <= took < 5.0, took


# -- issue 18: energy, the rest of dcgm-exporter's fields, GPM (read only) ----------------

NEW_FIELDS = ("energy_total_mj", "encoder_utilization_percent", "decoder_utilization_percent",
              "memory_temperature_c", "pcie_replay_count", "remapped_rows_correctable",
              "remap_failure", "nvlink_tx_bytes", "nvlink_rx_bytes", "gpm_graphics_activity",
              "gpm_sm_activity", "gpm_sm_occupancy", "gpm_tensor_activity",
              "gpm_dram_activity")


@pytest.mark.gpu
@pytest.mark.skipif(NVML_LIB is None, reason="needs an NVIDIA driver and GPU")
def test_real_energy_counter_grows_over_two_seconds() -> None:
    import time

    with Nvml() as nvml:
        before = nvml.sample().gpus
        time.sleep(2.0)
        after = nvml.sample().gpus
    counted = [(b.energy_total_mj, a.energy_total_mj) for b, a in zip(before, after, strict=True)
               if b.energy_total_mj is not None]
    if not counted:
        pytest.skip("no GPU here has the energy counter (Volta and newer have it)")
    for first, second in counted:
        assert second is not None and second > first  # a powered GPU draws tens of watts


@pytest.mark.gpu
@pytest.mark.skipif(NVML_LIB is None, reason="needs an NVIDIA driver and GPU")
def test_real_gpm_fractions_are_between_0_and_1_at_idle() -> None:
    import time

    gpm = ("gpm_graphics_activity", "gpm_sm_activity", "gpm_sm_occupancy",
           "gpm_tensor_activity", "gpm_dram_activity")
    with Nvml() as nvml:
        nvml.sample()
        time.sleep(1.0)
        gpus = nvml.sample().gpus
        problems = [nvml.gpm_problem(g.index) for g in gpus]
    for gpu, problem in zip(gpus, problems, strict=True):
        values = [getattr(gpu, name) for name in gpm]
        if problem is not None:
            assert values == [None] * len(gpm), problem
            continue
        assert gpu.gpm_graphics_activity is not None and gpu.gpm_tensor_activity is not None
        for name, value in zip(gpm, values, strict=True):
            assert value is None or 0.0 <= value <= 1.0, (name, value)
        assert gpu.error is None, gpu.error


def _smi_column(field: str) -> dict[str, str] | None:
    """nvidia-smi's value of ``field`` per GPU UUID; None when this nvidia-smi lacks it."""
    import subprocess

    done = subprocess.run(["nvidia-smi", f"--query-gpu=uuid,{field}",
                           "--format=csv,noheader,nounits"], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        return None
    rows = [line.split(",", 1) for line in done.stdout.splitlines() if "," in line]
    return {uuid.strip(): value.strip() for uuid, value in rows}


@pytest.mark.gpu
@pytest.mark.skipif(NVML_LIB is None, reason="needs an NVIDIA driver and GPU")
def test_real_new_fields_are_numbers_or_none_and_agree_with_nvidia_smi() -> None:
    import shutil

    with Nvml() as nvml:
        snap = nvml.sample(processes=True)
    assert snap.gpus
    for gpu in snap.gpus:
        assert not gpu.lost and gpu.error is None, gpu.error
        for name in NEW_FIELDS:
            value = getattr(gpu, name)
            if name == "remap_failure":
                assert value is None or isinstance(value, bool), value
            elif value is not None:
                assert isinstance(value, (int, float)) and not isinstance(value, bool)
                assert value >= 0, (name, value)
        assert gpu.processes is not None
        assert all(p.kind in ("compute", "graphics") for p in gpu.processes)
        assert len({p.pid for p in gpu.processes}) == len(gpu.processes)
    if shutil.which("nvidia-smi") is None:
        pytest.skip("nvidia-smi is not installed")
    compared = 0
    for field, attribute, tolerance in (("temperature.memory", "memory_temperature_c", 3),
                                        ("utilization.encoder", "encoder_utilization_percent",
                                         5),
                                        ("utilization.decoder", "decoder_utilization_percent",
                                         5)):
        column = _smi_column(field)
        if column is None:
            continue  # an nvidia-smi without that field
        for gpu in snap.gpus:
            theirs = column.get(gpu.uuid or "")
            ours = getattr(gpu, attribute)
            if theirs is None or theirs in ("[N/A]", "N/A", "[Not Supported]"):
                assert ours is None or theirs is None, (field, ours, theirs)
                continue
            assert ours is not None and abs(ours - float(theirs)) <= tolerance, (
                field, ours, theirs)
            compared += 1
    assert compared, "nvidia-smi shared no field with the sample"
