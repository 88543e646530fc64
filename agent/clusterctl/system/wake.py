"""Carrying out a wake planned by clusterctl.fleet.wake: a UDP packet, or an argv run
without a shell, bounded in time."""

from __future__ import annotations

import socket
import subprocess

from clusterctl.errors import HostError
from clusterctl.fleet.wake import Plan

RUN_TIMEOUT_S = 60.0


def send(plan: Plan) -> str:
    """Do it; what was done, or HostError naming what failed."""
    if plan.packet is not None and plan.address is not None:
        host, port = plan.address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                if family == socket.AF_INET:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                sock.sendto(plan.packet, (host, port))
        except OSError as err:
            raise HostError(f"cannot send the {plan.what}: {err.strerror or err}",
                            fix="check [fleet] wol_broadcast (the nodes' subnet broadcast "
                                "address) and wol_port") from err
        return f"{plan.what} sent"
    argv = list(plan.argv)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                              check=False, stdin=subprocess.DEVNULL)
    except FileNotFoundError as err:
        raise HostError(f"{plan.what}: {argv[0]} not found",
                        fix="install it, or fix [fleet] wake_command") from err
    except subprocess.TimeoutExpired as err:
        raise HostError(f"{plan.what}: {argv[0]} did not finish within {RUN_TIMEOUT_S:g} s"
                        ) from err
    except OSError as err:
        raise HostError(f"{plan.what}: cannot run {argv[0]}: {err.strerror}") from err
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()
        raise HostError(f"{plan.what}: {argv[0]} exited with {done.returncode}"
                        + (f": {tail[-1][:200]}" if tail else ""))
    return f"{plan.what}: {argv[0]} succeeded"
