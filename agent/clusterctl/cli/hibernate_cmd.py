"""`clusterctl hibernate status|config|now|events|heartbeat|inhibit`."""

from __future__ import annotations

import getpass
import re
import time
from typing import Annotated, Any

import typer

from clusterctl import config as cfg
from clusterctl.cli.common import DryRunOpt, Run, command, emit_json
from clusterctl.errors import EXIT_FAILED, TemporaryError, UsageError
from clusterctl.units import iso_utc

app = typer.Typer(help="Idle GPU machines go to sleep by themselves: status, actions, events.",
                  no_args_is_help=True)
schedule_app = typer.Typer(help="Daily wake and sleep times, in a time zone.",
                           no_args_is_help=True)
app.add_typer(schedule_app, name="schedule")
HIBERNATION_EVENTS = {"idle_detected", "active_again", "hibernate_started", "hibernated",
                      "hibernate_failed", "woke", "hibernate_scheduled"}


def _iso(ts: float | None) -> str | None:
    return None if ts is None else iso_utc(ts)


def status_dict(config: cfg.Config, *, logind: bool = True) -> dict[str, Any]:
    from clusterctl.config import instance_id
    from clusterctl.gpu import energy_store
    from clusterctl.hibernate import schedule
    from clusterctl.hibernate.controller import inhibited_by, load_state

    state = load_state(config.paths.state_dir)
    sched = schedule.load(config.paths.state_dir)
    h = config.hibernate
    return {
        "instance_id": instance_id(config),
        "status": state.status,
        "gpu_utilization": state.last_utilization,
        "last_activity": _iso(state.last_activity),
        "idle_since": _iso(state.idle_since),
        "auto_hibernation": {"enabled": h.enabled,
                             "pause_after_minutes": h.pause_after_minutes,
                             "gpu_usage_threshold": h.gpu_usage_threshold_percent},
        "action": list(h.action),
        "inhibited_by": inhibited_by(config.paths.state_dir, time.time(), logind=logind),
        "schedule": None if sched is None else _schedule_dict(sched),
        # what the GPUs burned idle and busy since boot, as the agent accounts it
        "gpu_energy": energy_store.summary(energy_store.peek(config.paths.run_dir,
                                                             energy_store.this_boot())),
    }


def _schedule_dict(sched: Any) -> dict[str, Any]:
    from clusterctl.hibernate.schedule import next_at

    now = time.time()
    return {"wake_time": sched.wake, "sleep_time": sched.sleep, "timezone": sched.tz,
            "next_wake": None if sched.wake is None else iso_utc(next_at(sched.wake,
                                                                         sched.tz, now)),
            "next_sleep": None if sched.sleep is None else iso_utc(next_at(sched.sleep,
                                                                           sched.tz, now))}


@command(app, "status", json=True)
def status_cmd(run: Run) -> None:
    """The node's hibernation status as the agent keeps it, as the control plane shows it."""
    data = status_dict(run.config)
    if run.json:
        emit_json(data)
        return
    auto = data["auto_hibernation"]
    print(f"{data['instance_id']}: {data['status']}"
          + (f" since {data['idle_since']}" if data["idle_since"] else "")
          + (f", GPU utilization {data['gpu_utilization']}%"
             if data["gpu_utilization"] is not None else ""))
    print(f"auto-hibernation {'on' if auto['enabled'] else 'off'}: after "
          f"{auto['pause_after_minutes']:g} min under {auto['gpu_usage_threshold']:g}% -> "
          f"{', '.join(data['action'])}")
    if data["inhibited_by"]:
        print(f"held off: {data['inhibited_by']}")
    spent = data["gpu_energy"]
    if spent is None:
        print("GPU energy since boot: not measured (the agent has not sampled the GPUs)")
    else:
        draw = spent["idle_power_w"]
        print(f"GPU energy since boot: idle time cost {spent['idle_kwh']:.3f} kWh "
              f"({spent['idle_hours']:g} GPU-hours idle"
              + ("" if draw is None else f", drawing {draw:g} W") + "); busy "
              f"{spent['busy_kwh']:.3f} kWh"
              + ("" if spent["sources"] == ["counter"]
                 else f" (from {', '.join(spent['sources']) or 'nothing yet'})"))
    if data["schedule"]:
        sched = data["schedule"]
        print(f"schedule ({sched['timezone']}): wake {sched['wake_time'] or '-'} (next "
              f"{sched['next_wake'] or '-'}), sleep {sched['sleep_time'] or '-'} (next "
              f"{sched['next_sleep'] or '-'})")


@command(app, "events", json=True)
def events_cmd(run: Run, limit: Annotated[int, typer.Option("--limit", min=1)] = 20) -> None:
    """Hibernation events, newest first ({"events": [...]})."""
    from clusterctl.events.log import EventLog

    c = run.config
    events = [e for e in EventLog(c.paths.state_dir, "").read()
              if e.get("event_type") in HIBERNATION_EVENTS][::-1][:limit]
    if run.json:
        emit_json({"events": events})
        return
    for e in events:
        util = e.get("gpu_utilization")
        print(f"{e['timestamp']}  {e['event_type']:<18} "
              f"{'' if util is None else f'{util}%  '}{e.get('reason', '')}")
    if not events:
        print("no hibernation events yet")


