"""Changing a GPU: its power limit, the one setting clusterctl ever changes (opt-in)."""

from __future__ import annotations

from typing import Any

from clusterctl.errors import HostError

_NO_PERMISSION = 4
_NOT_SUPPORTED = 3
_INVALID_ARGUMENT = 2


def set_power_limit(nvml: Any, index: int, watts: float) -> None:
    """nvmlDeviceSetPowerManagementLimit on GPU ``index`` (needs root)."""
    nv = nvml.module()
    if nv is None:
        raise HostError("cannot set a GPU power limit: NVML is not available")
    try:
        nv.nvmlDeviceSetPowerManagementLimit(nvml.handle(index), round(watts * 1000))
    except nv.NVMLError as err:
        if err.value == _NO_PERMISSION:
            raise HostError(f"GPU {index}: no permission to set its power limit",
                            fix="run as root") from err
        if err.value == _NOT_SUPPORTED:
            raise HostError(f"GPU {index} does not let its power limit be set",
                            fix="set [gpu] throttle_enabled = false") from err
        if err.value == _INVALID_ARGUMENT:
            raise HostError(f"GPU {index} refused a power limit of {watts:.0f} W "
                            "(outside its range)") from err
        raise HostError(f"GPU {index}: setting the power limit failed: {err}") from err
