"""Schedules across time zones and DST changes (pure)."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from clusterctl.errors import UsageError
from clusterctl.hibernate.schedule import Schedule, due, next_at, validate


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")


def test_the_next_time_in_a_zone() -> None:
    after = utc("2026-11-23 12:00")  # 09:00 in Sao Paulo (UTC-3, no DST since 2019)
    assert iso(next_at("18:00", "America/Sao_Paulo", after)) == "2026-11-23 21:00"
    assert iso(next_at("09:00", "America/Sao_Paulo", after)) == "2026-11-24 12:00"  # just past
    assert iso(next_at("09:00", "Asia/Tokyo", after)) == "2026-11-24 00:00"
    assert iso(next_at("00:30", "UTC", after)) == "2026-11-24 00:30"


def test_spring_forward_a_skipped_time_happens_just_after_the_gap() -> None:
    # Berlin, 2026-03-29: 02:00 local jumps to 03:00 (01:00 UTC)
    after = utc("2026-03-28 12:00")
    assert iso(next_at("02:30", "Europe/Berlin", after)) == "2026-03-29 01:00"
    assert iso(next_at("03:30", "Europe/Berlin", after)) == "2026-03-29 01:30"  # CEST now
    assert iso(next_at("01:30", "Europe/Berlin", after)) == "2026-03-29 00:30"  # CET still


def test_fall_back_a_doubled_time_happens_the_first_time() -> None:
    # New York, 2026-11-01: 02:00 EDT goes back to 01:00 EST (06:00 UTC)
    after = utc("2026-10-31 12:00")
    assert iso(next_at("01:30", "America/New_York", after)) == "2026-11-01 05:30"
    assert iso(next_at("18:00", "America/New_York", after)) == "2026-10-31 22:00"  # EDT
    assert iso(next_at("18:00", "America/New_York", utc("2026-11-01 12:00"))) == \
        "2026-11-01 23:00"  # EST after the change


def test_due_fires_once_per_occurrence() -> None:
    schedule = Schedule("09:00", "18:00", "America/Sao_Paulo")
    start = utc("2026-11-23 20:59")
    assert due(schedule, start, utc("2026-11-23 20:59:30")) is None
    fired = due(schedule, start, utc("2026-11-23 21:00:10"))
    assert fired is not None and iso(fired) == "2026-11-23 21:00"
    assert due(schedule, utc("2026-11-23 21:00:10"), utc("2026-11-23 21:05")) is None
    assert due(Schedule("09:00", None, "UTC"), start, start + 86400) is None


def test_bad_input_is_one_clear_line() -> None:
    with pytest.raises(UsageError, match='--wake 9am: expected a time like "09:00"'):
        validate("9am", None, "UTC")
    with pytest.raises(UsageError, match="--tz Mars/Olympus: not a time zone"):
        validate("09:00", "18:00", "Mars/Olympus")
    with pytest.raises(UsageError, match="give --wake, --sleep or both"):
        validate(None, None, "UTC")
    assert validate("7:05", None, "UTC") == Schedule("7:05", None, "UTC")


# -- in the agent's controller, with a fake clock ------------------------------------


class Clock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def test_a_scheduled_sleep_warns_then_acts_even_when_busy(tmp_path: Path) -> None:
    from clusterctl import config as cfg
    from clusterctl.hibernate import schedule
    from clusterctl.hibernate.controller import Hibernation

    marker = tmp_path / "slept"
    config = cfg.with_changes(
        cfg.Config(paths=cfg.PathsConfig(state_dir=tmp_path / "state", run_dir=tmp_path)),
        "hibernate", {"enabled": True, "action": "command", "schedule_grace": 60,
                      "command": ["touch", str(marker)]})
    schedule.save(tmp_path / "state", Schedule("09:00", "18:00", "America/Sao_Paulo"))
    clock = Clock(utc("2026-11-23 20:58"))
    events: list[tuple[str, str]] = []
    hib = Hibernation(config, instance_id="n", record=lambda k, r, d: events.append((k, r)),
                      drain=lambda: None, control=lambda: None, clock=clock, logind=False)
    busy = (90.0,)
    for minute in range(4):  # 20:58 .. 21:01 UTC, sampled each minute; 18:00 local = 21:00
        clock.now = utc("2026-11-23 20:58") + 60 * minute
        hib.observe(busy)
    assert [k for k, _ in events] == ["hibernate_scheduled", "hibernate_started"]
    assert events[0][1] == ("scheduled sleep at 18:00 America/Sao_Paulo: the action runs "
                            "in 60 s")
    deadline = time.monotonic() + 10
    while hib.state.status != "hibernated" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert hib.state.status == "hibernated" and marker.exists()
    assert hib.next_times(clock.now) == {"timezone": "America/Sao_Paulo",
                                         "sleep_at": "2026-11-24T21:00:00Z",
                                         "wake_at": "2026-11-24T12:00:00Z"}


def test_a_manual_suspend_is_noticed_and_the_idle_clock_restarts(tmp_path: Path) -> None:
    from clusterctl import config as cfg
    from clusterctl.hibernate.controller import Hibernation

    config = cfg.with_changes(
        cfg.Config(paths=cfg.PathsConfig(state_dir=tmp_path / "state", run_dir=tmp_path)),
        "hibernate", {"enabled": True, "action": "command", "command": ["true"]})
    asleep = [0.0]
    clock = Clock(1_000.0)
    events: list[str] = []
    hib = Hibernation(config, instance_id="n", record=lambda k, r, d: events.append(k),
                      drain=lambda: None, control=lambda: None, clock=clock, logind=False,
                      suspended=lambda: asleep[0])
    hib.observe((0.0,))
    assert hib.state.status == "idle" and hib.state.idle_since == 1_000.0
    clock.now, asleep[0] = 4_000.0, 2_990.0  # someone ran `systemctl suspend`
    hib.observe((0.0,))
    assert events == ["idle_detected", "woke", "idle_detected"]
    assert hib.state.idle_since == 4_000.0  # not 50 minutes idle: it was asleep
