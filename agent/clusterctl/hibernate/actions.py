"""The hibernation actions, in order; the first failure stops the rest.

- ``none``: report only.
- ``command``: ``[hibernate] command`` (argv, no shell) with a timeout, e.g. a snapshot.
- ``control``: ``POST {control_url}/api/instances/{id}/hibernate``: the control plane
  snapshots and destroys the instance.
- ``systemd``: start ``[hibernate] systemd_unit`` (hibernate.target by default). For
  the sleep targets logind is asked first (CanHibernate...); when it says no, the
  ``fallback`` target is used, or the action is refused: never half asleep.

Whatever an action raises, it is that action's failure (with the exception's text),
never an exception out of ``run``. Before the actions, ``drain`` (a last heartbeat,
Ollama's models unloaded, the outbox sent) is the same for an idle node, `hibernate
now` and a control-plane command.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clusterctl.config import Config
from clusterctl.errors import ClusterctlError, HostError
from clusterctl.host.software import read_loaded_models
from clusterctl.system import sleep
from clusterctl.system.memory import unload_model

log = logging.getLogger("clusterctl.hibernate")
FALLBACK_UNITS = {"suspend": "suspend.target", "poweroff": "poweroff.target"}


@dataclass(frozen=True)
class Outcome:
    ok: bool
    done: tuple[str, ...]  # what each action did
    failed_action: str | None = None
    error: str | None = None


def describe(err: Exception) -> str:
    """One line for an action's failure: the project's message, or the exception's text."""
    if isinstance(err, ClusterctlError):
        return err.one_line()
    return f"unexpected {type(err).__name__}: {err}"


def drain(config: Config, *, heartbeat: Callable[[], object] | None,
          flush: Callable[[], object] | None) -> None:
    """Before the action: a last heartbeat (it says ``hibernating``), Ollama's models
    unloaded, the outbox sent. Best effort: what cannot be done is logged, and the action
    still runs."""
    if heartbeat is not None:
        heartbeat()
    try:
        models = read_loaded_models(config.ollama.url, timeout_s=2.0)
    except ClusterctlError:
        models = ()
    for model in models:
        try:
            unload_model(config.ollama.url, model.name)
            log.info("unloaded %s before hibernating", model.name)
        except ClusterctlError as err:
            log.warning("%s", err.one_line())
    if flush is not None:
        flush()


def systemd_target(config: Config, can: Callable[[str], str | None]) -> str:
    """The unit to start: the configured one, or its fallback when logind says no."""
    unit = config.hibernate.systemd_unit
    answer = can(unit)
    if answer in (None, "yes"):
        return unit
    fallback = config.hibernate.fallback
    if fallback == "refuse":
        raise HostError(f"logind says this node cannot {unit.removesuffix('.target')} "
                        f"({answer}: no resume swap, or disabled)",
                        fix='set [hibernate] fallback = "suspend" or "poweroff", or give it '
                        "a resume swap area")
    other = FALLBACK_UNITS[fallback]
    other_answer = can(other)
    if other_answer not in (None, "yes"):
        raise HostError(f"logind says this node can neither {unit.removesuffix('.target')} "
                        f"({answer}) nor {fallback} ({other_answer})")
    return other


def run(config: Config, *, instance_id: str, control: Any | None,
        can: Callable[[str], str | None] = sleep.can,
        start_unit: Callable[[str], None] = sleep.start_unit,
        clock: Callable[[], float] = time.time) -> Outcome:
    """Run ``[hibernate] action`` in order. ``control`` posts to the control plane."""
    done: list[str] = []
    for action in config.hibernate.action:
        try:
            if action == "none":
                done.append("none: reported only")
            elif action == "command":
                tail = sleep.run_command(config.hibernate.command,
                                         config.hibernate.command_timeout_s)
                done.append(f"command {config.hibernate.command[0]} succeeded"
                            + (f": {tail}" if tail else ""))
            elif action == "control":
                if control is None:
                    raise HostError('the "control" action needs [heartbeat] control_url')
                answer = control.post(f"/api/instances/{instance_id}/hibernate",
                                      {"instance_id": instance_id, "requested_at": clock()})
                body = answer.body if isinstance(answer.body, dict) else {}
                done.append("control plane accepted"
                            + (f": snapshot {body['snapshot_id']}" if "snapshot_id" in body
                               else ""))
            elif action == "systemd":
                unit = systemd_target(config, can)
                start_unit(unit)
                done.append(f"started {unit}")
        except ClusterctlError as err:
            return Outcome(False, tuple(done), action, err.one_line())
        except Exception as err:  # a bug or a surprise: this action failed, nothing escapes
            log.error("the %s action failed unexpectedly", action, exc_info=err)
            return Outcome(False, tuple(done), action, describe(err))
    return Outcome(True, tuple(done))