@command(app, "config", json=True)
def config_cmd(
    run: Run,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE", help="Change a [hibernate] key (repeatable); "
        "validated, written keeping comments.")] = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Show [hibernate], or change keys in the config file."""
    loaded = run.loaded
    current = loaded.config
    if set_:
        changes = {}
        for item in set_:
            key, sep, value = item.partition("=")
            if not sep:
                raise UsageError(f"--set {item}: expected KEY=VALUE, e.g. pause_after_minutes=5")
            changes[f"hibernate.{key.strip()}"] = value.strip()
        current = cfg.set_values(loaded.path, changes, dry_run=dry_run)
        if not dry_run:
            print(f"wrote {loaded.path}; the agent takes it on `systemctl reload "
                  "clusterctl-agent`")
    section = cfg.as_toml_dict(current)["hibernate"]
    if run.json:
        emit_json(section)
    else:
        for name, shown in section.items():
            print(f"{name} = {shown!r}")


@command(app, "now")
def now_cmd(run: Run, dry_run: DryRunOpt = False) -> None:
    """Run [hibernate] action now, whatever the GPUs are doing (--dry-run: say what).

    The running agent does it (through its local API), or, when no agent runs, this
    command: the same drain, wake timer, action, events and state either way."""
    from clusterctl.agent import local
    from clusterctl.config import instance_id
    from clusterctl.hibernate import actions
    from clusterctl.system import sleep

    c = run.config
    if dry_run:
        for action in c.hibernate.action:
            if action == "command":
                line = f"command: {' '.join(c.hibernate.command) or '(none set)'}"
            elif action == "control":
                line = (f"control: POST {c.heartbeat.control_url or '(no control_url)'}"
                        f"/api/instances/{instance_id(c)}/hibernate")
            elif action == "systemd":
                line = f"systemd: start {actions.systemd_target(c, sleep.can)}"
            else:
                line = "none: report only"
            print(f"would run {line}")
        return
    answer = local.ask(c, "POST", "/api/hibernate/now")
    if answer is not None:
        code, body = answer
        if code == 202:
            print("the agent is putting the node to sleep; follow it with "
                  "`clusterctl hibernate events`")
            return
        raise TemporaryError(f"the agent refused: {body.get('error', f'HTTP {code}')}",
                             fix="create [api] token_file (root, mode 0600) and restart the "
                                 "agent" if code in (401, 403) else None)
    outcome = _here(c).act_now("clusterctl hibernate now")
    for line in outcome.done:
        print(line)
    if not outcome.ok:
        print(f"clusterctl: {outcome.failed_action or 'hibernate'} failed: {outcome.error}")
        raise typer.Exit(EXIT_FAILED)


def _delivery(c: cfg.Config) -> Any:
    """A Delivery to [heartbeat] control_url, as the agent has; None without one."""
    from clusterctl.agent.control import ControlClient
    from clusterctl.agent.heartbeat import Delivery
    from clusterctl.config import instance_id
    from clusterctl.events.outbox import Outbox

    if not c.heartbeat.control_url:
        return None
    return Delivery(ControlClient(c.heartbeat),
                    Outbox(c.paths.state_dir, instance_id=instance_id(c)), c.paths.state_dir)


def _gpus(c: cfg.Config) -> list[dict[str, Any]]:
    """Every GPU as a heartbeat carries it, from one sample now (and the agent's energy
    accounting, when it keeps one)."""
    from clusterctl.gpu import energy_store
    from clusterctl.gpu.monitor import view_now
    from clusterctl.gpu.shapes import fleet_metrics
    from clusterctl.host.nvml import Nvml

    with Nvml() as nvml:
        snapshot = nvml.sample()
    views = tuple(view_now(g, c, None, snapshot.sampled_at) for g in snapshot.gpus)
    spent = energy_store.peek(c.paths.run_dir, energy_store.this_boot())
    gpus: list[dict[str, Any]] = fleet_metrics(snapshot, views, spent)["gpus"]
    return gpus


def _here(c: cfg.Config) -> Any:
    """The agent's hibernation controller, run by this command (no agent runs)."""
    from clusterctl.agent.control import ControlClient
    from clusterctl.agent.heartbeat import node_payload
    from clusterctl.config import instance_id
    from clusterctl.events.log import EventLog
    from clusterctl.hibernate import actions
    from clusterctl.hibernate.controller import Hibernation

    log = EventLog(c.paths.state_dir, instance_id(c))
    delivery = _delivery(c)
    hibernation: Hibernation

    def heartbeat() -> object:
        state = hibernation.state
        return delivery.heartbeat(node_payload(
            c, sequence=delivery.next_sequence(), now=time.time(), status=state.status,
            idle_since=state.idle_since, gpus=_gpus(c)))

    def drain() -> None:
        actions.drain(c, heartbeat=None if delivery is None else heartbeat,
                      flush=None if delivery is None else delivery.flush)

    def record(kind: str, reason: str, details: dict[str, Any]) -> None:
        log.record(kind, reason, details, now=time.time())

    def control() -> ControlClient | None:
        return ControlClient(c.heartbeat, c.paths.state_dir) if c.heartbeat.control_url else None

    hibernation = Hibernation(c, instance_id=instance_id(c), record=record, drain=drain,
                              control=control)
    return hibernation


