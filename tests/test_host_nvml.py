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
