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

``machine.calls`` counts the per-device calls by function name (and the GPM calls),
for a test that checks what is asked how often.

Knobs for a test watching another process:

* ``FAKE_NVML_CALLS_LOG=<path>``: power limits set are appended there, one
  "UUID MILLIWATTS" line each;
* ``FAKE_NVML_XID_FILE=<path>``: XIDs for the event API, one "INDEX XID" line each,
  appended by the test; each is consumed once (see ``inject_xid``);
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

import ctypes
import json
import os
import string
import sys
import threading
import time
from collections import Counter
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
    graphics_processes: list[dict[str, Any]] = field(default_factory=list)  # the same keys
    energy_mj: Any = 0  # nvmlDeviceGetTotalEnergyConsumption: mJ since the driver loaded
    encoder_utilization: Any = 0  # percent
    decoder_utilization: Any = 0
    memory_temperature: Any = 45  # degrees C (field NVML_FI_DEV_MEMORY_TEMP)
    pcie_replay_count: Any = 0
    nvlink_tx_kib: Any = None  # all links' data counters (None: no NVLink); KiB, as NVML
    nvlink_rx_kib: Any = None
    # GPM (Hopper and newer): None, not supported; else metric name (the part after
    # NVML_GPM_METRIC_, e.g. "GRAPHICS_UTIL") -> percent busy between two GPM samples, a
    # gauge or a timeline taken by each nvmlGpmSampleGet
    gpm: dict[str, Any] | None = None
    gpm_ticks: int = 0  # GPM samples taken: the fake's clock for its activity counters
    gpm_active: dict[str, float] = field(default_factory=dict)  # metric -> percent-ticks
    # nvmlDeviceGetSupportedEventTypes' mask (None: NOT_SUPPORTED): single/double-bit ECC,
    # P-state, XID, clock (what a data-centre GPU reports); see the event API below
    supported_event_types: Any = 0x1 | 0x2 | 0x4 | 0x8 | 0x10
    # nvmlDeviceGetFieldValues: FakeGpu attribute -> the valueType the driver answers it in
    # (a driver that hands a double, or a type pynvml does not know; the value as it is)
    field_value_types: dict[str, int] = field(default_factory=dict)
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
    calls: Counter[str] = field(default_factory=Counter)  # per-device calls, by function
    gpm_samples: dict[int, tuple[int, int, dict[str, float]] | None] = field(
        default_factory=dict)  # allocated GPM samples: id -> (GPU index, tick, counters)


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
    machine.calls[name] += 1  # every call asked, answered or not
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


def nvmlDeviceGetIndex(handle: c_nvmlDevice_t) -> int:
    if not 0 <= handle.index < len(machine.gpus):  # a handle of a GPU no longer there
        machine.calls["nvmlDeviceGetIndex"] += 1
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    _gpu(handle, "nvmlDeviceGetIndex")
    return handle.index


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


class NVMLLibraryMismatchError(Exception):
    """pynvml's unversioned process calls raise it (not an NVMLError) when the driver
    lacks their _v3: an older driver has the _v2 call only."""


def _versioned(name: str) -> None:
    if f"{name}_v3" in machine.missing_functions:
        raise NVMLLibraryMismatchError(f"Unversioned function called ... such as {name}_v2")


def nvmlDeviceGetComputeRunningProcesses(handle: c_nvmlDevice_t) -> list[c_nvmlProcessInfo_t]:
    _versioned("nvmlDeviceGetComputeRunningProcesses")
    return nvmlDeviceGetComputeRunningProcesses_v2(handle)


def nvmlDeviceGetComputeRunningProcesses_v2(handle: c_nvmlDevice_t
                                            ) -> list[c_nvmlProcessInfo_t]:
    gpu = _gpu(handle, "nvmlDeviceGetComputeRunningProcesses")
    return [c_nvmlProcessInfo_t(p["pid"], p.get("used_memory")) for p in gpu.processes]


def nvmlSystemGetProcessName(pid: int) -> str:
    _initialised("nvmlSystemGetProcessName")
    for gpu in machine.gpus:
        for process in gpu.processes + gpu.graphics_processes:
            if process["pid"] == pid:
                return str(process.get("name", ""))
    raise NVMLError(NVML_ERROR_NOT_FOUND)


# ---------------------------------------------------------------------------
# energy, encoder/decoder, field values, PCIe replays, graphics processes


