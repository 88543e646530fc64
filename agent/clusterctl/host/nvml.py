"""The one NVML layer: lazy init, cached handles, "not available" instead of tracebacks.

Everything NVIDIA goes through :class:`Nvml`. It imports ``pynvml``
(nvidia-ml-py) only when first asked, so a host without the driver pays
nothing at start-up; it initialises NVML once; and a missing library, an
unloaded driver or zero GPUs is a normal degraded state with a reason an
operator can act on.

Every NVML call goes through one error policy, :func:`query` (over :func:`call`):
a field the GPU or driver does not report (NOT_SUPPORTED, FUNCTION_NOT_FOUND) is
``None``; a GPU that fell off the bus, needs a reset or answers UNKNOWN is lost
while the others keep working; any other failure is that field's error, said with
the sample. pynvml's own ``NVMLError`` never leaves this module: what escapes is an
:class:`NvmlCallError`, a HostError with the call, the NVML code and plain words.

The ``module`` argument lets tests hand in a stand-in with pynvml's names
and error classes (tests/fakes); production code never passes it.
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from clusterctl.errors import HostError

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
    errors: tuple[str, ...] = ()  # fixed facts that failed to read: said with every sample


# NVML return codes (nvml.h); the same values pynvml exports as NVML_ERROR_*.
_NOT_SUPPORTED = 3
_NO_PERMISSION = 4
_DRIVER_NOT_LOADED = 9
_LIBRARY_NOT_FOUND = 12
_FUNCTION_NOT_FOUND = 13
_GPU_IS_LOST = 15
_RESET_REQUIRED = 16
_LIB_RM_VERSION_MISMATCH = 18
_UNKNOWN = 999

# "the hardware or driver does not report it": a capability, not a failure
_UNREPORTED_CODES = frozenset({_NOT_SUPPORTED, _FUNCTION_NOT_FOUND})
# the GPU stopped answering: nothing more is asked of it in this pass
_LOST_CODES = frozenset({_GPU_IS_LOST, _RESET_REQUIRED, _UNKNOWN})
_WORDS = {
    _GPU_IS_LOST: "GPU is lost (fell off the bus; needs a reset or reboot)",
    _RESET_REQUIRED: "GPU needs a reset (nvidia-smi -r) or a reboot",
}

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


class NvmlCallError(HostError):
    """An NVML call that failed: what clusterctl raises in place of pynvml's NVMLError,
    which never leaves this module. ``code`` is the NVML return code (``None`` when
    unknown); ``lost`` says the GPU stopped answering."""

    def __init__(self, call: str, code: int | None, text: str) -> None:
        super().__init__(f"{call}: {text}")
        self.call = call
        self.code = code
        self.text = text

    @property
    def lost(self) -> bool:
        return self.code in _LOST_CODES

    @property
    def unreported(self) -> bool:
        return self.code in _UNREPORTED_CODES


_UNREPORTED: Any = object()  # query()'s default: tells "not reported" from a value


def call(nv: Any, fn: Any, *args: Any) -> Any:
    """``fn(*args)``: any NVML failure, "not supported" too, as :class:`NvmlCallError`
    (for calls whose every failure matters: init, counting, handles, writes)."""
    try:
        return fn(*args)
    except nv.NVMLError as raw:
        raise _error(fn, raw) from raw


def _error(fn: Any, raw: Any) -> NvmlCallError:
    """pynvml's error as clusterctl's: the call, the NVML code and plain words."""
    code = getattr(raw, "value", None)
    text = _WORDS.get(code, str(raw)) if isinstance(code, int) else str(raw)
    err = NvmlCallError(getattr(fn, "__name__", "NVML"), code, text)
    err.__cause__ = raw
    return err


def query(nv: Any, fn: Any, *args: Any, default: Any = None,
          failed: Callable[[NvmlCallError], None] | None = None) -> Any:
    """The one error policy for reading NVML: ``fn(*args)``'s answer, or ``default``
    where the GPU or driver does not report it (NOT_SUPPORTED, FUNCTION_NOT_FOUND);
    any other failure is an :class:`NvmlCallError` (``lost`` for GPU_IS_LOST,
    RESET_REQUIRED and UNKNOWN), raised, or handed to ``failed`` (then ``None``)."""
    try:
        return fn(*args)
    except nv.NVMLError as raw:
        err = _error(fn, raw)
    if err.unreported:
        return default
    if failed is None:
        raise err
    failed(err)
    return None


def answer(nv: Any, fn: Any, *args: Any) -> Any:
    """``query`` for a fact that is only nice to have: ``None`` on any failure."""
    try:
        return query(nv, fn, *args)
    except NvmlCallError as err:
        log.debug("%s", err.message)
        return None


class _Reads:
    """One GPU's reads in one pass, under :func:`query`'s policy: a field it does not
    report is ``None`` (and, given ``unreported``, not asked again while the driver is
    loaded); a failing field is ``None`` and noted in ``errors``; once the GPU is lost,
    nothing more is asked of it."""

    def __init__(self, nv: Any, handle: Any, unreported: set[tuple[Any, ...]] | None = None
                 ) -> None:
        self.nv = nv
        self.handle = handle
        self.unreported = unreported
        self.errors: list[str] = []
        self.lost = False
        self.failure: NvmlCallError | None = None  # the call that found the GPU lost

    def __call__(self, fn: Any, *args: Any) -> Any:
        if self.lost:
            return None
        skip = self.unreported
        if skip and (fn.__name__, *args) in skip:
            return None
        value = query(self.nv, fn, self.handle, *args, default=_UNREPORTED, failed=self._failed)
        if value is _UNREPORTED:
            if skip is not None:
                skip.add((fn.__name__, *args))  # a capability of this GPU: not asked again
            return None
        return value

    def _failed(self, err: NvmlCallError) -> None:
        self.errors.append(err.message)
        if err.lost:
            self.lost, self.failure = True, err

    @property
    def error(self) -> str | None:
        return "; ".join(self.errors) or None


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
                call(nv, nv.nvmlInit)
            except NvmlCallError as err:
                self._failure = _INIT_REASONS.get(
                    err.code or 0, (f"NVML failed to initialise: {err.text}", None))
                log.debug("NVML unavailable: %s", self._failure[0])
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
                    call(nv, nv.nvmlShutdown)
                except NvmlCallError as err:
                    log.debug("%s", err.message)
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
        driver = answer(nv, nv.nvmlSystemGetDriverVersion)
        cuda = answer(nv, nv.nvmlSystemGetCudaDriverVersion_v2)
        if cuda is None:
            cuda = answer(nv, nv.nvmlSystemGetCudaDriverVersion)
        cuda_text = f"{cuda // 1000}.{cuda % 1000 // 10}" if isinstance(cuda, int) else None
        try:
            count = call(nv, nv.nvmlDeviceGetCount)
        except NvmlCallError as err:
            return GpuInventory(
                (), driver, cuda_text, reason=f"NVML could not count GPUs: {err.text}", fix=None
            )
        gpus = tuple(self._device_info(nv, index) for index in range(count))
        no_gpu = None if gpus else "the NVIDIA driver is loaded but reports no GPU"
        return GpuInventory(gpus, driver, cuda_text, reason=no_gpu)

    @staticmethod
    def _device_info(nv: Any, index: int) -> GpuInfo:
        try:
            handle = call(nv, nv.nvmlDeviceGetHandleByIndex, index)
        except NvmlCallError as err:
            return GpuInfo(index, None, None, None, None, lost=err.lost, error=err.text)
        read = _Reads(nv, handle)
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
            lost=read.lost,
            error=read.error,
        )

    # -- sampling -----------------------------------------------------------

    def available(self) -> bool:
        return self._nvml() is not None

    def failure(self) -> tuple[str, str | None] | None:
        """(reason, fix) when NVML could not be used."""
        self._nvml()
        return self._failure

    def handle(self, index: int) -> Any:
        """The cached NVML handle of GPU ``index`` (for clusterctl.system's writes);
        :class:`NvmlCallError` (a HostError) when the GPU cannot be reached."""
        nv = self._nvml()
        if nv is None:
            raise HostError(f"GPU {index}: NVML is not available: "
                            f"{self._failure[0] if self._failure else 'unknown'}")
        try:
            return self._static_of(nv, index).handle
        except NvmlCallError as err:
            raise NvmlCallError(f"GPU {index}: {err.call}", err.code, err.text) from err

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
                self._count = call(nv, nv.nvmlDeviceGetCount)
            except NvmlCallError as err:
                return GpuSnapshot((), None, f"NVML could not count GPUs: {err.text}", None,
                                   stamp)
            self._driver = _text(answer(nv, nv.nvmlSystemGetDriverVersion))
        gpus = tuple(self._sample_one(nv, i, processes) for i in range(self._count or 0))
        reason = None if gpus else "the NVIDIA driver is loaded but reports no GPU"
        return GpuSnapshot(gpus, self._driver, reason, None, stamp)

    def _static_of(self, nv: Any, index: int) -> _Static:
        """GPU ``index``'s fixed facts, read once; NvmlCallError when it cannot be reached
        or is lost (nothing is cached then)."""
        cached = self._static.get(index)
        if cached is not None:
            return cached
        handle = call(nv, nv.nvmlDeviceGetHandleByIndex, index)
        read = _Reads(nv, handle)
        constraints = read(nv.nvmlDeviceGetPowerManagementLimitConstraints)
        low, high = constraints if constraints else (None, None)
        static = _Static(
            handle=handle,
            name=_text(read(nv.nvmlDeviceGetName)),
            uuid=_text(read(nv.nvmlDeviceGetUUID)),
            pci_bus_id=_text(getattr(read(nv.nvmlDeviceGetPciInfo), "busId", None)),
            power_default_limit_w=_watts(read(nv.nvmlDeviceGetPowerManagementDefaultLimit)),
            power_min_limit_w=_watts(low),
            power_max_limit_w=_watts(high),
            unsupported=set(),
            memory_version=None if read.lost else self._memory_version(nv, handle),
            errors=tuple(read.errors),
        )
        if read.failure is not None:
            raise read.failure
        self._static[index] = static
        return static

    def _sample_one(self, nv: Any, index: int, processes: bool) -> GpuSample:
        try:
            static = self._static_of(nv, index)
        except NvmlCallError as err:
            return GpuSample(index, None, None, None, lost=err.lost, error=err.text)
        read = _Reads(nv, static.handle, static.unsupported)
        read.errors.extend(static.errors)  # a fixed fact that failed stays said
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
        reasons = read(self._clock_reasons_fn(nv, static.handle))
        ecc = read(nv.nvmlDeviceGetTotalEccErrors, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                   nv.NVML_VOLATILE_ECC)
        remapped = read(nv.nvmlDeviceGetRemappedRows)
        processes_now = self._processes(nv, read) if processes else None
        if read.lost:
            self._static.pop(index, None)  # look the handle up again next time
            return GpuSample(index, static.name, static.uuid, static.pci_bus_id, lost=True,
                             error=read.error)
        return GpuSample(
            index=index, name=static.name, uuid=static.uuid, pci_bus_id=static.pci_bus_id,
            lost=False, error=read.error,
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
        if version is None or answer(nv, nv.nvmlDeviceGetMemoryInfo, handle, version) is None:
            return None
        return int(version)

    def _clock_reasons_fn(self, nv: Any, handle: Any) -> Any:
        """nvmlDeviceGetCurrentClocksEventReasons, or the older throttle-reasons call."""
        if self._reasons_fn is None:
            older = nv.nvmlDeviceGetCurrentClocksThrottleReasons
            self._reasons_fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", older)
            try:
                call(nv, self._reasons_fn, handle)
            except NvmlCallError as err:
                if err.code == _FUNCTION_NOT_FOUND:
                    self._reasons_fn = older
        return self._reasons_fn

    @staticmethod
    def _processes(nv: Any, read: _Reads) -> tuple[GpuProcess, ...] | None:
        found = read(nv.nvmlDeviceGetComputeRunningProcesses)
        if found is None:
            return None
        out = []
        for proc in found:
            name = _text(answer(nv, nv.nvmlSystemGetProcessName, proc.pid))  # may have exited
            used = getattr(proc, "usedGpuMemory", None)
            out.append(GpuProcess(int(proc.pid), name or None, _mib(used)))
        return tuple(out)


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
