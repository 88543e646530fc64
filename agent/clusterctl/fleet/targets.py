"""Prometheus file-based service discovery from the fleet's node list (pure).

``clusterctl fleet targets`` writes what ``targets`` returns: one group per node that
should answer a scrape (running, idle, hibernating, or lost: a lost node's scrape
failing is news), labelled with its instance id and host name so that alert rules can
join the agent's series with the control plane's. A hibernated, waking, wake_failed or
revoked node is left out: its scrape failing is expected, and the control plane's own
series say what is wrong with it.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from clusterctl.errors import UsageError
from clusterctl.fleet.wake import NAME_RE

SCRAPED = ("running", "idle", "hibernating", "lost")
AGENT_PORT = 9408  # [api] listen's default port
Use = Literal["hostname", "address"]


def _host(node: Mapping[str, Any], use: Use) -> str | None:
    """Where to scrape the node: a host name checked as one, or the address its last
    heartbeat came from; None when the node gave neither in a usable form."""
    if use == "address":
        try:
            ip = ipaddress.ip_address(str(node.get("address") or ""))
        except ValueError:
            return None
        return f"[{ip}]" if ip.version == 6 else str(ip)
    for name in (node.get("hostname"), node.get("instance_id")):
        if isinstance(name, str) and NAME_RE.match(name):
            return name
    return None


def targets(nodes: Iterable[Mapping[str, Any]], *, port: int = AGENT_PORT,
            use: Use = "hostname") -> tuple[list[dict[str, Any]], list[str]]:
    """(file_sd groups, the instance ids left out for want of a usable host)."""
    if not 1 <= port <= 65535:
        raise UsageError(f"port {port} is not a TCP port", fix="give --port 1-65535")
    groups: list[dict[str, Any]] = []
    skipped: list[str] = []
    for node in sorted(nodes, key=lambda n: str(n.get("instance_id"))):
        if node.get("state") not in SCRAPED:
            continue
        host = _host(node, use)
        instance_id = str(node.get("instance_id"))
        if host is None:
            skipped.append(instance_id)
            continue
        hostname = node.get("hostname")
        groups.append({"targets": [f"{host}:{port}"],
                       "labels": {"instance_id": instance_id,
                                  "hostname": hostname if isinstance(hostname, str) and
                                  NAME_RE.match(hostname) else instance_id}})
    return groups, skipped


def render(groups: list[dict[str, Any]]) -> str:
    return json.dumps(groups, indent=2) + "\n"


def is_targets_file(text: str) -> bool:
    """Whether ``text`` is a file_sd JSON file (this command's or anyone's): the only kind
    of file ``--output`` replaces."""
    try:
        data = json.loads(text)
    except ValueError:
        return False
    return isinstance(data, list) and all(
        isinstance(g, dict) and isinstance(g.get("targets"), list) for g in data)
