from __future__ import annotations

import ctypes.util
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
        assert callable(getattr(pynvml, name, None)), f"pynvml has no {name}"
