"""systemd over D-Bus (pystemd): reload unit files, restart a unit only if it runs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from clusterctl.errors import HostError


def systemd_running(root: Path = Path("/")) -> bool:
    """sd_booted(): systemd is PID 1 here."""
    return (root / "run/systemd/system").is_dir()


class Systemd:
    """The system manager of this machine, connected on first use."""

    def __init__(self) -> None:
        self._manager: Any = None

    def _connect(self) -> Any:
        if self._manager is None:
            try:
                from pystemd.systemd1 import Manager
            except ImportError as err:
                raise HostError("pystemd is not installed",
                                fix="reinstall clusterctl (install.sh)") from err
            manager = Manager()
            try:
                manager.load()
            except Exception as err:  # pystemd raises DBusError subclasses and OSError
                raise HostError(f"cannot reach systemd over D-Bus: {err}",
                                fix="is dbus running? systemctl status dbus") from err
            self._manager = manager
        return self._manager

    def daemon_reload(self) -> None:
        self._connect().Manager.Reload()

    def _unit(self, unit: str) -> Any:
        from pystemd.systemd1 import Unit

        handle = Unit(unit.encode())
        handle.load()
        return handle.Unit

    def active_state(self, unit: str) -> str:
        return str(self._unit(unit).ActiveState.decode())

    def restart_if_active(self, unit: str, *, wait_s: float = 90.0) -> bool:
        """Restart ``unit`` when it is active (running or starting); True if it was.

        Waits until it is active again (a new ActiveEnterTimestamp) or has failed.
        """
        before = self._unit(unit)
        if before.ActiveState.decode() not in ("active", "activating", "reloading"):
            return False
        entered = before.ActiveEnterTimestampMonotonic
        self._connect().Manager.RestartUnit(unit.encode(), b"replace")
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            now = self._unit(unit)
            state = now.ActiveState.decode()
            if state == "active" and now.ActiveEnterTimestampMonotonic != entered:
                return True
            if state == "failed":
                raise HostError(f"{unit} failed after the restart",
                                fix=f"journalctl -u {unit}; `clusterctl optimize revert` "
                                "undoes the change")
            time.sleep(0.1)
        raise HostError(f"{unit} is still restarting after {wait_s:.0f} s",
                        fix=f"journalctl -u {unit}")
