"""The control plane's answer to a heartbeat: the next interval, and commands.

``{"next_interval_s": 30, "commands": [{"id": "c-1", "type": "hibernate", "args": {}}]}``

- ``next_interval_s``: a whole number of seconds from 10 to 86400; anything else is
  ignored (the node's ``[heartbeat] interval`` then).
- ``commands``: a closed list of types, each with its arguments checked strictly
  (``validate``, with the control plane's own check, ``clusterctl.fleet.commands``,
  pure); nothing else is ever run. Each id is handled once: the ids
  handled (the last 256) are kept in ``{state_dir}/commands.json`` before the command
  runs, so a restart never runs one twice. Each is acknowledged by an event,
  ``command_applied`` or ``command_failed`` (with ``error``), sent through the outbox.
  With ``[heartbeat] accept_commands = false`` every command is refused.
- A command without a usable id (not a string of 1 to 128 printable characters) cannot
  be acknowledged: it is skipped, and logged once. At most 32 new commands are run per
  answer (the control plane sends the rest again).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from clusterctl import config as cfg
from clusterctl.errors import ClusterctlError, HostError, UsageError
from clusterctl.fleet import commands as fleet_commands
from clusterctl.hibernate import controller, schedule
from clusterctl.system import statefile

log = logging.getLogger("clusterctl.agent")
MIN_INTERVAL_S = 10
MAX_INTERVAL_S = 86400  # [heartbeat] interval's own maximum
MAX_ID_CHARS = 128
KEPT_IDS = 256
MAX_LISTED = 1024  # commands looked at in one answer
MAX_PER_ANSWER = 32  # new commands run from one answer
REFUSED = "this node refuses commands ([heartbeat] accept_commands = false)"
FILE_NAME = "commands.json"
SPEC = statefile.StateFile(FILE_NAME, "the control plane's commands handled",
                           statefile.Policy.START_OVER)
_NO_ARGS: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class Directions:
    next_interval_s: int | None  # None: [heartbeat] interval
    commands: tuple[Any, ...]  # as received (validated one by one)


@dataclass(frozen=True)
class Command:
    id: str
    type: str
    args: Mapping[str, Any]  # checked: only the keys and types of its type


class BadCommand(ValueError):
    """A command this node will not run: what is wrong with it, in one line."""


def directions(body: Any) -> Directions:
    """What an answer asks, whatever it holds (pure): a body that is not an object, a
    value of the wrong type, asks nothing."""
    if not isinstance(body, dict):
        return Directions(None, ())
    interval = body.get("next_interval_s")
    if not (isinstance(interval, int) and not isinstance(interval, bool)
            and MIN_INTERVAL_S <= interval <= MAX_INTERVAL_S):
        interval = None
    listed = body.get("commands")
    return Directions(interval, tuple(listed[:MAX_LISTED]) if isinstance(listed, list) else ())


def command_id(raw: Any) -> str | None:
    """The command's id when it can be acknowledged: 1 to 128 printable ASCII characters,
    no spaces (pure)."""
    found = raw.get("id") if isinstance(raw, dict) else None
    if not isinstance(found, str) or not 1 <= len(found) <= MAX_ID_CHARS:
        return None
    return found if all("!" <= c <= "~" for c in found) else None


def command_type(raw: Any) -> str | None:
    """The type as sent, when it is a short string (for the acknowledgement) (pure)."""
    found = raw.get("type") if isinstance(raw, dict) else None
    return found[:64] if isinstance(found, str) else None


def validate(raw: Any) -> Command:
    """The command, checked: a known type and exactly its arguments, each of its type and
    in range (pure). BadCommand naming the problem otherwise."""
    cid = command_id(raw)
    if cid is None:
        raise BadCommand("the command has no id of 1 to 128 printable characters")
    kind = raw.get("type")
    try:
        kind, args = fleet_commands.parse(kind, raw.get("args"))
    except UsageError as err:
        raise BadCommand(err.message) from err
    return Command(cid, kind, MappingProxyType(dict(args)) if args else _NO_ARGS)


# -- running them -----------------------------------------------------------------------


class Node(Protocol):
    """What a command needs of the agent."""

    config: cfg.Config
    config_path: Path | None
    clock: Callable[[], float]

    def reload(self) -> None: ...

    def hibernate_now(self, reason: str) -> None: ...


def _typed(value: Any) -> str:
    """A checked argument as `clusterctl hibernate config --set` would take it typed."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(float(value)) if isinstance(value, float) else str(value)


