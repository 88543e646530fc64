"""The closed list of commands a control plane may send a node (pure).

A command changes what the node's own CLI could change in ``[hibernate]``, its
schedule and its inhibit, or asks it to hibernate now. Nothing here runs code or names
a file: a control plane must not be a way into root on every node. ``parse`` is the
one check, used by the server before queueing and by the agent before applying.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from clusterctl.errors import UsageError

TYPES = ("hibernate", "set_hibernate", "set_schedule", "clear_schedule", "inhibit")
MAX_INHIBIT_S = 365 * 86400
MAX_REASON_CHARS = 200
MAX_PAUSE_MINUTES = 10080  # a week, as the agent accepts
_HHMM = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")  # fullmatch: no "9:00", no "\n"
_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
HIBERNATE_KEYS = {"enabled": "bool", "gpu_usage_threshold": "percent",
                  "pause_after_minutes": "minutes"}


def _number(value: object) -> bool:
    """A JSON number that is finite (an int of any size is: math.isfinite would overflow)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _hibernate_args(args: Mapping[str, Any]) -> dict[str, Any]:
    if not args:
        raise UsageError("set_hibernate needs at least one of enabled, gpu_usage_threshold, "
                         "pause_after_minutes")
    out: dict[str, Any] = {}
    for key, value in args.items():
        kind = HIBERNATE_KEYS.get(key)
        if kind is None:
            raise UsageError(f"set_hibernate cannot change {key!r:.80}; only "
                             f"{', '.join(HIBERNATE_KEYS)}")
        if kind == "bool" and not isinstance(value, bool):
            raise UsageError("enabled must be true or false")
        if kind == "percent" and not (_number(value) and 0 <= value <= 100):
            raise UsageError("gpu_usage_threshold must be a number from 0 to 100")
        if kind == "minutes" and not (isinstance(value, int) and not isinstance(value, bool)
                                      and 1 <= value <= MAX_PAUSE_MINUTES):
            raise UsageError("pause_after_minutes must be a whole number from 1 to "
                             f"{MAX_PAUSE_MINUTES}")
        out[key] = value
    return out


def _schedule_args(args: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(args) - {"wake", "sleep", "tz"}
    if unknown:
        raise UsageError(f"a schedule has wake, sleep and tz, not {sorted(unknown)!r:.100}")
    wake, sleep, tz = args.get("wake"), args.get("sleep"), args.get("tz", "UTC")
    for name, value in (("wake", wake), ("sleep", sleep)):
        if value is not None and not (isinstance(value, str) and _HHMM.fullmatch(value)):
            raise UsageError(f'{name} must be a time like "09:00", or null')
    if wake is None and sleep is None:
        raise UsageError("a schedule needs wake, sleep or both")
    if not isinstance(tz, str) or len(tz) > 64:
        raise UsageError('tz must be an IANA time zone like "Europe/Berlin"')
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as err:
        raise UsageError(f'tz {tz!r:.70} is not a time zone (e.g. "Europe/Berlin", "UTC")'
                         ) from err
    return {"wake": wake, "sleep": sleep, "tz": tz}


def _inhibit_args(args: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(args) - {"duration_s", "reason"}
    if unknown:
        raise UsageError(f"inhibit takes duration_s and reason, not {sorted(unknown)!r:.100}")
    duration, reason = args.get("duration_s"), args.get("reason", "")
    if not (isinstance(duration, int) and not isinstance(duration, bool)
            and 1 <= duration <= MAX_INHIBIT_S):
        raise UsageError(f"duration_s must be whole seconds from 1 to {MAX_INHIBIT_S}")
    if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS or \
            not reason.isprintable():
        raise UsageError(f"reason must be printable text of at most {MAX_REASON_CHARS} "
                         "characters")
    return {"duration_s": duration, "reason": reason}


def parse(kind: object, args: object) -> tuple[str, dict[str, Any]]:
    """(type, args) checked and normalized; UsageError naming what is wrong."""
    if not isinstance(kind, str) or kind not in TYPES:
        raise UsageError(f"unknown command {kind!r:.60}; commands are {', '.join(TYPES)}")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise UsageError(f"{kind}: args must be a JSON object")
    if kind in ("hibernate", "clear_schedule"):
        if args:
            raise UsageError(f"{kind} takes no args")
        return kind, {}
    if kind == "set_hibernate":
        return kind, _hibernate_args(args)
    if kind == "set_schedule":
        return kind, _schedule_args(args)
    return kind, _inhibit_args(args)


def valid_id(value: object) -> bool:
    """A command id as the server makes them: short, printable, no spaces."""
    return isinstance(value, str) and bool(_ID.fullmatch(value))
