"""A scriptable stand-in for nvidia-ml-py's ``pynvml``, for machines without a GPU.

It has pynvml's names, return types and error classes (``NVMLError(value)``
maps to ``NVMLError_GpuIsLost`` and friends, ``.value`` holds the NVML return
code) and nothing of clusterctl's. It is put in place of the real module at
the NVML boundary only:

* in-process: load this file under any name and hand it to
  ``clusterctl.host.nvml.Nvml(module=...)``, or put it in ``sys.modules["pynvml"]``;
* in a subprocess: put this directory first on ``PYTHONPATH`` so ``import pynvml``
  finds it, and name a JSON scenario in ``FAKE_NVML_SCENARIO``.

A scenario says what the "machine" has: ``{"init_error": 12}`` (no driver),
or ``{"driver_version": "...", "cuda_version": 12040, "gpus": [{...}]}`` where
each GPU has ``name``, ``uuid``, ``pci_bus_id``, ``memory_total`` and
``memory_used`` (bytes), ``lost`` (fell off the bus) and ``errors``, a map of
pynvml function name to the NVML return code it raises for that GPU (see FakeGpu
for the gauges), and ``delays_s``, a map of pynvml function name to the seconds that
function takes to answer for that GPU (a slow driver; a list is a timeline, as for
the gauges: ``[2, 0]`` makes only the first call slow).

Knobs for a test watching another process:

* ``FAKE_NVML_CALLS_LOG=<path>``: power limits set are appended there, one
  "UUID MILLIWATTS" line each;
* ``FAKE_NVML_STALL_FILE=<path>``: while that file exists, every per-device call
  (``nvmlDeviceGet*``/``nvmlDeviceSet*`` on a handle) blocks, looking again every
  0.1 s, and answers once it is removed: a hung driver;
* the scenario's ``"barrier": {"at": "<pynvml function name>", "dir": "<path>",
  "parties": 2, "timeout_s": 6}``: the first call of that function in each process
  (or thread) leaves a mark in ``dir`` and waits until ``parties`` marks are there,
  at most ``timeout_s`` (a lock held by one caller keeps the others from arriving:
  it then goes on alone). Callers lined up this way have all read the GPUs before
  any of them goes on.
"""

from __future__ import annotations

import json
import os
import string
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

# Return codes from nvml.h, as pynvml exports them.
NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_ALREADY_INITIALIZED = 5
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_INSUFFICIENT_POWER = 8
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_IRQ_ISSUE = 11
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_CORRUPTED_INFOROM = 14
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_OPERATING_SYSTEM = 17
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_IN_USE = 19
NVML_ERROR_MEMORY = 20
NVML_ERROR_NO_DATA = 21
NVML_ERROR_UNKNOWN = 999

