"""Hibernation inside the agent: observe each GPU sample, keep the state, run the action.

The state (running / idle / hibernating / hibernated, idle_since, last activity) is kept
in ``<state_dir>/hibernate.json`` so `clusterctl hibernate status` can show it and so
the first start after a hibernation can say ``woke``. Inhibitors are a file written
by `clusterctl hibernate inhibit` and logind's block inhibitors on sleep.

An action that fails, for whatever reason (its own error, an unexpected exception in
the draining, the wake alarm, the action or the event log), ends in
``hibernate_failed`` and the state back to ``running``: the idle clock starts again
and the next idle period acts again. Never "hibernating" for good.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from clusterctl.config import Config
from clusterctl.errors import ClusterctlError, TemporaryError
from clusterctl.hibernate import actions, schedule
from clusterctl.hibernate.idle import IdleRules, IdleState, Observation, finished, step
from clusterctl.host.procfs import cpu_usage_percent, read_cpu_times
from clusterctl.host.sessions import running, ssh_sessions
from clusterctl.system import sleep, statefile
from clusterctl.units import iso_utc

log = logging.getLogger("clusterctl.hibernate")
STATE_FILE = "hibernate.json"
INHIBIT_FILE = "hibernate-inhibit.json"


def rules_of(config: Config) -> IdleRules:
    h = config.hibernate
    return IdleRules(enabled=h.enabled and h.action != ("none",),
                     gpu_usage_threshold_percent=h.gpu_usage_threshold_percent,
                     pause_after_minutes=h.pause_after_minutes,
                     cpu_threshold_percent=h.cpu_threshold or None,
                     require_no_ssh=h.require_no_ssh)


STATE_SPEC = statefile.StateFile(STATE_FILE, "the hibernation state",
                                 statefile.Policy.START_OVER)
INHIBIT_SPEC = statefile.StateFile(INHIBIT_FILE, "the hibernation inhibitor",
                                   statefile.Policy.START_OVER)
_STATUSES = ("running", "idle", "hibernating", "hibernated")


def load_state(state_dir: Path) -> IdleState:
    """The saved state; a fresh ``running`` when there is none or it was damaged (kept
    aside, with an event): the idle clock starts again."""
    found = statefile.read(STATE_SPEC, state_dir, _parse_state)
    return IdleState() if found is None else found


def _parse_state(data: dict[str, Any]) -> IdleState:
    state = IdleState(**{k: data[k] for k in IdleState.__dataclass_fields__ if k in data})
    if state.status not in _STATUSES:
        raise ValueError(f"status {state.status!r} is not a hibernation status")
    for name in ("idle_since", "last_activity", "last_utilization"):
        value = getattr(state, name)
        if value is not None and (isinstance(value, bool) or
                                  not isinstance(value, (int, float))):
            raise TypeError(f"{name} {value!r} is not a number")
    return state


def save_state(state_dir: Path, state: IdleState) -> None:
    statefile.write(STATE_SPEC, state_dir, asdict(state))


def inhibit(state_dir: Path, until: float, why: str, by: str) -> None:
    statefile.write(INHIBIT_SPEC, state_dir, {"until": until, "why": why, "by": by})


def _parse_inhibit(data: dict[str, Any]) -> tuple[float, str]:
    until, why = data["until"], data.get("why", "")
    if isinstance(until, bool) or not isinstance(until, (int, float)):
        raise TypeError(f"until {until!r} is not a time")
    return float(until), str(why)


def inhibited_by(state_dir: Path, now: float, *, logind: bool = True) -> str | None:
    """Why sleep is held off now, or None. A damaged inhibitor file holds nothing off (it
    is kept aside, with an event); one that cannot be read at all is logged."""
    try:
        held = statefile.read(INHIBIT_SPEC, state_dir, _parse_inhibit, now=now)
    except ClusterctlError as err:
        log.warning("%s", err.one_line())
        held = None
    if held is not None and held[0] > now:
        left = (held[0] - now) / 60
        return f"clusterctl hibernate inhibit ({left:.0f} min left): {held[1]}"
    if logind:
        try:
            found = sleep.inhibitors()
        except Exception:  # no logind: nothing inhibits through it
            found = []
        if found:
            what, who, why, _ = found[0]
            return f"systemd inhibitor by {who}: {why} ({what})"
    return None


def _without_counts(reason: str) -> str:
    """A hold-off reason without its numbers ("(42 min left)"), to say each cause once."""
    return re.sub(r"\d+", "N", reason)


def slept_s() -> float:
    """Seconds this machine has spent suspended since boot: CLOCK_BOOTTIME counts them,
    CLOCK_MONOTONIC does not. A jump means a suspend, ours or anyone's."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) - time.monotonic()


SAVE_EVERY_S = 60.0  # a busy node's last activity reaches disk this often, not every sample
SUSPEND_GAP_S = 5.0  # a smaller jump is clock noise, not a sleep


