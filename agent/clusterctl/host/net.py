"""The node's network identity as a control plane needs it to wake the node: the
interface of the default IPv4 route (``/proc/net/route``) and its MAC address
(``/sys/class/net/IF/address``). None for what the host does not say."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

RTF_UP = 0x1
MAX_READ_BYTES = 1 << 20  # /proc/net/route of a router with many routes: still small
_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")  # IFNAMSIZ - 1; no "/"
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
NO_MAC = "00:00:00:00:00:00"


@dataclass(frozen=True)
class NetFacts:
    interface: str | None  # "eth0": the default IPv4 route's; None without one
    mac: str | None  # "aa:bb:cc:dd:ee:ff", lower case; None when it has none


def default_interface(route_text: str) -> str | None:
    """The interface of the default IPv4 route (up, destination and mask 0) with the
    lowest metric, from the text of /proc/net/route (pure)."""
    best: tuple[int, str] | None = None
    for line in route_text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        name, destination, flags, metric, mask = (fields[0], fields[1], fields[3],
                                                  fields[6], fields[7])
        try:
            if int(destination, 16) or int(mask, 16) or not int(flags, 16) & RTF_UP:
                continue
            rank = int(metric)
        except ValueError:
            continue
        if not _IFNAME.match(name) or name in (".", ".."):
            continue
        if best is None or rank < best[0]:
            best = (rank, name)
    return None if best is None else best[1]


def mac_of(text: str) -> str | None:
    """A MAC address as sysfs gives it, lower case; None for none (all zero, or not one)."""
    mac = text.strip().lower()
    return mac if _MAC.match(mac) and mac != NO_MAC else None


def _read(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            return f.read(MAX_READ_BYTES).decode("ascii", errors="replace")
    except (OSError, ValueError):
        return None


def read_net(root: Path) -> NetFacts:
    """The default route's interface and its MAC, read under ``root`` ("/" on a node)."""
    routes = _read(root / "proc/net/route")
    interface = None if routes is None else default_interface(routes)
    if interface is None:
        return NetFacts(None, None)
    address = _read(root / "sys/class/net" / interface / "address")
    return NetFacts(interface, None if address is None else mac_of(address))