_STRINGS = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_ALREADY_INITIALIZED: "Already Initialized",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_LIB_RM_VERSION_MISMATCH: "RM has detected an NVML/RM version mismatch.",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    _valClassMapping: ClassVar[dict[int, type[NVMLError]]] = {}
    value: int

    def __new__(cls, value: int) -> NVMLError:
        target = NVMLError._valClassMapping.get(value, cls) if cls is NVMLError else cls
        obj = Exception.__new__(target)
        obj.value = value
        return obj

    def __str__(self) -> str:
        return _STRINGS.get(self.value, f"NVML Error with code {self.value}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NVMLError) and self.value == other.value

    __hash__ = Exception.__hash__


def _make_error_classes() -> None:
    module = sys.modules[__name__]
    for name in [n for n in dir(module) if n.startswith("NVML_ERROR_")]:
        class_name = "NVMLError_" + string.capwords(
            name.replace("NVML_ERROR_", ""), "_"
        ).replace("_", "")
        value = getattr(module, name)

        def new(cls: type[NVMLError], *args: Any, _v: int = value) -> NVMLError:
            return NVMLError.__new__(cls, _v)

        cls = type(class_name, (NVMLError,), {"__new__": new})
        cls.__module__ = __name__
        setattr(module, class_name, cls)
        NVMLError._valClassMapping[value] = cls


_make_error_classes()


# ---------------------------------------------------------------------------
# the scripted machine


@dataclass
class FakeGpu:
    """One GPU. A gauge given as a list is a timeline: each read takes the next value
    and the last one stays. ``None`` means the GPU does not support that field."""

    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    pci_bus_id: str = "00000000:01:00.0"
    memory_total: int = 85_520_809_984
    memory_used: Any = 0  # bytes
    memory_reserved: int = 0  # what the driver keeps: in "used" for the v1 call only
    utilization_gpu: Any = 0  # percent
    utilization_memory: Any = 0
    temperature: Any = 40  # degrees C
    power_draw_mw: Any = 70_000
    power_limit_mw: int = 700_000
    power_default_limit_mw: int | None = 700_000
    power_min_limit_mw: int | None = 200_000
    power_max_limit_mw: int | None = 700_000
    clock_graphics_mhz: Any = 1980
    clock_sm_mhz: Any = 1980
    clock_memory_mhz: Any = 2619
    performance_state: Any = 0
    fan_percent: Any = None  # data-centre GPUs have no fan to report
    clocks_event_reasons: Any = 0  # a bit mask, as nvml.h defines it
    ecc_uncorrected_volatile: Any = 0
    remapped_rows: Any = (0, 0, 0, 0)  # correctable, uncorrectable, pending, failure
    processes: list[dict[str, Any]] = field(default_factory=list)  # pid, name, used_memory
    lost: bool = False
    errors: dict[str, int] = field(default_factory=dict)
    delays_s: dict[str, Any] = field(default_factory=dict)  # function -> seconds (or a timeline)
    set_limit_calls: list[int] = field(default_factory=list)

    def read(self, attribute: str) -> Any:
        value = _next(getattr(self, attribute))
        if value is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return value

    def delay(self, name: str) -> None:
        """Take as long as the scenario says ``name`` takes on this GPU."""
        if name in self.delays_s:
            time.sleep(float(_next(self.delays_s[name])))


def _next(value: Any) -> Any:
    """A timeline's next value (the last one stays), or the value itself."""
    if isinstance(value, list):
        return value.pop(0) if len(value) > 1 else value[0]
    return value


@dataclass
class FakeMachine:
    driver_version: str = "550.54.15"
    cuda_version: int = 12040
    init_error: int | None = None
    gpus: list[FakeGpu] = field(default_factory=list)
    missing_functions: list[str] = field(default_factory=list)  # an older driver
    init_count: int = 0
    barrier: dict[str, Any] | None = None  # see the module doc
    barrier_passed: set[str] = field(default_factory=set)  # callers past it, by mark


machine = FakeMachine()


def configure(scenario: dict[str, Any]) -> FakeMachine:
    """Replace the machine with one described by ``scenario`` (see module doc)."""
    global machine  # noqa: PLW0603 - the module is the fake machine, as pynvml is one GPU driver
    gpus = [FakeGpu(**g) for g in scenario.get("gpus", [])]
    rest = {k: v for k, v in scenario.items() if k != "gpus"}
    machine = FakeMachine(gpus=gpus, **rest)
    return machine


if os.environ.get("FAKE_NVML_SCENARIO"):
    configure(json.loads(Path(os.environ["FAKE_NVML_SCENARIO"]).read_text(encoding="utf-8")))


class c_nvmlDevice_t:
    def __init__(self, index: int) -> None:
        self.index = index


class c_nvmlMemory_t:
    def __init__(self, total: int, used: int, reserved: int = 0) -> None:
        self.total = total
        self.reserved = reserved
        self.used = used
        self.free = total - used - reserved


nvmlMemory_v2 = 0x2000028  # sizeof(c_nvmlMemory_v2_t) | 2 << 24, as pynvml defines it


class nvmlPciInfo_t:
    def __init__(self, bus_id: str) -> None:
        self.busId = bus_id.encode()  # a c_char array: bytes, as in pynvml
        self.busIdLegacy = self.busId


def _check_function(name: str) -> None:
    if name in machine.missing_functions:
        raise NVMLError(NVML_ERROR_FUNCTION_NOT_FOUND)


def _initialised(name: str) -> None:
    _check_function(name)
    if machine.init_count <= 0:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)


def _stalled() -> None:
    """A hung driver: wait while ``FAKE_NVML_STALL_FILE`` exists."""
    stall = os.environ.get("FAKE_NVML_STALL_FILE")
    while stall and Path(stall).exists():
        time.sleep(0.1)


def _barrier(name: str) -> None:
    """The scenario's barrier (module doc): once per process and thread, at ``at``."""
    barrier = machine.barrier
    if not barrier or barrier.get("at") != name:
        return
    mark = f"{os.getpid()}-{threading.get_ident()}"
    if mark in machine.barrier_passed:
        return
    machine.barrier_passed.add(mark)
    where = Path(barrier["dir"])
    where.mkdir(parents=True, exist_ok=True)
    (where / mark).touch()
    deadline = time.monotonic() + float(barrier.get("timeout_s", 6.0))
    while (len(list(where.iterdir())) < int(barrier.get("parties", 2))
           and time.monotonic() < deadline):
        time.sleep(0.01)