def nvmlDeviceGetTotalEnergyConsumption(handle: c_nvmlDevice_t) -> int:
    return int(_gpu(handle, "nvmlDeviceGetTotalEnergyConsumption").read("energy_mj"))


def nvmlDeviceGetEncoderUtilization(handle: c_nvmlDevice_t) -> list[int]:
    gpu = _gpu(handle, "nvmlDeviceGetEncoderUtilization")
    return [int(gpu.read("encoder_utilization")), 167_000]  # [percent, sampling period us]


def nvmlDeviceGetDecoderUtilization(handle: c_nvmlDevice_t) -> list[int]:
    gpu = _gpu(handle, "nvmlDeviceGetDecoderUtilization")
    return [int(gpu.read("decoder_utilization")), 167_000]


def nvmlDeviceGetPcieReplayCounter(handle: c_nvmlDevice_t) -> int:
    return int(_gpu(handle, "nvmlDeviceGetPcieReplayCounter").read("pcie_replay_count"))


def nvmlDeviceGetGraphicsRunningProcesses(handle: c_nvmlDevice_t) -> list[c_nvmlProcessInfo_t]:
    _versioned("nvmlDeviceGetGraphicsRunningProcesses")
    return nvmlDeviceGetGraphicsRunningProcesses_v2(handle)


def nvmlDeviceGetGraphicsRunningProcesses_v2(handle: c_nvmlDevice_t
                                             ) -> list[c_nvmlProcessInfo_t]:
    gpu = _gpu(handle, "nvmlDeviceGetGraphicsRunningProcesses")
    return [c_nvmlProcessInfo_t(p["pid"], p.get("used_memory")) for p in gpu.graphics_processes]


NVML_VALUE_TYPE_DOUBLE = 0
NVML_VALUE_TYPE_UNSIGNED_INT = 1
NVML_VALUE_TYPE_UNSIGNED_LONG = 2
NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = 3
NVML_VALUE_TYPE_SIGNED_LONG_LONG = 4
NVML_VALUE_TYPE_SIGNED_INT = 5
NVML_VALUE_TYPE_UNSIGNED_SHORT = 6
NVML_FI_DEV_MEMORY_TEMP = 82
NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX = 138  # KiB; scopeId: a link, or UINT_MAX for all
NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX = 139


class c_nvmlValue_t(ctypes.Union):
    _fields_ = [("dVal", ctypes.c_double), ("uiVal", ctypes.c_uint), ("ulVal", ctypes.c_ulong),
                ("ullVal", ctypes.c_ulonglong), ("sllVal", ctypes.c_longlong),
                ("siVal", ctypes.c_int), ("usVal", ctypes.c_ushort)]


class c_nvmlFieldValue_t(ctypes.Structure):
    _fields_ = [("fieldId", ctypes.c_uint32), ("scopeId", ctypes.c_uint32),
                ("timestamp", ctypes.c_int64), ("latencyUsec", ctypes.c_int64),
                ("valueType", ctypes.c_uint), ("nvmlReturn", ctypes.c_uint),
                ("value", c_nvmlValue_t)]


_VALUE_MEMBERS = {NVML_VALUE_TYPE_DOUBLE: "dVal", NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
                  NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
                  NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
                  NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal", NVML_VALUE_TYPE_SIGNED_INT: "siVal",
                  NVML_VALUE_TYPE_UNSIGNED_SHORT: "usVal"}
_ALL_LINKS = 0xFFFFFFFF  # UINT_MAX: "summed up across all links" (nvml.h)


