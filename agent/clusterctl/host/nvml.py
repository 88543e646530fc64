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
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
    kind: str = "compute"  # "compute" or "graphics" (a process that is both: "compute")


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
    # read every sample: energy and the utilization and temperature gauges
    energy_total_mj: int | None = None  # since the driver loaded (a counter)
    encoder_utilization_percent: int | None = None
    decoder_utilization_percent: int | None = None
    memory_temperature_c: int | None = None
    # counters, read every COUNTERS_EVERY_S (the last value in between)
    pcie_replay_count: int | None = None
    remapped_rows_correctable: int | None = None
    remap_failure: bool | None = None  # a row could not be remapped: the GPU needs service
    nvlink_tx_bytes: int | None = None  # all links, since the driver loaded; None: no NVLink
    nvlink_rx_bytes: int | None = None
    # GPU Performance Monitoring (Hopper and newer), fractions 0..1 between this sample
    # and the previous one of the same GPU; None without GPM (see Nvml.gpm_problem)
    gpm_graphics_activity: float | None = None
    gpm_sm_activity: float | None = None
    gpm_sm_occupancy: float | None = None
    gpm_tensor_activity: float | None = None
    gpm_dram_activity: float | None = None
    processes: tuple[GpuProcess, ...] | None = None  # None: not read in this sample

    @property
    def memory_used_percent(self) -> float | None:
        if self.memory_used_mib is None or not self.memory_total_mib:
            return None
        return 100.0 * self.memory_used_mib / self.memory_total_mib

    @property
    def nvlink_bytes_total(self) -> int | None:
        """Bytes sent and received over all NVLinks (dcgm-exporter's bandwidth total)."""
        if self.nvlink_tx_bytes is None or self.nvlink_rx_bytes is None:
            return None
        return self.nvlink_tx_bytes + self.nvlink_rx_bytes


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
KIB = 2**10
COUNTERS_EVERY_S = 30.0  # counters (PCIe replays, remapped rows, NVLink) change rarely
# nvmlDeviceGetFieldValues' ids (nvml.h): the memory temperature, every sample; the NVLink
# data counters summed over all links (scopeId UINT_MAX), with the counters
_FI_MEMORY_TEMP = 82
_FI_NVLINK_TX = (138, 0xFFFFFFFF)  # NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, KiB
_FI_NVLINK_RX = (139, 0xFFFFFFFF)  # ..._DATA_RX
# a field value's valueType (nvmlValueType_t) -> the member of its value union
_FIELD_MEMBERS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")
# GPM metrics read (NVML_GPM_METRIC_*: percent 0..100) -> GpuSample attribute (fraction)
GPM_METRICS = ((1, "gpm_graphics_activity"),  # GRAPHICS_UTIL
               (2, "gpm_sm_activity"),  # SM_UTIL
               (3, "gpm_sm_occupancy"),  # SM_OCCUPANCY
               (5, "gpm_tensor_activity"),  # ANY_TENSOR_UTIL
               (10, "gpm_dram_activity"))  # DRAM_BW_UTIL


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
    counters: _Counters | None = None  # the last read of the counters
    counters_at: float | None = None  # the sample time they were read at
    gpm: _Gpm | None = None  # GPM's samples, once set up
    gpm_problem: str | None = None  # why GPM is not read (decided once)


@dataclass(frozen=True)
class _Counters:
    pcie_replay_count: int | None = None
    remapped: tuple[int, int, int, int] | None = None  # corr, unc, pending, failure
    nvlink_tx_bytes: int | None = None
    nvlink_rx_bytes: int | None = None


