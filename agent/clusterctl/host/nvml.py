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

import importlib
import logging
import threading
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


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