def nvmlDeviceGetFieldValues(handle: c_nvmlDevice_t, fieldIds: Any) -> Any:
    """pynvml's shape: a ctypes array of c_nvmlFieldValue_t, one per id asked (an id, or a
    ``(fieldId, scopeId)`` tuple), each with its own ``nvmlReturn``. The fake knows the
    memory temperature and the NVLink data counters summed over all links."""
    gpu = _gpu(handle, "nvmlDeviceGetFieldValues")
    values = (c_nvmlFieldValue_t * len(fieldIds))()
    for i, field_id in enumerate(fieldIds):
        value = values[i]
        try:
            (value.fieldId, value.scopeId) = field_id
        except TypeError:
            value.fieldId = field_id
        value.timestamp = int(time.time() * 1e6)
        known = {NVML_FI_DEV_MEMORY_TEMP: ("memory_temperature", NVML_VALUE_TYPE_UNSIGNED_INT,
                                           "uiVal")}
        if value.scopeId == _ALL_LINKS:  # the fake models the sum over links only
            known[NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX] = (
                "nvlink_tx_kib", NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, "ullVal")
            known[NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX] = (
                "nvlink_rx_kib", NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, "ullVal")
        if value.fieldId not in known:
            value.nvmlReturn = NVML_ERROR_NOT_SUPPORTED
            continue
        attribute, kind, _ = known[value.fieldId]
        reading = _next(getattr(gpu, attribute))
        if reading is None:
            value.nvmlReturn = NVML_ERROR_NOT_SUPPORTED
            continue
        kind = gpu.field_value_types.get(attribute, kind)
        value.valueType = kind
        if kind == NVML_VALUE_TYPE_DOUBLE:
            value.value.dVal = float(reading)
        else:  # the member of that type; a type pynvml does not know: 64 bits as they are
            setattr(value.value, _VALUE_MEMBERS.get(kind, "ullVal"), int(reading))
        value.nvmlReturn = NVML_SUCCESS
    return values


# ---------------------------------------------------------------------------
# GPU Performance Monitoring (nvmlGpm*): two samples, then the metrics between them

NVML_GPM_METRIC_GRAPHICS_UTIL = 1
NVML_GPM_METRIC_SM_UTIL = 2
NVML_GPM_METRIC_SM_OCCUPANCY = 3
NVML_GPM_METRIC_ANY_TENSOR_UTIL = 5
NVML_GPM_METRIC_DRAM_BW_UTIL = 10
NVML_GPM_METRICS_GET_VERSION = 1
NVML_GPM_SUPPORT_VERSION = 1
_GPM_METRIC_MAX = 477  # pynvml's NVML_GPM_METRIC_MAX, which grows with its versions
_GPM_NAMES = {value: name.removeprefix("NVML_GPM_METRIC_")
              for name, value in list(globals().items()) if name.startswith("NVML_GPM_METRIC_")}


class struct_c_nvmlGpmSample_t(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint)]  # opaque in pynvml; the fake's id for its records


c_nvmlGpmSample_t = ctypes.POINTER(struct_c_nvmlGpmSample_t)


class c_metricInfo_t(ctypes.Structure):
    _fields_ = [("shortName", ctypes.c_char_p), ("longName", ctypes.c_char_p),
                ("unit", ctypes.c_char_p)]


class c_nvmlGpmMetric_t(ctypes.Structure):
    _fields_ = [("metricId", ctypes.c_uint), ("nvmlReturn", ctypes.c_uint),
                ("value", ctypes.c_double), ("metricInfo", c_metricInfo_t)]


class c_nvmlGpmMetricsGet_t(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint), ("numMetrics", ctypes.c_uint),
                ("sample1", c_nvmlGpmSample_t), ("sample2", c_nvmlGpmSample_t),
                ("metrics", c_nvmlGpmMetric_t * _GPM_METRIC_MAX)]


class c_nvmlGpmSupport_t(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint), ("isSupportedDevice", ctypes.c_uint)]


def nvmlGpmQueryDeviceSupport(device: c_nvmlDevice_t) -> c_nvmlGpmSupport_t:
    gpu = _gpu(device, "nvmlGpmQueryDeviceSupport")
    return c_nvmlGpmSupport_t(NVML_GPM_SUPPORT_VERSION, int(gpu.gpm is not None))


def nvmlGpmSampleAlloc() -> Any:
    machine.calls["nvmlGpmSampleAlloc"] += 1
    _initialised("nvmlGpmSampleAlloc")
    sample_id = max(machine.gpm_samples, default=0) + 1
    machine.gpm_samples[sample_id] = None
    return c_nvmlGpmSample_t(struct_c_nvmlGpmSample_t(sample_id))


def _gpm_sample_id(sample: Any) -> int:
    if not sample or sample.contents.id not in machine.gpm_samples:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)  # freed, or never allocated
    return int(sample.contents.id)


def nvmlGpmSampleGet(device: c_nvmlDevice_t, gpmSample: Any) -> Any:
    """Records where the GPU's activity counters are now: each metric's percent (the next
    of its timeline) counts for one tick since the previous sample of this GPU."""
    gpu = _gpu(device, "nvmlGpmSampleGet")
    sample_id = _gpm_sample_id(gpmSample)
    if gpu.gpm is None:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    gpu.gpm_ticks += 1
    for name, percent in gpu.gpm.items():
        gpu.gpm_active[name] = gpu.gpm_active.get(name, 0.0) + float(_next(percent))
    machine.gpm_samples[sample_id] = (device.index, gpu.gpm_ticks, dict(gpu.gpm_active))
    return gpmSample