def apply(node: Node, command: Command) -> str:
    """Run a checked command on ``node``: what was done, in a few words. ClusterctlError
    when it could not be done."""
    args = command.args
    state_dir = node.config.paths.state_dir
    if command.type == "hibernate":  # in the background, as POST /api/hibernate/now
        node.hibernate_now(f"the control plane asked (command {command.id})")
        return "[hibernate] action started"
    if command.type == "set_hibernate":
        path = cfg.resolve_path(node.config_path)[0]
        cfg.set_values(path, {f"hibernate.{key}": _typed(value) for key, value in args.items()})
        node.reload()  # as SIGHUP
        h = node.config.hibernate
        running = {"enabled": h.enabled, "gpu_usage_threshold": h.gpu_usage_threshold_percent,
                   "pause_after_minutes": h.pause_after_minutes}
        if any(running[key] != value for key, value in args.items()):
            raise HostError(f"wrote {path}, but the running agent did not take it (the "
                            "reload was refused)", fix="see the agent's journal")
        return f"{path}: " + ", ".join(f"{key} = {_typed(v)}" for key, v in args.items())
    if command.type == "set_schedule":
        schedule.save(state_dir, schedule.Schedule(args["wake"], args["sleep"], args["tz"]))
        return f"wake {args['wake'] or '-'}, sleep {args['sleep'] or '-'} ({args['tz']})"
    if command.type == "clear_schedule":
        schedule.clear(state_dir)
        return "schedule cleared"
    if command.type == "inhibit":
        until = node.clock() + args["duration_s"]
        controller.inhibit(state_dir, until, args["reason"] or "(no reason given)",
                           "the control plane")
        return f"hibernation held off for {args['duration_s']} s"
    raise AssertionError(f"validate() let {command.type!r} through")  # pragma: no cover


def _ids_of(data: dict[str, Any]) -> list[str]:
    handled = data.get("handled")
    if not isinstance(handled, list) or not all(isinstance(i, str) for i in handled):
        raise TypeError("handled is not a list of ids")
    return handled[-KEPT_IDS:]


class Commands:
    """Handles the commands of each answer: once per id, acknowledged by an event."""

    def __init__(self, state_dir: Path, *, run: Callable[[Command], str],
                 record: Callable[[str, str, dict[str, Any]], None],
                 accepting: Callable[[], bool]) -> None:
        self.state_dir = state_dir
        self.run = run
        self.record = record
        self.accepting = accepting
        self._handled: list[str] | None = None  # read from commands.json at first use
        self._said: set[str] = set()

    def handle(self, listed: tuple[Any, ...]) -> int:
        """Each new command of an answer (at most MAX_PER_ANSWER): kept as handled, run
        (or refused) and acknowledged. How many were new."""
        done = 0
        for raw in listed:
            if done >= MAX_PER_ANSWER:
                break
            cid = command_id(raw)
            if cid is None:
                self._say("a command without an id of 1 to 128 printable characters was "
                          "skipped: it cannot be acknowledged")
                continue
            if cid in self._ids():
                continue
            done += 1
            self._keep(cid)  # before it runs: a crash never runs it twice
            self._one(cid, raw)
        return done

    def _one(self, cid: str, raw: Any) -> None:
        details: dict[str, Any] = {"command_id": cid, "command_type": command_type(raw)}
        if not self.accepting():
            self._failed(details, REFUSED)
            return
        try:
            command = validate(raw)
            what = self.run(command)
        except BadCommand as err:
            self._failed(details, str(err))
        except ClusterctlError as err:
            self._failed(details, err.one_line())
        except Exception as err:  # a full disk, say: failed, never the loop's end
            self._failed(details, f"{type(err).__name__}: {err}"[:300])
        else:
            self.record("command_applied", f"{command.type} from the control plane: {what}",
                        details)

    def _failed(self, details: dict[str, Any], error: str) -> None:
        line = " ".join(error.split())[:300]
        self.record("command_failed",
                    f"{details['command_type'] or 'a command'} from the control plane "
                    f"refused: {line}", {**details, "error": line})

    def _ids(self) -> list[str]:
        if self._handled is None:
            try:
                self._handled = statefile.read(SPEC, self.state_dir, _ids_of) or []
            except ClusterctlError as err:
                self._say(f"cannot read {self.state_dir / FILE_NAME}: {err.one_line()}")
                self._handled = []
        return self._handled

    def _keep(self, cid: str) -> None:
        handled = self._ids()
        handled.append(cid)
        del handled[:-KEPT_IDS]
        try:
            statefile.write(SPEC, self.state_dir, {"handled": handled})
        except (OSError, ClusterctlError) as err:  # kept in memory meanwhile
            why = err.one_line() if isinstance(err, ClusterctlError) else err.strerror
            self._say(f"cannot keep the commands handled in {self.state_dir / FILE_NAME}: "
                      f"{why}")

    def _say(self, problem: str) -> None:
        if problem not in self._said and len(self._said) < 64:
            self._said.add(problem)
            log.warning("%s", problem)
