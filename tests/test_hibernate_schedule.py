"""Schedules across time zones and DST changes (pure)."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from clusterctl import config as cfg
from clusterctl.errors import UsageError
from clusterctl.hibernate import schedule
from clusterctl.hibernate.controller import Hibernation
from clusterctl.hibernate.schedule import Schedule, due, next_at, validate
from tests.conftest import wait_until


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


SAO_PAULO = Schedule("09:00", "18:00", "America/Sao_Paulo")  # 18:00 there is 21:00 UTC
BUSY = (90.0,)  # one GPU at 90 %: a scheduled sleep does not wait for idleness


def scheduled_node(tmp_path: Path, clock: Clock, events: list[str]
                   ) -> tuple[Hibernation, Path]:
    """A Hibernation on a real config file (grace 60 s, a command that appends a line to
    ``action-ran`` each time it runs) with the Sao Paulo schedule saved; logind not asked."""
    ran = tmp_path / "action-ran"
    path = tmp_path / "clusterctl.toml"
    path.write_text(f'[hibernate]\nenabled = true\naction = "command"\nschedule_grace = 60\n'
                    f'command = ["sh", "-c", "echo ran >> {ran}"]\n'
                    f'[paths]\nstate_dir = "{tmp_path / "state"}"\nrun_dir = "{tmp_path}"\n')
    config = cfg.load(path).config
    schedule.save(config.paths.state_dir, SAO_PAULO)
    hib = Hibernation(config, instance_id="n", record=lambda k, r, d: events.append(k),
                      drain=lambda: None, control=lambda: None, clock=clock, logind=False)
    return hib, path


def not_acted(hib: Hibernation, events: list[str], ran: Path) -> None:
    assert "hibernate_started" not in events, events
    assert hib.state.status not in ("hibernating", "hibernated")
    assert not ran.exists()


def test_a_scheduled_sleep_waits_its_grace_then_acts_even_when_busy(tmp_path: Path) -> None:
    """sleep+0 warns, +30 s and +59 s still do nothing; +60 s (the grace) runs the action
    on a busy node, once."""
    sleep_at = utc("2026-11-23 21:00")
    clock = Clock(sleep_at - 60)
    events: list[str] = []
    hib, _ = scheduled_node(tmp_path, clock, events)
    ran = tmp_path / "action-ran"
    for offset in (-60, 0, 30, 59):
        clock.now = sleep_at + offset
        hib.observe(BUSY)
        not_acted(hib, events, ran)
    assert events == ["hibernate_scheduled"]
    clock.now = sleep_at + 60
    hib.observe(BUSY)
    assert events == ["hibernate_scheduled", "hibernate_started"]
    wait_until(lambda: hib.state.status == "hibernated", 10)
    assert ran.read_text() == "ran\n"
    assert events == ["hibernate_scheduled", "hibernate_started", "hibernated"]
    assert hib.next_times(clock.now) == {"timezone": "America/Sao_Paulo",
                                         "sleep_at": "2026-11-24T21:00:00Z",
                                         "wake_at": "2026-11-24T12:00:00Z"}


def test_the_warning_says_when_the_action_runs(tmp_path: Path) -> None:
    config = cfg.with_changes(
        cfg.Config(paths=cfg.PathsConfig(state_dir=tmp_path / "state", run_dir=tmp_path)),
        "hibernate", {"enabled": True, "action": "command", "schedule_grace": 60,
                      "command": ["true"]})
    schedule.save(tmp_path / "state", SAO_PAULO)
    clock = Clock(utc("2026-11-23 20:59"))
    said: list[tuple[str, str]] = []
    hib = Hibernation(config, instance_id="n", record=lambda k, r, d: said.append((k, r)),
                      drain=lambda: None, control=lambda: None, clock=clock, logind=False)
    clock.now = utc("2026-11-23 21:00")
    hib.observe(BUSY)
    assert said == [("hibernate_scheduled", "scheduled sleep at 18:00 America/Sao_Paulo: "
                     "the action runs in 60 s")]


def cli(conf: Path, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "clusterctl", "hibernate", *args,
                           "--config", str(conf)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def test_an_inhibit_held_at_the_scheduled_time_holds_the_sleep_off(tmp_path: Path) -> None:
    """`clusterctl hibernate inhibit` held when the grace ends: no action, however long
    it holds; cleared, the next sample acts."""
    sleep_at = next_at("18:00", SAO_PAULO.tz, time.time())  # within a day, in real time
    clock = Clock(sleep_at - 60)
    events: list[str] = []
    hib, conf = scheduled_node(tmp_path, clock, events)
    ran = tmp_path / "action-ran"
    cli(conf, "inhibit", "--for", "48h", "--why", "training run")  # covers sleep_at
    for offset in (0, 60, 61, 600):
        clock.now = sleep_at + offset
        hib.observe(BUSY)
        not_acted(hib, events, ran)
    assert events == ["hibernate_scheduled"]
    cli(conf, "inhibit", "--clear")
    clock.now = sleep_at + 601
    hib.observe(BUSY)
    wait_until(lambda: hib.state.status == "hibernated", 10)
    assert ran.read_text() == "ran\n"
    assert events == ["hibernate_scheduled", "hibernate_started", "hibernated"]


def test_a_manual_suspend_is_noticed_and_the_idle_clock_restarts(tmp_path: Path) -> None:
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
