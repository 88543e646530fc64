"""The one NVML layer: lazy init, cached handles, "not available" instead of tracebacks.

Everything NVIDIA goes through :class:`Nvml`. It imports ``pynvml``
(nvidia-ml-py) only when first asked, so a host without the driver pays
nothing at start-up; it initialises NVML once; and a missing library, an
unloaded driver or zero GPUs is a normal degraded state with a reason an
operator can act on. A field the GPU does not support is ``None``; a GPU that
fell off the bus is reported as lost while the others keep working.

The ``module`` argument lets tests hand in a stand-in with pynvml's names
and error classes (tests/fakes); production code never passes it.
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str | None
    uuid: str | None
    pci_bus_id: str | None
    memory_total_bytes: int | None
    lost: bool = False
    error: str | None = None  # why a field could not be read


@dataclass(frozen=True)
class GpuInventory:
    gpus: tuple[GpuInfo, ...]
    driver_version: str | None
    cuda_driver_version: str | None  # "12.4": the newest CUDA the driver supports
    reason: str | None  # why there are no GPUs, when there are none
    fix: str | None = None

    @property
    def available(self) -> bool:
        return bool(self.gpus)

    @property
    def memory_total_bytes(self) -> int:
        return sum(g.memory_total_bytes or 0 for g in self.gpus if not g.lost)


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    name: str | None
    used_mib: int | None  # None where NVML cannot say (some vGPU and MIG setups)


@dataclass(frozen=True)
class GpuSample:
    """One GPU at one moment. ``None``: the GPU or driver does not report it."""

    index: int
    name: str | None
    uuid: str | None
    pci_bus_id: str | None
    lost: bool
    error: str | None  # fields that failed, and why
    utilization_gpu_percent: int | None = None
    utilization_memory_percent: int | None = None
    memory_total_mib: int | None = None
    memory_used_mib: int | None = None
    memory_free_mib: int | None = None
    temperature_c: int | None = None
    power_draw_w: float | None = None
    power_limit_w: float | None = None
    power_default_limit_w: float | None = None
    power_min_limit_w: float | None = None
    power_max_limit_w: float | None = None
    clock_graphics_mhz: int | None = None
    clock_sm_mhz: int | None = None
    clock_memory_mhz: int | None = None
    performance_state: int | None = None  # 0 (P0, fastest) .. 15
    fan_percent: int | None = None
    clock_event_reasons: tuple[str, ...] | None = None  # why clocks are held down now
    ecc_uncorrected_volatile: int | None = None  # since the driver loaded
    remapped_rows_uncorrectable: int | None = None
    remapped_rows_pending: bool | None = None  # a remap waits for a GPU reset
    processes: tuple[GpuProcess, ...] | None = None  # None: not read in this sample

    @property
    def memory_used_percent(self) -> float | None:
        if self.memory_used_mib is None or not self.memory_total_mib:
            return None
        return 100.0 * self.memory_used_mib / self.memory_total_mib


@dataclass(frozen=True)
class GpuSnapshot:
    gpus: tuple[GpuSample, ...]
    driver_version: str | None
    reason: str | None  # why there are no GPUs, when there are none
    fix: str | None
    sampled_at: float  # time.time()


# nvml.h's clock event reasons (formerly "throttle reasons"), bit -> name
CLOCK_EVENT_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}


MIB = 2**20


@functools.lru_cache(maxsize=64)
def _reasons(mask: int) -> tuple[str, ...]:
    return decode_clock_event_reasons(mask)


def decode_clock_event_reasons(mask: int) -> tuple[str, ...]:
    names = [name for bit, name in CLOCK_EVENT_REASONS.items() if mask & bit]
    unknown = mask & ~sum(CLOCK_EVENT_REASONS)
    if unknown:
        names.append(f"other_0x{unknown:x}")
    return tuple(names)


@dataclass
class _Static:
    """What does not change while the driver is loaded: read once per GPU."""

    handle: Any
    name: str | None
    uuid: str | None
    pci_bus_id: str | None
    power_default_limit_w: float | None
    power_min_limit_w: float | None
    power_max_limit_w: float | None
    unsupported: set[tuple[Any, ...]]  # calls answered NotSupported: not asked again
    memory_version: int | None  # nvmlMemory_v2 where the driver has it (used w/o reserved)


# NVML return codes (nvml.h); the same values pynvml exports as NVML_ERROR_*.
_NOT_SUPPORTED = 3
_NO_PERMISSION = 4
_DRIVER_NOT_LOADED = 9
_LIBRARY_NOT_FOUND = 12
_FUNCTION_NOT_FOUND = 13
_GPU_IS_LOST = 15
_LIB_RM_VERSION_MISMATCH = 18
_UNKNOWN = 999

_INIT_REASONS: dict[int, tuple[str, str]] = {
    _LIBRARY_NOT_FOUND: (
        "no NVIDIA driver: libnvidia-ml.so.1 was not found",
        "install the NVIDIA driver if this node has an NVIDIA GPU",
    ),
    _DRIVER_NOT_LOADED: (
        "the NVIDIA kernel driver is not loaded",
        "load it (modprobe nvidia) or reboot after installing the driver",
    ),
    _NO_PERMISSION: (
        "no permission to open the NVIDIA devices (/dev/nvidia*)",
        "run as root or add the user to the group that owns /dev/nvidia*",
    ),
    _LIB_RM_VERSION_MISMATCH: (
        "the NVML library and the loaded kernel driver differ (driver updated without reboot)",
        "reboot, or reload the nvidia kernel modules",
    ),
}


class Nvml:
    """NVML, initialised on first use and shut down explicitly."""

    def __init__(self, module: ModuleType | None = None) -> None:
        self._module = module
        self._lock = threading.Lock()
        self._initialised = False
        self._failure: tuple[str, str | None] | None = None
        self._static: dict[int, _Static] = {}
        self._driver: str | None = None
        self._count: int | None = None
        self._reasons_fn: Any = None  # the clock-event call this driver has

    # -- life cycle ---------------------------------------------------------

    def _nvml(self) -> Any:
        """The initialised pynvml module, or None with ``self._failure`` set."""
        with self._lock:
            if self._initialised:
                return self._module
            if self._failure is not None:
                return None
            if self._module is None:
                try:
                    self._module = importlib.import_module("pynvml")
                except ImportError:
                    self._failure = (
                        "nvidia-ml-py (pynvml) is not installed",
                        "reinstall clusterctl (install.sh) so its dependencies are present",
                    )
                    return None
            nv: Any = self._module
            try:
                nv.nvmlInit()
            except nv.NVMLError as err:
                reason, fix = _INIT_REASONS.get(
                    err.value, (f"NVML failed to initialise: {err}", None)
                )
                self._failure = (reason, fix)
                log.debug("NVML unavailable: %s", reason)
                return None
            self._initialised = True
            return nv

    def shutdown(self) -> None:
        with self._lock:
            self._static.clear()
            self._count = None
            if self._initialised:
                nv: Any = self._module
                try:
                    nv.nvmlShutdown()
                except nv.NVMLError as err:
                    log.debug("nvmlShutdown failed: %s", err)
                self._initialised = False

    def __enter__(self) -> Nvml:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- queries ------------------------------------------------------------

    def inventory(self) -> GpuInventory:
        """The GPUs, their names and VRAM, and the driver; never raises for NVML errors."""
        nv = self._nvml()
        if nv is None:
            assert self._failure is not None
            reason, fix = self._failure
            return GpuInventory((), None, None, reason=reason, fix=fix)
        driver = self._optional(nv, nv.nvmlSystemGetDriverVersion)
        cuda = self._optional(nv, nv.nvmlSystemGetCudaDriverVersion_v2)
        if cuda is None:
            cuda = self._optional(nv, nv.nvmlSystemGetCudaDriverVersion)
        cuda_text = f"{cuda // 1000}.{cuda % 1000 // 10}" if isinstance(cuda, int) else None
        try:
            count = nv.nvmlDeviceGetCount()
        except nv.NVMLError as err:
            return GpuInventory(
                (), driver, cuda_text, reason=f"NVML could not count GPUs: {err}", fix=None
            )
        gpus = tuple(self._device_info(nv, index) for index in range(count))
        no_gpu = None if gpus else "the NVIDIA driver is loaded but reports no GPU"
        return GpuInventory(gpus, driver, cuda_text, reason=no_gpu)

    def _device_info(self, nv: Any, index: int) -> GpuInfo:
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(index)
        except nv.NVMLError as err:
            lost = err.value in (_GPU_IS_LOST, _UNKNOWN)
            return GpuInfo(index, None, None, None, None, lost=lost, error=_describe(err))
        errors: list[str] = []
        lost = False

        def read(fn: Any, *args: Any) -> Any:
            nonlocal lost
            try:
                return fn(handle, *args)
            except nv.NVMLError as err:
                if err.value in (_NOT_SUPPORTED, _FUNCTION_NOT_FOUND):
                    return None
                if err.value in (_GPU_IS_LOST, _UNKNOWN):
                    lost = True
                errors.append(f"{fn.__name__}: {_describe(err)}")
                return None

        name = read(nv.nvmlDeviceGetName)
        uuid = read(nv.nvmlDeviceGetUUID)
        pci = read(nv.nvmlDeviceGetPciInfo)
        memory = read(nv.nvmlDeviceGetMemoryInfo)
        return GpuInfo(
            index=index,
            name=_text(name),
            uuid=_text(uuid),
            pci_bus_id=_text(getattr(pci, "busId", None)),
            memory_total_bytes=int(memory.total) if memory is not None else None,
            lost=lost,
            error="; ".join(errors) or None,
        )

    # -- sampling -----------------------------------------------------------

    def available(self) -> bool:
        return self._nvml() is not None

    def failure(self) -> tuple[str, str | None] | None:
        """(reason, fix) when NVML could not be used."""
        self._nvml()
        return self._failure

    def handle(self, index: int) -> Any:
        """The cached NVML handle of GPU ``index`` (for clusterctl.system's writes)."""
        nv = self._nvml()
        if nv is None:
            raise RuntimeError("NVML is not available")
        return self._static_of(nv, index).handle

    def module(self) -> Any:
        return self._nvml()

    def sample(self, *, processes: bool = False, now: float | None = None) -> GpuSnapshot:
        """Every GPU's gauges now; processes too when asked (a slower read)."""
        stamp = time.time() if now is None else now
        nv = self._nvml()
        if nv is None:
            assert self._failure is not None
            return GpuSnapshot((), None, self._failure[0], self._failure[1], stamp)
        if self._count is None:
            try:
                self._count = nv.nvmlDeviceGetCount()
            except nv.NVMLError as err:
                return GpuSnapshot((), None, f"NVML could not count GPUs: {err}", None, stamp)
            self._driver = _text(self._optional(nv, nv.nvmlSystemGetDriverVersion))
        gpus = tuple(self._sample_one(nv, i, processes) for i in range(self._count))
        reason = None if gpus else "the NVIDIA driver is loaded but reports no GPU"
        return GpuSnapshot(gpus, self._driver, reason, None, stamp)

    def _static_of(self, nv: Any, index: int) -> _Static:
        cached = self._static.get(index)
        if cached is not None:
            return cached
        handle = nv.nvmlDeviceGetHandleByIndex(index)

        def quiet(fn: Any) -> Any:
            try:
                return fn(handle)
            except nv.NVMLError as err:
                if err.value in (_GPU_IS_LOST, _UNKNOWN):
                    raise
                return None

        constraints = quiet(nv.nvmlDeviceGetPowerManagementLimitConstraints)
        low, high = constraints if constraints else (None, None)
        static = _Static(
            handle=handle,
            name=_text(quiet(nv.nvmlDeviceGetName)),
            uuid=_text(quiet(nv.nvmlDeviceGetUUID)),
            pci_bus_id=_text(getattr(quiet(nv.nvmlDeviceGetPciInfo), "busId", None)),
            power_default_limit_w=_watts(quiet(nv.nvmlDeviceGetPowerManagementDefaultLimit)),
            power_min_limit_w=_watts(low),
            power_max_limit_w=_watts(high),
            unsupported=set(),
            memory_version=self._memory_version(nv, handle),
        )
        self._static[index] = static
        return static

    def _sample_one(self, nv: Any, index: int, processes: bool) -> GpuSample:
        try:
            static = self._static_of(nv, index)
        except nv.NVMLError as err:
            lost = err.value in (_GPU_IS_LOST, _UNKNOWN)
            return GpuSample(index, None, None, None, lost=lost, error=_describe(err))
        errors: list[str] = []
        lost = False
        handle, unsupported = static.handle, static.unsupported

        def read(fn: Any, *args: Any) -> Any:
            nonlocal lost
            key = (fn.__name__, *args)
            if lost or key in unsupported:
                return None
            try:
                return fn(handle, *args)
            except nv.NVMLError as err:
                if err.value in (_NOT_SUPPORTED, _FUNCTION_NOT_FOUND):
                    unsupported.add(key)  # a capability of this GPU: not asked again
                    return None
                if err.value in (_GPU_IS_LOST, _UNKNOWN):
                    lost = True
                errors.append(f"{fn.__name__}: {_describe(err)}")
                return None

        util = read(nv.nvmlDeviceGetUtilizationRates)
        memory = (read(nv.nvmlDeviceGetMemoryInfo, static.memory_version)
                  if static.memory_version else read(nv.nvmlDeviceGetMemoryInfo))
        temperature = read(nv.nvmlDeviceGetTemperature, nv.NVML_TEMPERATURE_GPU)
        power_draw = read(nv.nvmlDeviceGetPowerUsage)
        power_limit = read(nv.nvmlDeviceGetPowerManagementLimit)
        clock_graphics = read(nv.nvmlDeviceGetClockInfo, nv.NVML_CLOCK_GRAPHICS)
        clock_sm = read(nv.nvmlDeviceGetClockInfo, nv.NVML_CLOCK_SM)
        clock_memory = read(nv.nvmlDeviceGetClockInfo, nv.NVML_CLOCK_MEM)
        pstate = read(nv.nvmlDeviceGetPerformanceState)
        fan = read(nv.nvmlDeviceGetFanSpeed)
        reasons = read(self._clock_reasons_fn(nv, handle))
        ecc = read(nv.nvmlDeviceGetTotalEccErrors, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                   nv.NVML_VOLATILE_ECC)
        remapped = read(nv.nvmlDeviceGetRemappedRows)
        processes_now = self._processes(nv, handle, read) if processes else None
        if lost:
            self._static.pop(index, None)  # look the handle up again next time
            return GpuSample(index, static.name, static.uuid, static.pci_bus_id, lost=True,
                             error="; ".join(errors))
        return GpuSample(
            index=index, name=static.name, uuid=static.uuid, pci_bus_id=static.pci_bus_id,
            lost=False, error="; ".join(errors) or None,
            utilization_gpu_percent=None if util is None else int(util.gpu),
            utilization_memory_percent=None if util is None else int(util.memory),
            memory_total_mib=None if memory is None else int(memory.total) // MIB,
            memory_used_mib=None if memory is None else int(memory.used) // MIB,
            memory_free_mib=None if memory is None else int(memory.free) // MIB,
            temperature_c=_int(temperature),
            power_draw_w=_watts(power_draw),
            power_limit_w=_watts(power_limit),
            power_default_limit_w=static.power_default_limit_w,
            power_min_limit_w=static.power_min_limit_w,
            power_max_limit_w=static.power_max_limit_w,
            clock_graphics_mhz=_int(clock_graphics),
            clock_sm_mhz=_int(clock_sm),
            clock_memory_mhz=_int(clock_memory),
            performance_state=_int(pstate),
            fan_percent=_int(fan),
            clock_event_reasons=None if reasons is None else _reasons(int(reasons)),
            ecc_uncorrected_volatile=_int(ecc),
            remapped_rows_uncorrectable=None if remapped is None else int(remapped[1]),
            remapped_rows_pending=None if remapped is None else bool(remapped[2]),
            processes=processes_now,
        )

    @staticmethod
    def _memory_version(nv: Any, handle: Any) -> int | None:
        """nvmlMemory_v2 when this driver has it: its "used" leaves out what the driver
        reserves, as nvidia-smi shows it."""
        version = getattr(nv, "nvmlMemory_v2", None)
        if version is None:
            return None
        try:
            nv.nvmlDeviceGetMemoryInfo(handle, version)
        except nv.NVMLError:
            return None
        return int(version)

    def _clock_reasons_fn(self, nv: Any, handle: Any) -> Any:
        """nvmlDeviceGetCurrentClocksEventReasons, or the older throttle-reasons call."""
        if self._reasons_fn is None:
            self._reasons_fn = nv.nvmlDeviceGetCurrentClocksEventReasons
            try:
                self._reasons_fn(handle)
            except nv.NVMLError as err:
                if err.value == _FUNCTION_NOT_FOUND:
                    self._reasons_fn = nv.nvmlDeviceGetCurrentClocksThrottleReasons
            except AttributeError:
                self._reasons_fn = nv.nvmlDeviceGetCurrentClocksThrottleReasons
        return self._reasons_fn

    @staticmethod
    def _processes(nv: Any, handle: Any, read: Any) -> tuple[GpuProcess, ...] | None:
        found = read(nv.nvmlDeviceGetComputeRunningProcesses)
        if found is None:
            return None
        out = []
        for proc in found:
            try:
                name = _text(nv.nvmlSystemGetProcessName(proc.pid))
            except nv.NVMLError:
                name = None
            used = getattr(proc, "usedGpuMemory", None)
            out.append(GpuProcess(int(proc.pid), name or None, _mib(used)))
        return tuple(out)

    @staticmethod
    def _optional(nv: Any, fn: Any) -> Any:
        try:
            return fn()
        except nv.NVMLError:
            return None


def _describe(err: Any) -> str:
    if err.value == _GPU_IS_LOST:
        return "GPU is lost (fell off the bus; needs a reset or reboot)"
    return str(err)


def _int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def _mib(value: object) -> int | None:
    return None if value is None else int(value) // 2**20  # type: ignore[call-overload]


def _watts(milliwatts: object) -> float | None:
    return None if milliwatts is None else int(milliwatts) / 1000  # type: ignore[call-overload]


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