@dataclass
class _Gpm:
    """One GPU's GPM: two samples taken in turn, and the request that compares them."""

    samples: tuple[Any, Any]
    request: Any  # c_nvmlGpmMetricsGet_t, reused
    newest: int | None = None  # which sample holds the latest reading
    lock: threading.Lock = field(default_factory=threading.Lock)  # one reader at a time


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
            for static in self._static.values():
                self._free_gpm(static)
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
        gpus = tuple(self._sample_one(nv, i, processes, stamp) for i in range(self._count or 0))
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

    def gpm_problem(self, index: int) -> str | None:
        """Why GPM (the DCGM_FI_PROF_* fractions) is not read on GPU ``index``; None while
        it is, or before that GPU was first sampled."""
        static = self._static.get(index)
        return None if static is None else static.gpm_problem

    def _sample_one(self, nv: Any, index: int, processes: bool, stamp: float) -> GpuSample:
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
        energy = read(nv.nvmlDeviceGetTotalEnergyConsumption)
        encoder = read(nv.nvmlDeviceGetEncoderUtilization)
        decoder = read(nv.nvmlDeviceGetDecoderUtilization)
        memory_temperature = self._fields(nv, read, static, (_FI_MEMORY_TEMP,))
        counters = self._counters(nv, read, static, stamp)
        remapped = counters.remapped
        gpm = self._gpm(nv, read, static, index)
        processes_now = self._processes(nv, read) if processes else None
        if read.lost:
            self._static.pop(index, None)  # look the handle up again next time
            self._free_gpm(static)
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
            energy_total_mj=_int(energy),
            encoder_utilization_percent=None if encoder is None else int(encoder[0]),
            decoder_utilization_percent=None if decoder is None else int(decoder[0]),
            memory_temperature_c=_int(memory_temperature.get(_FI_MEMORY_TEMP)),
            pcie_replay_count=counters.pcie_replay_count,
            remapped_rows_correctable=None if remapped is None else int(remapped[0]),
            remap_failure=None if remapped is None else bool(remapped[3]),
            nvlink_tx_bytes=counters.nvlink_tx_bytes,
            nvlink_rx_bytes=counters.nvlink_rx_bytes,
            processes=processes_now,
            **gpm,
        )

    @staticmethod
    def _fields(nv: Any, read: _Reads, static: _Static, wanted: tuple[Any, ...]
                ) -> dict[Any, int | float]:
        """nvmlDeviceGetFieldValues for ``wanted`` (ids, or (id, scope) pairs) in one call:
        each field's value by its id (or pair); a field the GPU does not report is left out
        and not asked again, one that failed is said with the sample."""
        ask = tuple(f for f in wanted if ("field", f) not in static.unsupported)
        if not ask:
            return {}
        values = read(nv.nvmlDeviceGetFieldValues, ask)
        if values is None:
            return {}
        out: dict[Any, int | float] = {}
        for wanted_id, value in zip(ask, values, strict=False):
            code = int(value.nvmlReturn)
            if code in _UNREPORTED_CODES:
                static.unsupported.add(("field", wanted_id))
            elif code != 0:
                read.errors.append(f"nvmlDeviceGetFieldValues: field {wanted_id}: NVML error "
                                   f"{code}")
            else:
                kind = int(value.valueType)
                if 0 <= kind < len(_FIELD_MEMBERS):
                    number = getattr(value.value, _FIELD_MEMBERS[kind])
                    if isinstance(number, float) and not math.isfinite(number):
                        read.errors.append(f"nvmlDeviceGetFieldValues: field {wanted_id}: "
                                           f"not a number ({number})")
                        continue  # a double the driver got wrong: int() of it would raise
                    out[wanted_id] = number
        return out

    def _counters(self, nv: Any, read: _Reads, static: _Static, stamp: float) -> _Counters:
        """The counters, read at most every COUNTERS_EVERY_S (the last read in between);
        a read that failed is tried again at the next sample."""
        last, at = static.counters, static.counters_at
        if last is not None and at is not None and 0 <= stamp - at < COUNTERS_EVERY_S:
            return last
        failed = len(read.errors)
        remapped = read(nv.nvmlDeviceGetRemappedRows)
        replay = read(nv.nvmlDeviceGetPcieReplayCounter)
        nvlink = self._fields(nv, read, static, (_FI_NVLINK_TX, _FI_NVLINK_RX))
        tx, rx = nvlink.get(_FI_NVLINK_TX), nvlink.get(_FI_NVLINK_RX)
        counters = _Counters(
            pcie_replay_count=_int(replay),
            remapped=None if remapped is None else (
                int(remapped[0]), int(remapped[1]), int(remapped[2]), int(remapped[3])),
            nvlink_tx_bytes=None if tx is None else int(tx) * KIB,
            nvlink_rx_bytes=None if rx is None else int(rx) * KIB)
        if len(read.errors) == failed and not read.lost:
            static.counters, static.counters_at = counters, stamp
        return counters

    def _gpm(self, nv: Any, read: _Reads, static: _Static, index: int
             ) -> dict[str, float | None]:
        """The GPM fractions between the GPU's previous GPM sample and one taken now ({}
        at the first, without GPM, or while another thread reads this GPU's GPM)."""
        if read.lost:
            return {}
        gpm = static.gpm
        if gpm is None:
            if static.gpm_problem is not None:
                return {}
            gpm = self._gpm_setup(nv, read, static, index)
            if gpm is None:
                return {}
        if not gpm.lock.acquire(blocking=False):
            return {}
        try:
            slot = 1 if gpm.newest == 0 else 0
            if self._gpm_call(nv, read, static, index, nv.nvmlGpmSampleGet, static.handle,
                              gpm.samples[slot]) is None:
                gpm.newest = None  # start again from the next sample
                return {}
            previous, gpm.newest = gpm.newest, slot
            if previous is None:
                return {}
            request = gpm.request
            request.sample1, request.sample2 = gpm.samples[previous], gpm.samples[slot]
            for i, (metric, _) in enumerate(GPM_METRICS):
                request.metrics[i].metricId = metric
            if self._gpm_call(nv, read, static, index, nv.nvmlGpmMetricsGet, request) is None:
                return {}
            out: dict[str, float | None] = {}
            for i, (_, attribute) in enumerate(GPM_METRICS):
                metric = request.metrics[i]
                value = float(metric.value)
                if int(metric.nvmlReturn) == 0 and math.isfinite(value):
                    out[attribute] = min(1.0, max(0.0, value / 100))
            return out
        finally:
            gpm.lock.release()

    def _gpm_call(self, nv: Any, read: _Reads, static: _Static, index: int, fn: Any,
                  *args: Any) -> Any:
        """A GPM call under :func:`query`'s policy; "not supported" ends GPM on this GPU."""
        value = query(nv, fn, *args, default=_UNREPORTED, failed=read._failed)
        if value is _UNREPORTED:
            self._gpm_off(static, index, f"{fn.__name__} is not supported on this GPU")
            return None
        return value

    def _gpm_setup(self, nv: Any, read: _Reads, static: _Static, index: int) -> _Gpm | None:
        if not hasattr(nv, "nvmlGpmQueryDeviceSupport"):
            self._gpm_off(static, index, "this nvidia-ml-py has no GPM calls (update it)")
            return None
        try:
            support = call(nv, nv.nvmlGpmQueryDeviceSupport, static.handle)
        except NvmlCallError as err:
            if err.lost:
                read._failed(err)
                return None
            self._gpm_off(static, index, "the driver has no GPM (R520 or newer has it)"
                          if err.code == _FUNCTION_NOT_FOUND
                          else f"GPM support could not be read: {err.text}")
            return None
        if not support.isSupportedDevice:
            self._gpm_off(static, index, "this GPU has no GPM (Hopper and newer have it)")
            return None
        samples: list[Any] = []
        try:
            for _ in range(2):
                samples.append(call(nv, nv.nvmlGpmSampleAlloc))
        except NvmlCallError as err:
            for sample in samples:
                answer(nv, nv.nvmlGpmSampleFree, sample)
            self._gpm_off(static, index, f"GPM samples could not be allocated: {err.text}")
            return None
        request = nv.c_nvmlGpmMetricsGet_t()
        request.version = nv.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(GPM_METRICS)
        static.gpm = _Gpm((samples[0], samples[1]), request)
        return static.gpm

    def _gpm_off(self, static: _Static, index: int, problem: str) -> None:
        """GPM is not read on this GPU while the driver is loaded: said once, here."""
        self._free_gpm(static)
        static.gpm_problem = problem
        log.info("GPU %d: %s; DCGM_FI_PROF_* are left out for it", index, problem)

    def _free_gpm(self, static: _Static) -> None:
        """Give GPM's samples back to NVML (at shutdown, when GPM ends, when the GPU is
        lost); a failure to free is only logged."""
        gpm, static.gpm = static.gpm, None
        nv: Any = self._module
        if gpm is None or nv is None:
            return
        for sample in gpm.samples:
            answer(nv, nv.nvmlGpmSampleFree, sample)

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
    def _process_list(nv: Any, read: _Reads, name: str) -> Any:
        """pynvml's process call, or its _v2 on a driver without the _v3 the unversioned
        one uses (which then raises NVMLLibraryMismatchError, not an NVMLError)."""
        mismatch = getattr(nv, "NVMLLibraryMismatchError", ())
        try:
            return read(getattr(nv, name))
        except mismatch:
            older = getattr(nv, f"{name}_v2", None)
            return None if older is None else read(older)

    @staticmethod
    def _processes(nv: Any, read: _Reads) -> tuple[GpuProcess, ...] | None:
        """Compute and graphics processes, one entry per pid (compute first); None when
        the GPU lists neither."""
        compute = Nvml._process_list(nv, read, "nvmlDeviceGetComputeRunningProcesses")
        graphics = Nvml._process_list(nv, read, "nvmlDeviceGetGraphicsRunningProcesses")
        if compute is None and graphics is None:
            return None
        out: dict[int, GpuProcess] = {}
        for kind, found in (("compute", compute or ()), ("graphics", graphics or ())):
            for proc in found:
                pid = int(proc.pid)
                if pid in out:
                    continue
                name = _text(answer(nv, nv.nvmlSystemGetProcessName, pid))  # may have exited
                used = getattr(proc, "usedGpuMemory", None)
                out[pid] = GpuProcess(pid, name or None, _mib(used), kind)
        return tuple(out.values())


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
