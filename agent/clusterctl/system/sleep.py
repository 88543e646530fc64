"""Putting the node to sleep: the hibernation actions that change the host.

Tests never let these hibernate, suspend or power off the machine they run on: the
``systemd`` action starts ``[hibernate] systemd_unit``, which a test replaces with a
harmless unit inside the systemd sandbox.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from clusterctl.errors import HostError

LOGIND = (b"org.freedesktop.login1", b"/org/freedesktop/login1")
# the targets logind can tell us about, and the question to ask it
CAN = {"hibernate.target": "CanHibernate", "suspend.target": "CanSuspend",
       "hybrid-sleep.target": "CanHybridSleep", "suspend-then-hibernate.target":
       "CanSuspendThenHibernate", "poweroff.target": "CanPowerOff"}


def run_command(argv: tuple[str, ...], timeout_s: float) -> str:
    """Run the operator's command without a shell; its output tail, or HostError."""
    if not argv:
        raise HostError('the "command" action has no [hibernate] command',
                        fix='set [hibernate] command = ["/path/to/program", "arg"]')
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except FileNotFoundError as err:
        raise HostError(f"{argv[0]}: no such program", fix="fix [hibernate] command") from err
    except PermissionError as err:
        raise HostError(f"{argv[0]}: not executable", fix=f"chmod +x {argv[0]}") from err
    except subprocess.TimeoutExpired as err:
        raise HostError(f"{argv[0]} did not finish in {timeout_s:g} s (killed)",
                        fix="raise [hibernate] command_timeout, or make it faster") from err
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
        raise HostError(f"{argv[0]} exited {done.returncode}: {tail[0][:200]}")
    return (done.stdout.strip().splitlines() or [""])[-1][:200]


def _login1() -> Any:
    from pystemd.base import SDObject

    obj = SDObject(destination=LOGIND[0], path=LOGIND[1])
    obj.load()
    return obj


def can(unit: str) -> str | None:
    """logind's answer ("yes", "no", "na", "challenge") for a sleep target; None otherwise."""
    question = CAN.get(unit)
    if question is None:
        return None
    try:
        answer = getattr(_login1().Manager, question)()
    except Exception as err:  # no logind, no D-Bus
        raise HostError(f"cannot ask logind whether the node can {unit.removesuffix('.target')}"
                        f": {err}",
                        fix="is systemd-logind running? (systemctl status systemd-logind)"
                        ) from err
    return answer.decode() if isinstance(answer, bytes) else str(answer)


def start_unit(unit: str) -> None:
    from pystemd.systemd1 import Manager

    manager = Manager()
    try:
        manager.load()
        manager.Manager.StartUnit(unit.encode(), b"replace-irreversibly")
    except Exception as err:
        raise HostError(f"systemd refused to start {unit}: {err}") from err


def inhibitors() -> list[tuple[str, str, str, str]]:
    """logind's block inhibitors on sleep: (what, who, why, mode)."""
    out = []
    for what, who, why, mode, _uid, _pid in _login1().Manager.ListInhibitors():
        fields = [x.decode() if isinstance(x, bytes) else str(x) for x in (what, who, why, mode)]
        if "sleep" in fields[0].split(":") and fields[3] == "block":
            out.append((fields[0], fields[1], fields[2], fields[3]))
    return out


def set_rtc_wake(at: float, root: Path = Path("/")) -> bool:
    """Program the RTC to wake the machine at ``at`` (before a suspend or hibernate).

    False when the machine has no RTC wake alarm (a VM, usually)."""
    alarm = root / "sys/class/rtc/rtc0/wakealarm"
    if not alarm.exists():
        return False
    try:
        alarm.write_text("0\n")  # the kernel refuses a new alarm over an old one
        alarm.write_text(f"{int(at)}\n")
    except OSError as err:
        raise HostError(f"cannot set the RTC wake alarm: {err.strerror}",
                        fix="run as root") from err
    return True
