"""Wake and sleep times in a time zone (pure): the next occurrence, across DST changes.

A local time that does not exist on a day (the hour skipped when clocks go forward)
happens at the first instant after the gap; one that happens twice (clocks go back)
happens the first time.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from clusterctl.errors import ClusterctlError, UsageError
from clusterctl.system import statefile
from clusterctl.units import iso_utc

FILE_NAME = "hibernate-schedule.json"
SPEC = statefile.StateFile(FILE_NAME, "the hibernation schedule", statefile.Policy.START_OVER)
log = logging.getLogger("clusterctl.hibernate")
_HHMM = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


@dataclass(frozen=True)
class Schedule:
    wake: str | None  # "09:00", local to tz
    sleep: str | None  # "18:00"
    tz: str  # "America/Sao_Paulo"


def validate(wake: str | None, sleep: str | None, tz: str) -> Schedule:
    for name, value in (("--wake", wake), ("--sleep", sleep)):
        if value is not None and not _HHMM.match(value):
            raise UsageError(f'{name} {value}: expected a time like "09:00" or "18:30"')
    if wake is None and sleep is None:
        raise UsageError("give --wake, --sleep or both")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as err:
        raise UsageError(f'--tz {tz}: not a time zone (e.g. "America/Sao_Paulo", "UTC")'
                         ) from err
    return Schedule(wake, sleep, tz)


def next_at(hhmm: str, tz: str, after: float) -> float:
    """The first instant after ``after`` when the clock in ``tz`` shows ``hhmm``."""
    zone = ZoneInfo(tz)
    match = _HHMM.match(hhmm)
    assert match, hhmm
    hour, minute = int(match.group(1)), int(match.group(2))
    local = datetime.fromtimestamp(after, tz=zone)
    for days in range(3):
        day = (local + timedelta(days=days)).date()
        wall = datetime(day.year, day.month, day.day, hour, minute, tzinfo=zone)  # fold=0
        instant = wall.astimezone(timezone.utc)
        back = instant.astimezone(zone)
        if (back.hour, back.minute) != (hour, minute):  # in a gap: the first instant after
            instant = (wall.replace(tzinfo=None) - timedelta(hours=3)).replace(tzinfo=zone)
            instant = instant.astimezone(timezone.utc)
            while instant.astimezone(zone).replace(tzinfo=None) < wall.replace(tzinfo=None):
                instant += timedelta(minutes=1)
        if instant.timestamp() > after:
            return instant.timestamp()
    raise AssertionError("unreachable: a time of day recurs within three days")


def due(schedule: Schedule, last_checked: float, now: float) -> float | None:
    """The sleep occurrence in (last_checked, now], if there is one."""
    if schedule.sleep is None:
        return None
    occurrence = next_at(schedule.sleep, schedule.tz, last_checked)
    return occurrence if occurrence <= now else None


def next_times(state_dir: Path, now: float) -> dict[str, Any] | None:
    """What every heartbeat carries: when the node will be put to sleep and should be
    woken (ISO-8601 UTC), in the saved schedule's zone; None without a schedule."""
    sched = load(state_dir)
    if sched is None:
        return None
    return {"timezone": sched.tz,
            "sleep_at": None if sched.sleep is None else iso_utc(
                next_at(sched.sleep, sched.tz, now)),
            "wake_at": None if sched.wake is None else iso_utc(
                next_at(sched.wake, sched.tz, now))}


def load(state_dir: Path) -> Schedule | None:
    """The saved schedule; None when there is none. A file that holds anything `hibernate
    schedule set` would not have written is kept aside (with an event) and reads as none;
    one that cannot be read at all reads as none too: a damaged file must never stop idle
    detection or heartbeats, and `schedule set` writes a good one again."""
    try:
        return statefile.read(SPEC, state_dir, _parse)
    except ClusterctlError as err:
        log.warning("%s", err.one_line())
        return None


def _parse(data: dict[str, Any]) -> Schedule:
    wake, sleep, tz = data.get("wake"), data.get("sleep"), data.get("tz")
    if not all(v is None or isinstance(v, str) for v in (wake, sleep)) or \
            not isinstance(tz, str):
        raise TypeError("wake, sleep and tz are not the strings `schedule set` writes")
    try:
        return validate(wake, sleep, tz)
    except UsageError as err:
        raise ValueError(err.message) from err


def save(state_dir: Path, schedule: Schedule) -> None:
    statefile.write(SPEC, state_dir, asdict(schedule))


def clear(state_dir: Path) -> None:
    statefile.remove(SPEC, state_dir)