def _gpu(handle: c_nvmlDevice_t, name: str) -> FakeGpu:
    _initialised(name)
    _stalled()
    gpu = machine.gpus[handle.index]
    gpu.delay(name)
    _barrier(name)
    if gpu.lost:
        raise NVMLError(NVML_ERROR_GPU_IS_LOST)
    if name in gpu.errors:
        raise NVMLError(gpu.errors[name])
    return gpu


# ---------------------------------------------------------------------------
# pynvml's functions


def nvmlInit() -> None:
    nvmlInitWithFlags(0)


def nvmlInitWithFlags(flags: int) -> None:
    if machine.init_error is not None:
        raise NVMLError(machine.init_error)
    machine.init_count += 1


def nvmlShutdown() -> None:
    _initialised("nvmlShutdown")
    machine.init_count -= 1


def nvmlErrorString(result: int) -> str:
    return _STRINGS.get(result, "Unknown Error")


def nvmlSystemGetDriverVersion() -> str:
    _initialised("nvmlSystemGetDriverVersion")
    return machine.driver_version


def nvmlSystemGetCudaDriverVersion() -> int:
    _initialised("nvmlSystemGetCudaDriverVersion")
    return machine.cuda_version


def nvmlSystemGetCudaDriverVersion_v2() -> int:
    _initialised("nvmlSystemGetCudaDriverVersion_v2")
    return machine.cuda_version


def nvmlDeviceGetCount() -> int:
    _initialised("nvmlDeviceGetCount")
    return len(machine.gpus)


def nvmlDeviceGetHandleByIndex(index: int) -> c_nvmlDevice_t:
    _initialised("nvmlDeviceGetHandleByIndex")
    _stalled()
    if not 0 <= index < len(machine.gpus):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    gpu = machine.gpus[index]
    if "nvmlDeviceGetHandleByIndex" in gpu.errors:
        raise NVMLError(gpu.errors["nvmlDeviceGetHandleByIndex"])
    return c_nvmlDevice_t(index)


def nvmlDeviceGetName(handle: c_nvmlDevice_t) -> str:
    return _gpu(handle, "nvmlDeviceGetName").name


def nvmlDeviceGetUUID(handle: c_nvmlDevice_t) -> str:
    return _gpu(handle, "nvmlDeviceGetUUID").uuid


def nvmlDeviceGetPciInfo(handle: c_nvmlDevice_t) -> nvmlPciInfo_t:
    return nvmlPciInfo_t(_gpu(handle, "nvmlDeviceGetPciInfo").pci_bus_id)


def nvmlDeviceGetMemoryInfo(handle: c_nvmlDevice_t, version: int | None = None) -> c_nvmlMemory_t:
    gpu = _gpu(handle, "nvmlDeviceGetMemoryInfo")
    used = gpu.read("memory_used")
    if version:
        _check_function("nvmlDeviceGetMemoryInfo_v2")
        return c_nvmlMemory_t(gpu.memory_total, used, gpu.memory_reserved)
    return c_nvmlMemory_t(gpu.memory_total, used + gpu.memory_reserved)


# constants the gauges take (nvml.h)
NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_GRAPHICS = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_AGGREGATE_ECC = 1
nvmlClocksEventReasonGpuIdle = 0x1
nvmlClocksEventReasonApplicationsClocksSetting = 0x2
nvmlClocksEventReasonSwPowerCap = 0x4
nvmlClocksEventReasonHwSlowdown = 0x8
nvmlClocksEventReasonSyncBoost = 0x10
nvmlClocksEventReasonSwThermalSlowdown = 0x20
nvmlClocksEventReasonHwThermalSlowdown = 0x40
nvmlClocksEventReasonHwPowerBrakeSlowdown = 0x80
nvmlClocksEventReasonDisplayClockSetting = 0x100


class c_nvmlUtilization_t:
    def __init__(self, gpu: int, memory: int) -> None:
        self.gpu = gpu
        self.memory = memory


class c_nvmlProcessInfo_t:
    def __init__(self, pid: int, used_memory: int | None) -> None:
        self.pid = pid
        self.usedGpuMemory = used_memory  # None where NVML cannot say (as pynvml gives)
        self.gpuInstanceId = 0xFFFFFFFF
        self.computeInstanceId = 0xFFFFFFFF


def nvmlDeviceGetUtilizationRates(handle: c_nvmlDevice_t) -> c_nvmlUtilization_t:
    gpu = _gpu(handle, "nvmlDeviceGetUtilizationRates")
    return c_nvmlUtilization_t(gpu.read("utilization_gpu"), gpu.read("utilization_memory"))


