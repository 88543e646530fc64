"""Putting the node to sleep: the hibernation actions that change the host.

Tests never let these hibernate, suspend or power off the machine they run on: the
``systemd`` action starts ``[hibernate] systemd_unit``, which a test replaces with a
harmless unit inside the systemd sandbox.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from typing import IO, Any

from clusterctl.errors import HostError

LOGIND = (b"org.freedesktop.login1", b"/org/freedesktop/login1")
# the targets logind can tell us about, and the question to ask it
CAN = {"hibernate.target": "CanHibernate", "suspend.target": "CanSuspend",
       "hybrid-sleep.target": "CanHybridSleep", "suspend-then-hibernate.target":
       "CanSuspendThenHibernate", "poweroff.target": "CanPowerOff"}


TAIL_BYTES = 64 << 10  # what is read back of a command's output, from its end


def run_command(argv: tuple[str, ...], timeout_s: float) -> str:
    """Run the operator's command without a shell; the last line of its output, or HostError.

    Its stdout and stderr go to unnamed temporary files, never into memory: only the
    last TAIL_BYTES are read back, so a chatty command costs disk (freed on return), not
    the agent's RAM. It runs in a session of its own: on timeout the whole process group
    is stopped (SIGTERM, then SIGKILL after ``KILL_GRACE_S``), so nothing it started
    lives on. A process that leaves the group (``setsid``, a double fork into a new
    session) cannot be found without a cgroup and is left running."""
    if not argv:
        raise HostError('the "command" action has no [hibernate] command',
                        fix='set [hibernate] command = ["/path/to/program", "arg"]')
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        try:
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=stdout,
                                    stderr=stderr, start_new_session=True)
        except FileNotFoundError as err:
            raise HostError(f"{argv[0]}: no such program", fix="fix [hibernate] command"
                            ) from err
        except PermissionError as err:
            raise HostError(f"{argv[0]}: not executable", fix=f"chmod +x {argv[0]}") from err
        except (OSError, ValueError) as err:  # not a program (no #! line), a NUL in an arg
            raise HostError(f"cannot run {argv[0]}: {getattr(err, 'strerror', None) or err}",
                            fix="fix [hibernate] command") from err
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            _kill_group(proc)
            raise HostError(f"{argv[0]} did not finish in {timeout_s:g} s (killed)",
                            fix="raise [hibernate] command_timeout, or make it faster") from err
        out = _last_line(stdout)
        if proc.returncode != 0:
            raise HostError(f"{argv[0]} exited {proc.returncode}: {_last_line(stderr) or out}")
    return out


def _last_line(output: IO[bytes]) -> str:
    """The last non-empty line in the last TAIL_BYTES of ``output``, cut to 200 characters."""
    size = output.seek(0, os.SEEK_END)
    output.seek(max(0, size - TAIL_BYTES))
    text = output.read(TAIL_BYTES).decode(errors="replace")
    return (text.strip().splitlines() or [""])[-1][:200]


KILL_GRACE_S = 2.0


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the command's process group, SIGKILL to what is left after the grace;
    the command reaped."""
    group = proc.pid  # start_new_session: the group's id is the leader's pid
    for sig, grace_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _group_alive(proc, group):
            time.sleep(0.05)
        if not _group_alive(proc, group):
            break
    proc.wait()


def _group_alive(proc: subprocess.Popen[bytes], group: int) -> bool:
    proc.poll()  # reap the leader, so that it does not count
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


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


WAKE_PREFIX = "clusterctl-wake-"
WAKE_SETTLE_S = 2.0  # how long systemd gets to put a new timer in its waiting state


def _systemd() -> Any:
    from pystemd.systemd1 import Manager

    manager = Manager()
    manager.load()
    return manager


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _timer_state(unit: str) -> tuple[str, str]:
    """(ActiveState, Result) of a timer; ("gone", "") once systemd has let go of it."""
    from pystemd.systemd1 import Unit

    try:
        timer = Unit(unit.encode(), _autoload=True)
        return _text(timer.Unit.ActiveState), _text(timer.Timer.Result)
    except Exception:  # collected meanwhile
        return "gone", ""


def set_wake_timer(at: float) -> str:
    """Wake the node at ``at`` from a suspend or hibernation; the timer's name.

    A transient systemd timer with ``WakeSystem=yes``: systemd programs the RTC alarm,
    so the agent's own unit keeps /sys read-only and the clock out of reach. Earlier
    clusterctl wake timers are stopped first (one wake time at a time). HostError when
    systemd refuses, or when the machine has no wake alarm (a VM: systemd says
    "Operation not supported" and the timer fails); a failed timer is cleared away."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(int(at)))
    name = f"{WAKE_PREFIX}{int(at)}"
    try:
        manager = _systemd()
        clear_wake_timers(manager)
        manager.Manager.StartTransientUnit(
            f"{name}.timer".encode(), b"replace",
            {b"Description": f"clusterctl: wake the node at {stamp}".encode(),
             b"TimersCalendar": [(b"OnCalendar", stamp.encode())],
             b"WakeSystem": True, b"RemainAfterElapse": False,
             b"_custom": (b"AccuracyUSec", b"t", 1_000_000)},  # unknown to pystemd
            [(f"{name}.service".encode(),
              {b"Description": f"clusterctl: the node's wake time {stamp}".encode(),
               b"Type": b"oneshot", b"ExecStart": [(b"/bin/true", [b"/bin/true"], False)]})])
    except Exception as err:  # no D-Bus, no systemd, a refusal
        raise HostError(f"systemd refused a wake timer for {stamp}: {err}",
                        fix="is systemd running? (systemctl is-system-running)") from err
    deadline = time.monotonic() + WAKE_SETTLE_S
    state, result = _timer_state(f"{name}.timer")
    while state not in ("active", "failed", "gone") and time.monotonic() < deadline:
        time.sleep(0.05)
        state, result = _timer_state(f"{name}.timer")
    if state == "active":
        return f"{name}.timer"
    clear_wake_timers(manager)
    raise HostError(f"systemd could not arm a wake timer for {stamp} (result: "
                    f"{result or state}); this machine has no RTC wake alarm, a VM perhaps",
                    fix="let the control plane wake it: [hibernate] action with control")


def clear_wake_timers(manager: Any | None = None) -> list[str]:
    """Stop every clusterctl wake timer and clear the failed ones; their names."""
    manager = manager if manager is not None else _systemd()
    names = [_text(entry[0]) for entry in manager.Manager.ListUnitsByPatterns(
        [], [f"{WAKE_PREFIX}*.timer".encode()])]
    for unit in names:
        with contextlib.suppress(Exception):  # already stopped
            manager.Manager.StopUnit(unit.encode(), b"replace")
        with contextlib.suppress(Exception):  # not failed, already collected
            manager.Manager.ResetFailedUnit(unit.encode())
    return names