def _log_failure(err: BaseException) -> None:
    log.error("hibernation: %s: %s", type(err).__name__, err, exc_info=err)


class Hibernation:
    def __init__(self, config: Config, *, instance_id: str,
                 record: Callable[[str, str, dict[str, Any]], None],
                 drain: Callable[[], None], control: Callable[[], Any | None],
                 clock: Callable[[], float] = time.time, logind: bool = True,
                 suspended: Callable[[], float] = slept_s,
                 failed: Callable[[BaseException], None] | None = None) -> None:
        self.config = config
        self.instance_id = instance_id
        self.record = record
        self.drain = drain
        self.control = control
        self.failed = failed if failed is not None else _log_failure
        self.clock = clock
        self.logind = logind
        self.state = load_state(config.paths.state_dir)
        self._cpu = read_cpu_times(Path("/"))
        self._busy = threading.Lock()
        self._state_lock = threading.RLock()
        self._held_reason: str | None = None
        self._schedule_checked = clock()
        self._scheduled_at: float | None = None  # when a scheduled sleep's grace ends
        self.suspended = suspended
        self._slept = suspended()
        self._saved_at: float | None = None  # when hibernate.json was last written
        self._save_error: str | None = None  # the last failure to write it, said once
        if self.state.status in ("hibernating", "hibernated"):
            self._event("woke", "the agent started after a hibernation", None)
            self.state = IdleState("running", None, clock(), self.state.last_utilization)
            self._save()

    def _save(self) -> None:
        """Write the state; a failure (a full disk) is said once until a write succeeds,
        and the state lives on in memory."""
        try:
            save_state(self.config.paths.state_dir, self.state)
        except (ClusterctlError, OSError) as err:
            problem = err.one_line() if isinstance(err, ClusterctlError) else str(err)
            if problem != self._save_error:
                log.error("cannot save the hibernation state: %s", problem)
            self._save_error = problem
            return
        self._saved_at = self.clock()
        self._save_error = None

    def _keep(self, before: IdleState, state: IdleState, now: float) -> None:
        """Take a new state: written when the status or idle clock changed; a mere newer
        last activity (each busy sample) at most every SAVE_EVERY_S."""
        self.state = state
        if (state.status, state.idle_since) != (before.status, before.idle_since) or \
                self._saved_at is None or now - self._saved_at >= SAVE_EVERY_S:
            self._save()

    def _event(self, kind: str, reason: str, util: float | None, **extra: Any) -> None:
        self.record(kind, reason, {"gpu_utilization": util, **extra})

    def observe(self, utilization: tuple[float | None, ...]) -> None:
        """One GPU sample's utilizations (None where unreadable)."""
        now = self.clock()
        slept = self.suspended()
        if slept - self._slept > SUSPEND_GAP_S:  # resumed from a suspend or hibernation
            self._event("woke", f"resumed after {slept - self._slept:.0f} s asleep",
                        self.state.last_utilization)
            with self._state_lock:
                if not self._busy.locked():
                    self.state = IdleState("running", None, now, self.state.last_utilization)
                    self._save()
        self._slept = slept
        h = self.config.hibernate
        cpu = None
        if h.cpu_threshold:
            current = read_cpu_times(Path("/"))
            cpu = cpu_usage_percent(self._cpu, current) if self._cpu and current else None
            self._cpu = current
        obs = Observation(now, utilization, cpu_percent=cpu,
                          ssh_sessions=ssh_sessions() if h.require_no_ssh else None,
                          busy_processes=running(h.busy_processes))
        with self._state_lock:  # an action that ends meanwhile must not be overwritten
            act = self._next(obs, now)
        if act:
            try:
                threading.Thread(target=self._act, name="hibernate", daemon=True).start()
            except RuntimeError as err:  # no thread to be had: a failure like any other
                self.failed(err)
                self._conclude(actions.Outcome(False, (), None, f"cannot start: {err}"))

    def _next(self, obs: Observation, now: float) -> bool:
        """Take one observation: the new state kept, its events recorded; whether to act.
        Called with the state lock held."""
        before = self.state
        state, events, act = step(before, obs, rules_of(self.config))
        if act:
            held = inhibited_by(self.config.paths.state_dir, now, logind=self.logind)
            if held is not None:
                if _without_counts(held) != _without_counts(self._held_reason or ""):
                    log.info("hibernation held off: %s", held)  # once, not each minute left
                self._held_reason = held
                state, events, act = before, tuple(e for e in events
                                                   if e.event_type != "hibernate_started"), False
        for event in events:
            self._event(event.event_type, event.reason, event.gpu_utilization)
        if not act and state.status != "hibernating" and self._scheduled(now, state):
            act = True
            state = replace(state, status="hibernating")
        if state != before:
            self._keep(before, state, now)
        return act

    def _scheduled(self, now: float, state: IdleState) -> bool:
        """A scheduled sleep: warn at the time, act after the grace (busy or not)."""
        sched = schedule.load(self.config.paths.state_dir)
        checked, self._schedule_checked = self._schedule_checked, now
        if sched is None:
            self._scheduled_at = None
            return False
        if self._scheduled_at is None:
            occurrence = schedule.due(sched, checked, now)
            if occurrence is None:
                return False
            grace = self.config.hibernate.schedule_grace_s
            self._scheduled_at = now + grace
            self._event("hibernate_scheduled", f"scheduled sleep at {sched.sleep} {sched.tz}: "
                        f"the action runs in {grace:g} s", state.last_utilization)
            log.warning("scheduled sleep at %s %s: the action runs in %g s", sched.sleep,
                        sched.tz, grace)
        if now < self._scheduled_at:
            return False
        held = inhibited_by(self.config.paths.state_dir, now, logind=self.logind)
        if held is not None:
            if _without_counts(held) != _without_counts(self._held_reason or ""):
                log.info("scheduled sleep held off: %s", held)
            self._held_reason = held
            return False
        self._scheduled_at = None
        self._event("hibernate_started", f"scheduled sleep at {sched.sleep} {sched.tz}",
                    state.last_utilization)
        return True

    def next_times(self, now: float) -> dict[str, Any] | None:
        """For heartbeats: when the node will be put to sleep and should be woken."""
        return schedule.next_times(self.config.paths.state_dir, now)

    def act_now(self, reason: str) -> actions.Outcome:
        """Run the action now, whatever the GPUs are doing (`hibernate now`, a control-plane
        command), and wait for it: the same drain, wake timer, action, events and state as
        an idle node's. TemporaryError while an action is running already."""
        self._begin(reason)
        return self._act()

    def start_now(self, reason: str) -> None:
        """``act_now`` in the background (the agent's API answers at once)."""
        self._begin(reason)
        try:
            threading.Thread(target=self._act, name="hibernate", daemon=True).start()
        except RuntimeError as err:
            self.failed(err)
            self._conclude(actions.Outcome(False, (), None, f"cannot start: {err}"))

    def _begin(self, reason: str) -> None:
        with self._state_lock:
            if self._busy.locked() or self.state.status == "hibernating":
                raise TemporaryError("the node is being put to sleep already",
                                     fix="follow it with `clusterctl hibernate events`")
            self._event("hibernate_started", reason, self.state.last_utilization)
            self.state = replace(self.state, status="hibernating")
            self._save()

    def _arm_wake(self) -> None:
        """Before a systemd sleep: a wake timer for the schedule's next wake time (systemd
        sets the RTC alarm), or, without a wake time, no clusterctl wake timer left over."""
        if "systemd" not in self.config.hibernate.action:
            return
        sched = schedule.load(self.config.paths.state_dir)
        if sched is None or sched.wake is None:
            try:
                sleep.clear_wake_timers()
            except Exception as err:  # the action will say what is wrong with systemd
                log.debug("cannot clear old wake timers: %s", err)
            return
        at = schedule.next_at(sched.wake, sched.tz, self.clock())
        timer = sleep.set_wake_timer(at)
        log.info("the node wakes itself at %s (%s)", iso_utc(at), timer)

    def _act(self) -> actions.Outcome:
        with self._busy:
            try:
                outcome = self._attempt()
            except Exception as err:  # whatever it was, the node must not stay "hibernating"
                self.failed(err)
                outcome = actions.Outcome(False, (), None, actions.describe(err))
            self._conclude(outcome)
            return outcome

    def _attempt(self) -> actions.Outcome:
        try:
            self.drain()
        except Exception:  # draining is best effort; the action still runs
            log.exception("draining before the action failed")
        try:
            self._arm_wake()
        except ClusterctlError as err:  # no wake alarm is no reason to stay awake
            log.warning("no wake timer: %s", err.one_line())
        except Exception as err:
            log.warning("no wake timer: %s: %s", type(err).__name__, err)
        wanted = self.config.hibernate.action
        try:
            control = self.control() if "control" in wanted else None
        except Exception as err:  # a control_url the client cannot use
            return actions.Outcome(False, (), "control", actions.describe(err))
        return actions.run(self.config, instance_id=self.instance_id, control=control,
                           clock=self.clock)

    def _conclude(self, outcome: actions.Outcome) -> None:
        """The event and the state after an action: hibernated, or running again."""
        util = self.state.last_utilization
        try:
            if outcome.ok:
                self._event("hibernated", "; ".join(outcome.done), util)
                log.warning("hibernated: %s", "; ".join(outcome.done))
            else:
                step_name = outcome.failed_action or "hibernate"
                self._event("hibernate_failed", f"{step_name}: {outcome.error}",
                            util, done=list(outcome.done))
                log.error("hibernation failed at %s: %s", step_name, outcome.error)
        except Exception as err:  # the event log failed: the state still moves on
            self.failed(err)
        finally:
            with self._state_lock:
                self.state = finished(self.state, outcome.ok, self.clock())
                self._save()