def nvmlGpmMetricsGet(metricsGet: c_nvmlGpmMetricsGet_t) -> c_nvmlGpmMetricsGet_t:
    machine.calls["nvmlGpmMetricsGet"] += 1
    _initialised("nvmlGpmMetricsGet")
    if metricsGet.version != NVML_GPM_METRICS_GET_VERSION or \
            not 0 < metricsGet.numMetrics <= _GPM_METRIC_MAX:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    first = machine.gpm_samples[_gpm_sample_id(metricsGet.sample1)]
    second = machine.gpm_samples[_gpm_sample_id(metricsGet.sample2)]
    if first is None or second is None or first[0] != second[0] or first[1] == second[1]:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)  # not taken, two GPUs, or the same one
    gpu = machine.gpus[second[0]]
    if gpu.lost:
        raise NVMLError(NVML_ERROR_GPU_IS_LOST)
    ticks = second[1] - first[1]
    for i in range(metricsGet.numMetrics):
        metric = metricsGet.metrics[i]
        name = _GPM_NAMES.get(metric.metricId)
        if name is None or name not in second[2]:
            metric.nvmlReturn = NVML_ERROR_NOT_SUPPORTED
            continue
        metric.value = (second[2][name] - first[2].get(name, 0.0)) / ticks
        metric.nvmlReturn = NVML_SUCCESS
    return metricsGet


def nvmlGpmSampleFree(gpmSample: Any) -> None:
    _initialised("nvmlGpmSampleFree")
    del machine.gpm_samples[_gpm_sample_id(gpmSample)]


# ---------------------------------------------------------------------------
# the event API (XIDs)
#
# As pynvml has it: nvmlEventSetCreate, nvmlDeviceGetSupportedEventTypes,
# nvmlDeviceRegisterEvents (NOT_SUPPORTED for a type the GPU does not report),
# nvmlEventSetWait_v2(set, timeoutms), which blocks up to the timeout and then raises
# NVMLError(NVML_ERROR_TIMEOUT), GPU_IS_LOST while a GPU registered in the set is lost,
# and a registered GPU's ``errors["nvmlEventSetWait_v2"]``; nvmlEventSetFree. An event's
# ``device`` is the handle that was registered, as NVML gives it back.
#
# A test feeds XIDs in with ``inject_xid(index, xid)`` (in-process) or by appending
# "INDEX XID" lines to FAKE_NVML_XID_FILE (from another process). An XID reaches every
# set that has its GPU registered for XID events, once; one that no set listens for is
# lost, as on a real node (a line of the file waits until a set of this process listens).

nvmlEventTypeSingleBitEccError = 0x0000000000000001
nvmlEventTypeDoubleBitEccError = 0x0000000000000002
nvmlEventTypePState = 0x0000000000000004
nvmlEventTypeXidCriticalError = 0x0000000000000008
nvmlEventTypeClock = 0x0000000000000010
nvmlEventTypePowerSourceChange = 0x0000000000000080
nvmlEventMigConfigChange = 0x0000000000000100
nvmlEventTypeNone = 0x0000000000000000


class c_nvmlEventSet_t:
    """An event set: the GPUs registered in it (index -> (handle, event mask)) and the
    events waiting to be taken."""

    def __init__(self) -> None:
        self.registered: dict[int, tuple[c_nvmlDevice_t, int]] = {}
        self.pending: list[tuple[int, int, int]] = []  # (index, event type, data)
        self.freed = False


class c_nvmlEventData_t:
    def __init__(self, device: c_nvmlDevice_t, eventType: int, eventData: int) -> None:
        self.device = device
        self.eventType = eventType
        self.eventData = eventData
        self.gpuInstanceId = 0xFFFFFFFF
        self.computeInstanceId = 0xFFFFFFFF


_events = threading.Condition()
event_sets: list[c_nvmlEventSet_t] = []  # the live ones (not freed), for tests to look at
_xid_file_offset = 0


def _live(eventSet: c_nvmlEventSet_t) -> None:
    if not isinstance(eventSet, c_nvmlEventSet_t) or eventSet.freed:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)


