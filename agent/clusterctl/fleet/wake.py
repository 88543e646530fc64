"""Waking a node: a Wake-on-LAN magic packet, IPMI power on, or the operator's command.

All three run on the control-plane host. Nothing from a node reaches a shell: argv
lists only, placeholders replaced per argument, and the values put in them are checked
(an instance id or hostname is a DNS-like name, a MAC six hex pairs). An IPMI password
goes to ipmitool as a file (``-f``), never in argv.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from clusterctl.config import FleetConfig
from clusterctl.errors import UsageError

#  \Z, not $: "$" also matches before a final newline ("gpu-01\n" would pass)
MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}\Z")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}\Z")


@dataclass(frozen=True)
class Plan:
    """One wake: a packet to send (Wake-on-LAN) or an argv to run (IPMI, a command)."""

    method: str
    what: str  # how it reads in events and errors
    packet: bytes | None = None
    address: tuple[str, int] | None = None
    argv: tuple[str, ...] = ()


@dataclass(frozen=True)
class Target:
    instance_id: str
    hostname: str
    mac: str | None


def magic_packet(mac: str) -> bytes:
    """Six 0xFF bytes, then the MAC sixteen times (102 bytes)."""
    if not MAC_RE.match(mac.lower()):
        raise UsageError(f"{mac!r:.40} is not a MAC address like 52:54:00:12:34:56")
    raw = bytes.fromhex(mac.replace(":", ""))
    return b"\xff" * 6 + raw * 16


def _fill(argv: Sequence[str], target: Target) -> list[str]:
    for name, value in (("instance id", target.instance_id), ("hostname", target.hostname)):
        if not NAME_RE.match(value):
            raise UsageError(f"the node's {name} {value!r:.80} is not a plain host name; "
                             "it cannot be put in a wake command")
    if not target.mac and any("{mac}" in arg for arg in argv):
        raise UsageError(f"{target.instance_id} has not reported a MAC address; the wake "
                         "command needs one for {mac}",
                         fix="wait for a heartbeat from a current agent, or drop {mac} from "
                             "[fleet] wake_command")
    values = {"{instance_id}": target.instance_id, "{hostname}": target.hostname,
              "{mac}": target.mac or ""}
    out = []
    for arg in argv:
        filled = arg
        for key, value in values.items():
            filled = filled.replace(key, value)
        out.append(filled)
    return out


def ipmi_argv(config: FleetConfig, target: Target) -> list[str]:
    host = _fill([config.ipmi_host], target)[0]
    argv = ["ipmitool", "-I", "lanplus", "-H", host]
    if config.ipmi_user:
        argv += ["-U", config.ipmi_user]
    return [*argv, "-f", str(config.ipmi_password_file), "chassis", "power", "on"]


def plan(config: FleetConfig, target: Target) -> Plan:
    """How to wake ``target`` (pure); UsageError naming why it cannot be woken."""
    if config.wake == "none":
        raise UsageError("[fleet] wake = \"none\": this control plane does not wake nodes",
                         fix='set [fleet] wake to "wol", "ipmi" or "command"')
    if config.wake == "wol":
        if not target.mac:
            raise UsageError(f"{target.instance_id} has not reported a MAC address; "
                             "Wake-on-LAN needs one",
                             fix='wait for a heartbeat from a current agent, or use [fleet] '
                                 'wake = "ipmi" or "command"')
        return Plan("wol", f"Wake-on-LAN packet for {target.mac} to "
                    f"{config.wol_broadcast}:{config.wol_port}",
                    packet=magic_packet(target.mac),
                    address=(config.wol_broadcast, config.wol_port))
    if config.wake == "ipmi":
        return Plan("ipmi", "IPMI power on", argv=tuple(ipmi_argv(config, target)))
    return Plan("command", "wake command", argv=tuple(_fill(config.wake_command, target)))
