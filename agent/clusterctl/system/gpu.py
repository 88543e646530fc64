"""Changing a GPU: its power limit, the one setting clusterctl ever changes (opt-in).

NVML failures come through ``clusterctl.host.nvml``'s one error policy (``call``) and
are said here in the words of this change."""

from __future__ import annotations

from typing import Any

from clusterctl.errors import HostError
from clusterctl.host.nvml import NvmlCallError, call

_NO_PERMISSION = 4
_INVALID_ARGUMENT = 2


def set_power_limit(nvml: Any, index: int, watts: float) -> None:
    """nvmlDeviceSetPowerManagementLimit on GPU ``index`` (needs root)."""
    nv = nvml.module()
    if nv is None:
        raise HostError("cannot set a GPU power limit: NVML is not available")
    try:
        call(nv, nv.nvmlDeviceSetPowerManagementLimit, nvml.handle(index), round(watts * 1000))
    except NvmlCallError as err:
        if err.code == _NO_PERMISSION:
            raise HostError(f"GPU {index}: no permission to set its power limit",
                            fix="run as root") from err
        if err.unreported:
            raise HostError(f"GPU {index} does not let its power limit be set",
                            fix="set [gpu] throttle_enabled = false") from err
        if err.code == _INVALID_ARGUMENT:
            raise HostError(f"GPU {index} refused a power limit of {watts:.0f} W "
                            "(outside its range)") from err
        raise HostError(f"GPU {index}: setting the power limit failed: {err.text}") from err