def xid_listeners(index: int) -> int:
    """How many live sets take GPU ``index``'s XIDs now."""
    with _events:
        return sum(1 for s in event_sets
                   if s.registered.get(index, (None, 0))[1] & nvmlEventTypeXidCriticalError)


def inject_xid(index: int, xid: int) -> int:
    """The driver reports XID ``xid`` on GPU ``index``: to every set that listens for it;
    how many did."""
    with _events:
        heard = _deliver(index, xid)
        _events.notify_all()
    return heard


def _deliver(index: int, xid: int) -> int:
    heard = 0
    for s in event_sets:
        if s.registered.get(index, (None, 0))[1] & nvmlEventTypeXidCriticalError:
            s.pending.append((index, nvmlEventTypeXidCriticalError, xid))
            heard += 1
    return heard


def _take_xid_file() -> None:
    """New "INDEX XID" lines of FAKE_NVML_XID_FILE, each delivered once, in order; a line
    for a GPU no set listens to yet waits (under ``_events``)."""
    global _xid_file_offset  # noqa: PLW0603 - the fake driver's read position
    name = os.environ.get("FAKE_NVML_XID_FILE")
    if not name:
        return
    try:
        data = Path(name).read_bytes()[_xid_file_offset:]
    except FileNotFoundError:
        return
    while b"\n" in data:
        line, data = data.split(b"\n", 1)
        fields = line.split()
        if (len(fields) == 2 and all(f.isdigit() for f in fields)
                and not _deliver(int(fields[0]), int(fields[1]))):
            return
        _xid_file_offset += len(line) + 1


def nvmlEventSetCreate() -> c_nvmlEventSet_t:
    _initialised("nvmlEventSetCreate")
    created = c_nvmlEventSet_t()
    with _events:
        event_sets.append(created)
    return created


def nvmlDeviceGetSupportedEventTypes(handle: c_nvmlDevice_t) -> int:
    return int(_gpu(handle, "nvmlDeviceGetSupportedEventTypes").read("supported_event_types"))


def nvmlDeviceRegisterEvents(handle: c_nvmlDevice_t, eventTypes: int,
                             eventSet: c_nvmlEventSet_t) -> None:
    gpu = _gpu(handle, "nvmlDeviceRegisterEvents")
    _live(eventSet)
    supported = gpu.read("supported_event_types")
    if eventTypes & ~int(supported):
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    with _events:
        _, mask = eventSet.registered.get(handle.index, (handle, 0))
        eventSet.registered[handle.index] = (handle, mask | eventTypes)


def nvmlEventSetWait_v2(eventSet: c_nvmlEventSet_t, timeoutms: int) -> c_nvmlEventData_t:
    _initialised("nvmlEventSetWait_v2")
    _live(eventSet)
    for index in list(eventSet.registered):  # a driver slow to answer (delays_s): no timeout
        if index < len(machine.gpus):
            machine.gpus[index].delay("nvmlEventSetWait_v2")
    deadline = time.monotonic() + timeoutms / 1000
    with _events:
        while True:
            for index in eventSet.registered:
                gpu = machine.gpus[index] if index < len(machine.gpus) else None
                if gpu is None or gpu.lost:
                    raise NVMLError(NVML_ERROR_GPU_IS_LOST)
                if "nvmlEventSetWait_v2" in gpu.errors:
                    raise NVMLError(gpu.errors["nvmlEventSetWait_v2"])
            _take_xid_file()
            if eventSet.pending:
                index, kind, data = eventSet.pending.pop(0)
                return c_nvmlEventData_t(eventSet.registered[index][0], kind, data)
            left = deadline - time.monotonic()
            if left <= 0:
                raise NVMLError(NVML_ERROR_TIMEOUT)
            # the file is looked at every 50 ms; inject_xid wakes the wait at once
            _events.wait(min(left, 0.05) if os.environ.get("FAKE_NVML_XID_FILE") else left)


def nvmlEventSetWait(eventSet: c_nvmlEventSet_t, timeoutms: int) -> c_nvmlEventData_t:
    return nvmlEventSetWait_v2(eventSet, timeoutms)


def nvmlEventSetFree(eventSet: c_nvmlEventSet_t) -> None:
    _initialised("nvmlEventSetFree")
    with _events:
        _live(eventSet)
        eventSet.freed = True
        event_sets.remove(eventSet)