@command(app, "heartbeat", json=True)
def heartbeat_cmd(
    run: Run,
    once: Annotated[bool, typer.Option("--once", help="Send one and exit.")] = False,
) -> None:
    """Send one heartbeat to [heartbeat] control_url now (the agent sends them normally):
    the payload the agent sends, built by the same code."""
    from clusterctl.agent.heartbeat import node_payload
    from clusterctl.hibernate.controller import load_state

    if not once:
        raise UsageError("only --once is supported here; the agent sends heartbeats")
    c = run.config
    delivery = _delivery(c)
    if delivery is None:
        raise UsageError("no [heartbeat] control_url to send to",
                         fix="clusterctl config set heartbeat.control_url https://...")
    state = load_state(c.paths.state_dir)
    payload = node_payload(c, sequence=delivery.next_sequence(), now=time.time(),
                           status=state.status, idle_since=state.idle_since, gpus=_gpus(c))
    ok = delivery.heartbeat(payload)
    if run.json:
        emit_json({"sent": ok, "error": delivery.state.last_error, "payload": payload})
    else:
        print(f"heartbeat {'accepted' if ok else 'failed: ' + str(delivery.state.last_error)}"
              f" ({c.heartbeat.control_url}/api/agent/status, sequence {payload['sequence']})")
    if not ok:
        raise typer.Exit(EXIT_FAILED)


_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([smhd])$")
MAX_INHIBIT_DAYS = 365


def parse_duration(text: str) -> float:
    """Seconds in "30m", "2h", "1d"; at most MAX_INHIBIT_DAYS, UsageError otherwise."""
    match = _DURATION.match(text.strip())
    if not match:
        raise UsageError(f'--for {text}: expected a duration like "30m", "2h" or "1d"')
    seconds = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    if not seconds <= MAX_INHIBIT_DAYS * 86400:  # also inf, from a thousand digits
        raise UsageError(f"--for {text}: at most {MAX_INHIBIT_DAYS}d",
                         fix="inhibit again when it ends, or set [hibernate] enabled = false")
    return seconds


@command(app, "inhibit")
def inhibit_cmd(
    run: Run,
    for_: Annotated[str | None, typer.Option(
        "--for", metavar="DURATION", help='How long, e.g. "2h".')] = None,
    why: Annotated[str, typer.Option("--why", help="Shown in status.")] = "",
    clear: Annotated[bool, typer.Option("--clear", help="End it now.")] = False,
) -> None:
    """Keep the node awake for a while (a long job), whatever the GPUs do."""
    from clusterctl.hibernate.controller import INHIBIT_FILE, inhibit

    c = run.config
    if clear:
        (c.paths.state_dir / INHIBIT_FILE).unlink(missing_ok=True)
        print("inhibit cleared")
        return
    if for_ is None:
        raise UsageError("--for DURATION is required (or --clear)")
    until = time.time() + parse_duration(for_)
    inhibit(c.paths.state_dir, until, why or "(no reason given)", getpass.getuser())
    print(f"hibernation held off until {iso_utc(until)}" + (f": {why}" if why else ""))


@command(schedule_app, "set")
def schedule_set_cmd(
    run: Run,
    wake: Annotated[str | None, typer.Option("--wake", metavar="HH:MM")] = None,
    sleep_at: Annotated[str | None, typer.Option("--sleep", metavar="HH:MM")] = None,
    tz: Annotated[str, typer.Option("--tz", help="An IANA time zone.")] = "UTC",
) -> None:
    """At --sleep the action runs even if busy (after a warning and [hibernate]
    schedule_grace); --wake goes to the control plane in heartbeats, and to a systemd
    wake timer (WakeSystem=yes) before a systemd sleep on bare metal."""
    from clusterctl.hibernate import schedule

    c = run.config
    sched = schedule.validate(wake, sleep_at, tz)
    schedule.save(c.paths.state_dir, sched)
    info = _schedule_dict(sched)
    print(f"schedule set ({tz}): wake {wake or '-'} (next {info['next_wake'] or '-'}), "
          f"sleep {sleep_at or '-'} (next {info['next_sleep'] or '-'})")


@command(schedule_app, "show", json=True)
def schedule_show_cmd(run: Run) -> None:
    """The schedule and its next times (UTC)."""
    from clusterctl.hibernate import schedule

    sched = schedule.load(run.config.paths.state_dir)
    data = None if sched is None else _schedule_dict(sched)
    if run.json:
        emit_json(data)
    elif data is None:
        print("no schedule")
    else:
        for key, value in data.items():
            print(f"{key}: {value}")


@command(schedule_app, "clear")
def schedule_clear_cmd(run: Run) -> None:
    """Remove the schedule."""
    from clusterctl.hibernate import schedule

    schedule.clear(run.config.paths.state_dir)
    print("schedule cleared")