def nvmlDeviceGetTemperature(handle: c_nvmlDevice_t, sensor: int) -> int:
    if sensor != NVML_TEMPERATURE_GPU:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return int(_gpu(handle, "nvmlDeviceGetTemperature").read("temperature"))


def nvmlDeviceGetPowerUsage(handle: c_nvmlDevice_t) -> int:
    return int(_gpu(handle, "nvmlDeviceGetPowerUsage").read("power_draw_mw"))


def nvmlDeviceGetPowerManagementLimit(handle: c_nvmlDevice_t) -> int:
    return _gpu(handle, "nvmlDeviceGetPowerManagementLimit").power_limit_mw


def nvmlDeviceGetEnforcedPowerLimit(handle: c_nvmlDevice_t) -> int:
    return _gpu(handle, "nvmlDeviceGetEnforcedPowerLimit").power_limit_mw


def nvmlDeviceGetPowerManagementDefaultLimit(handle: c_nvmlDevice_t) -> int:
    return int(_gpu(handle, "nvmlDeviceGetPowerManagementDefaultLimit")
               .read("power_default_limit_mw"))


def nvmlDeviceGetPowerManagementLimitConstraints(handle: c_nvmlDevice_t) -> list[int]:
    gpu = _gpu(handle, "nvmlDeviceGetPowerManagementLimitConstraints")
    return [gpu.read("power_min_limit_mw"), gpu.read("power_max_limit_mw")]


def nvmlDeviceSetPowerManagementLimit(handle: c_nvmlDevice_t, limit: int) -> None:
    gpu = _gpu(handle, "nvmlDeviceSetPowerManagementLimit")
    low, high = gpu.read("power_min_limit_mw"), gpu.read("power_max_limit_mw")
    if not low <= limit <= high:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    gpu.set_limit_calls.append(limit)
    gpu.power_limit_mw = limit
    if os.environ.get("FAKE_NVML_CALLS_LOG"):  # for a test outside this process
        with Path(os.environ["FAKE_NVML_CALLS_LOG"]).open("a") as log:
            log.write(f"{gpu.uuid} {limit}\n")


def nvmlDeviceGetClockInfo(handle: c_nvmlDevice_t, clock_type: int) -> int:
    gpu = _gpu(handle, "nvmlDeviceGetClockInfo")
    names = {NVML_CLOCK_GRAPHICS: "clock_graphics_mhz", NVML_CLOCK_SM: "clock_sm_mhz",
             NVML_CLOCK_MEM: "clock_memory_mhz"}
    if clock_type not in names:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return int(gpu.read(names[clock_type]))


def nvmlDeviceGetPerformanceState(handle: c_nvmlDevice_t) -> int:
    return int(_gpu(handle, "nvmlDeviceGetPerformanceState").read("performance_state"))


def nvmlDeviceGetFanSpeed(handle: c_nvmlDevice_t) -> int:
    return int(_gpu(handle, "nvmlDeviceGetFanSpeed").read("fan_percent"))


def nvmlDeviceGetCurrentClocksEventReasons(handle: c_nvmlDevice_t) -> int:
    return int(_gpu(handle, "nvmlDeviceGetCurrentClocksEventReasons")
               .read("clocks_event_reasons"))


def nvmlDeviceGetCurrentClocksThrottleReasons(handle: c_nvmlDevice_t) -> int:
    return int(_gpu(handle, "nvmlDeviceGetCurrentClocksThrottleReasons")
               .read("clocks_event_reasons"))


def nvmlDeviceGetTotalEccErrors(handle: c_nvmlDevice_t, error_type: int, counter: int) -> int:
    return int(_gpu(handle, "nvmlDeviceGetTotalEccErrors").read("ecc_uncorrected_volatile"))


def nvmlDeviceGetRemappedRows(handle: c_nvmlDevice_t) -> tuple[int, int, int, int]:
    return tuple(_gpu(handle, "nvmlDeviceGetRemappedRows").read("remapped_rows"))


def nvmlDeviceGetComputeRunningProcesses(handle: c_nvmlDevice_t) -> list[c_nvmlProcessInfo_t]:
    gpu = _gpu(handle, "nvmlDeviceGetComputeRunningProcesses")
    return [c_nvmlProcessInfo_t(p["pid"], p.get("used_memory")) for p in gpu.processes]


def nvmlSystemGetProcessName(pid: int) -> str:
    _initialised("nvmlSystemGetProcessName")
    for gpu in machine.gpus:
        for process in gpu.processes:
            if process["pid"] == pid:
                return str(process.get("name", ""))
    raise NVMLError(NVML_ERROR_NOT_FOUND)
