"""`clusterctl fleet serve`: the control plane's HTTP server (aiohttp).

Node side: ``POST /api/agent/enroll`` (the join token, once), ``/api/agent/status``
(heartbeats: answered from memory, the database written only on a change) and
``/api/agent/events`` (stored once each by id, commands acknowledged in the same
transaction). Operator side, behind the admin token: the instances, their config,
schedule, events, hibernate, inhibit, wake and revoke; fleet statistics; ``/metrics``.
``/healthz`` is open.

Every answer that is not a success is a JSON object ``{"error", "fix"}``; bodies are
limited to ``MAX_BODY_BYTES``; a database that is down or locked is a 503 and nothing
the node sent is acknowledged, so its outbox keeps it. The liveness loop (once a
second) marks silent nodes lost or hibernated, times out wakes, wakes nodes at their
scheduled wake time, and pings systemd's watchdog.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import secrets
import signal
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime
from typing import Any, TypeVar

import sdnotify
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from clusterctl import __version__
from clusterctl.agent.control import read_token
from clusterctl.config import FleetConfig
from clusterctl.errors import ClusterctlError, HostError, UsageError
from clusterctl.fleet import commands as fleet_commands
from clusterctl.fleet import history as fleet_history
from clusterctl.fleet import nodes as fleet_nodes
from clusterctl.fleet import page as fleet_page
from clusterctl.fleet import wake as fleet_wake
from clusterctl.fleet.nodes import Node
from clusterctl.fleet.store import Command, DatabaseUnavailable, Refused, Store, open_store
from clusterctl.gpu import energy as gpu_energy
from clusterctl.system import wake as system_wake
from clusterctl.units import iso_utc

log = logging.getLogger("clusterctl.fleet")
MAX_BODY_BYTES = 1 << 20
TICK_CHUNK = 1000  # nodes looked at before the liveness pass lets requests in
_HEARTBEATING = frozenset(("running", "idle", "hibernating"))
MAX_HEARTBEAT_BYTES = 256 << 10  # a node's last heartbeat stays in memory: 8 GPUs are ~6 KiB
MAX_BATCH_EVENTS = 10000
MAX_EVENT_BYTES = 16 << 10  # an agent's events are well under 2 KiB; a bigger one is cut
MAX_EVENTS_LIMIT = 1000
LOOP_PERIOD_S = 1.0
# node events worth a series of their own per node in /metrics (the alert rules use them)
NOTABLE_EVENTS = ("hibernate_failed", "wake_failed", "swap_growth_blocked", "swap_failed",
                  "command_failed", "outbox_overflow")
MAX_EVENT_TYPES = 100  # distinct event_type labels in /metrics; the rest count as "other"
DB_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpError(ClusterctlError):
    """An answer other than success, with its status."""

    def __init__(self, status: int, message: str, fix: str | None = None) -> None:
        super().__init__(message, fix=fix)
        self.status = status


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    value = value.strip()
    # tokens are printable ASCII: anything else (bytes aiohttp kept as surrogates) is none
    ok = scheme.lower() == "bearer" and value.isascii() and value.isprintable()
    return value if ok and value else None


def _printable(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` with what cannot be stored or shown replaced."""
    return "".join(c if c.isprintable() else "\ufffd" for c in text[:limit])


def _finite(value: object) -> float | None:
    """A JSON number as a finite float, else None (bools, 1e309, 10**400)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _loads(raw: bytes) -> Any:
    """JSON as Python reads it, but NaN, Infinity and numbers beyond a float are null:
    they would otherwise come back out in answers that strict parsers refuse."""
    return json.loads(raw, parse_constant=lambda _name: None,
                      parse_float=lambda text: _finite(float(text)))


def _bounded(event: dict[str, Any]) -> dict[str, Any]:
    """The event as stored: one over MAX_EVENT_BYTES keeps its identity and a cut reason,
    and says how big it was (the page and the API hand events out 50 at a time)."""
    size = len(json.dumps(event, separators=(",", ":")))
    if size <= MAX_EVENT_BYTES:
        return event
    kept = {k: event[k] for k in ("id", "event_type", "timestamp", "instance_id",
                                  "command_id") if isinstance(event.get(k), str)
            and len(event[k]) <= 256}
    reason = event.get("reason")
    return {**kept, "reason": _printable(reason, 500) if isinstance(reason, str) else None,
            "cut_from_bytes": size}


def _error(status: int, message: str, fix: str | None = None) -> web.Response:
    return web.json_response({"error": message, "fix": fix}, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure as one JSON answer; nothing a client sends ends in a traceback."""
    try:
        return await handler(request)
    except HttpError as err:
        return _error(err.status, err.message, err.fix)
    except Refused as err:
        return _error(err.status, err.message, err.fix)
    except DatabaseUnavailable as err:
        return _error(503, err.message, err.fix)
    except UsageError as err:
        return _error(400, err.message, err.fix)
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"the body is over {MAX_BODY_BYTES} bytes",
                      "send less at once (events in smaller batches)")
    except web.HTTPException as err:
        if err.status >= 400:
            return _error(err.status, err.reason)
        raise
    except ClusterctlError as err:
        return _error(500, err.message, err.fix)
    except Exception:  # a bug: logged with its traceback, the client gets a short answer
        log.exception("%s %s failed", request.method, request.path)
        return _error(500, "the control plane failed on this request; see its journal")


class Fleet:
    """The control plane: its memory of the nodes, the store, and the HTTP handlers."""

    def __init__(self, config: FleetConfig, store: Store, *,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.monotonic = monotonic
        self.nodes: dict[str, Node] = {}
        self.by_token: dict[str, str] = {}
        self.pending: dict[str, list[Command]] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.live_count = 0
        self.heartbeats = 0
        self.events_stored = 0
        self.scheduled_wakes: dict[str, str] = {}  # instance -> wake_at already acted on
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fleet-db")
        self._notifier = sdnotify.SystemdNotifier()
        self.wakes: set[asyncio.Task[None]] = set()  # scheduled wakes under way
        self.history = fleet_history.History()
        self.events_received: dict[str, int] = {}  # by event_type
        self.node_events: dict[tuple[str, str], int] = {}  # (instance, notable type)
        self.wake_results: dict[tuple[str, str], int] = {}  # (method, result)
        self.db_latency: dict[str, Latency] = {}  # by operation

    # -- memory ------------------------------------------------------------------
    def load(self) -> None:
        now_mono = self.monotonic()
        self.nodes = {row["instance_id"]: Node.from_row(row, now_mono)
                      for row in self.store.nodes()}
        self.by_token = {n.token_hash: n.instance_id for n in self.nodes.values()
                         if n.token_hash}
        self.pending = {}
        for command in self.store.pending_commands():
            self.pending.setdefault(command.instance_id, []).append(command)
        self._count_live()

    def _count_live(self) -> None:
        """The nodes the interval is spread over: every node that heartbeats, or will again
        (a lost or waking one too: an overloaded server that loses nodes must not ask the
        others to heartbeat faster)."""
        self.live_count = sum(1 for n in self.nodes.values()
                              if n.state not in ("hibernated", "revoked"))

    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn`` on the database threads; how long it took is kept for /metrics."""
        took: list[float] = []

        def timed() -> T:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took.append(time.perf_counter() - started)

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, timed)
        finally:
            if took:
                name = getattr(fn, "__name__", "call")
                latency = self.db_latency.get(name)
                if latency is None:
                    latency = self.db_latency[name] = Latency()
                latency.add(took[0])

    def _noted(self, node: Node, event_types: list[str]) -> None:
        """Count events for /metrics: by type, and the notable ones per node."""
        for event_type in event_types:
            key = event_type if event_type in self.events_received or \
                len(self.events_received) < MAX_EVENT_TYPES else "other"
            self.events_received[key] = self.events_received.get(key, 0) + 1
            if event_type in NOTABLE_EVENTS:
                pair = (node.instance_id, event_type)
                self.node_events[pair] = self.node_events.get(pair, 0) + 1

    def _wake_result(self, result: str) -> None:
        key = (self.config.wake, result)
        self.wake_results[key] = self.wake_results.get(key, 0) + 1

    def _lock(self, instance_id: str) -> asyncio.Lock:
        lock = self.locks.get(instance_id)
        if lock is None:
            lock = self.locks[instance_id] = asyncio.Lock()
        return lock

    def _event(self, event_type: str, node: str, reason: str, now: float,
               **details: Any) -> dict[str, Any]:
        return {"id": str(uuid.uuid4()), "event_type": event_type, "timestamp": iso_utc(now),
                "instance_id": node, "reason": reason, **details}

    # -- auth --------------------------------------------------------------------
    def _node_of(self, request: web.Request) -> Node:
        token = _bearer(request)
        node_id = self.by_token.get(token_hash(token)) if token else None
        node = self.nodes.get(node_id) if node_id else None
        if node is None:
            raise HttpError(401, "this node token is unknown or revoked",
                            "the agent enrols again with the join token in its "
                            "[heartbeat] token_file")
        return node

    def _still_enrolled(self, request: web.Request, node: Node) -> None:
        """Under the node's lock, after its body arrived: the token is still the node's
        (the operator may have revoked it while the body was on its way)."""
        if self._node_of(request) is not node:
            raise HttpError(401, "this node token is unknown or revoked",
                            "the agent enrols again with the join token in its "
                            "[heartbeat] token_file")

    def _admin(self, request: web.Request) -> None:
        path = self.config.admin_token_file
        try:
            expected = read_token(path)
        except ClusterctlError as err:
            raise HttpError(500, f"the admin token cannot be read: {err.message}",
                            err.fix) from err
        if expected is None:
            raise HttpError(401, f"no admin token is set up ({path} is missing or empty)",
                            f"put a token in {path} (root-only, mode 0600)")
        given = _bearer(request)
        if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
            raise HttpError(401, "the admin token is missing or wrong",
                            f"send Authorization: Bearer <the token in {path}>")

    def _instance(self, request: web.Request) -> Node:
        self._admin(request)
        node = self.nodes.get(request.match_info["id"])
        if node is None:
            raise HttpError(404, f"no instance {request.match_info['id']!r:.100}",
                            "clusterctl fleet nodes lists them")
        return node

    # -- bodies ------------------------------------------------------------------
    async def _json(self, request: web.Request, kind: type,
                    limit_bytes: int = MAX_BODY_BYTES) -> Any:
        raw = await request.read()
        if len(raw) > limit_bytes:
            raise HttpError(413, f"the body is {len(raw)} bytes, over {limit_bytes}",
                            "send less at once")
        try:
            body = _loads(raw) if raw.strip() else None
        except (ValueError, RecursionError) as err:
            raise HttpError(400, f"the body is not JSON: {str(err)[:100]}") from err
        if not isinstance(body, kind):
            shape = "object" if kind is dict else "array"
            raise HttpError(400, f"the body must be a JSON {shape}")
        return body

    # -- node side ---------------------------------------------------------------
    async def enroll(self, request: web.Request) -> web.Response:
        join = read_token(self.config.join_token_file)
        given = _bearer(request)
        if join is None:
            raise HttpError(401, "this control plane has no join token",
                            f"put one in {self.config.join_token_file} (mode 0600)")
        if given is None or not hmac.compare_digest(given.encode(), join.encode()):
            raise HttpError(401, "the join token is missing or wrong",
                            "put the fleet's join token in the node's [heartbeat] token_file")
        body = await self._json(request, dict)
        instance_id, hostname = body.get("instance_id"), body.get("hostname", "")
        if not isinstance(instance_id, str) or not fleet_wake.NAME_RE.match(instance_id):
            raise HttpError(400, "instance_id must be a host-name-like id (letters, digits, "
                            "'.', '_', '-'; at most 253)")
        if not isinstance(hostname, str) or len(hostname) > 253 or not hostname.isprintable():
            raise HttpError(400, "hostname must be printable text of at most 253 characters")
        token = secrets.token_urlsafe(32)
        now = self.clock()
        async with self._lock(instance_id):
            await self.db(self.store.enrol, instance_id, hostname, token_hash(token), now,
                          self._event("node_enrolled", instance_id,
                                      f"enrolled from {request.remote}", now))
            node = Node(instance_id=instance_id, hostname=hostname, enrolled_at=now,
                        state="running", state_since=now, token_hash=token_hash(token),
                        last_seen=now, seen_mono=self.monotonic())
            self.nodes[instance_id] = node
            self.by_token[token_hash(token)] = instance_id
            self.live_count += 1  # not a recount: enrolling 10,000 nodes stays linear
        log.info("node %s enrolled", instance_id)
        return web.json_response({"instance_id": instance_id, "node_token": token})

    async def status(self, request: web.Request) -> web.Response:
        node = self._node_of(request)
        body = await self._json(request, dict, MAX_HEARTBEAT_BYTES)  # each is kept in memory
        if body.get("instance_id") != node.instance_id:
            raise HttpError(403, f"this token is {node.instance_id}'s; it cannot send for "
                            f"{str(body.get('instance_id'))[:100]!r}")
        reported = body.get("status")
        if not isinstance(reported, str) or reported not in fleet_nodes.REPORTED:
            raise HttpError(400, f"status must be one of {', '.join(fleet_nodes.REPORTED)}")
        now, now_mono = self.clock(), self.monotonic()
        self.heartbeats += 1
        async with self._lock(node.instance_id):
            self._still_enrolled(request, node)
            node.last_seen, node.seen_mono = now, now_mono
            node.reported = reported
            node.address = request.remote
            fields = self._reported_fields(node, body)
            change = fleet_nodes.on_heartbeat(node, reported,
                                              fleet_nodes.text(body.get("boot_id"), 64))
            events: list[dict[str, Any]] = []
            if change is not None:
                fields.update(self._transition(node, change.state, now))
                if change.event:
                    events.append(self._event(change.event, node.instance_id, change.reason,
                                              now))
                if change.event == "woke" and node.state in ("waking", "wake_failed"):
                    self._wake_result("woke")
            if fields or events:
                fields.update(last_seen=now, heartbeat=body)
                await self.db(self.store.update_node, node.instance_id, fields, events, now)
                self._apply(node, fields)
                if change is not None:
                    self._count_live()
            node.heartbeat = body
            node.assigned_s = fleet_nodes.next_interval(
                node.interval_s, self.live_count, self.config.max_heartbeats_per_s)
        return web.json_response({
            "next_interval_s": node.assigned_s,
            "commands": [c.wire() for c in self.pending.get(node.instance_id, ())],
        })

    def _reported_fields(self, node: Node, body: dict[str, Any]) -> dict[str, Any]:
        """What the heartbeat changes that is kept in the database (only what differs)."""
        fields: dict[str, Any] = {}
        gpus = body.get("gpus")
        count = len(gpus) if isinstance(gpus, list) else 0
        node.gpu_utilization = _finite(body.get("gpu_utilization"))
        accept = body.get("accept_commands")
        node.accept_commands = accept if isinstance(accept, bool) else None
        raw_net = body.get("net")
        net: dict[str, Any] = raw_net if isinstance(raw_net, dict) else {}
        mac = net.get("mac")
        mac = mac.lower() if isinstance(mac, str) and fleet_wake.MAC_RE.match(mac.lower()) \
            else None
        interface = fleet_nodes.text(net.get("interface"), 64)
        interval = body.get("interval_s")
        interval = interval if isinstance(interval, int) and not isinstance(interval, bool) \
            and 1 <= interval <= 86400 else node.interval_s
        hibernate = body.get("hibernate") if isinstance(body.get("hibernate"), dict) else None
        sched = body.get("schedule") if isinstance(body.get("schedule"), dict) else None
        boot_id = fleet_nodes.text(body.get("boot_id"), 64)
        version = fleet_nodes.text(body.get("agent_version"), 64)
        hostname = fleet_nodes.text(body.get("hostname"), 253)
        wanted = {"gpus": count, "mac": mac or node.mac, "interface": interface or node.interface,
                  "interval_s": interval, "hibernate": hibernate, "schedule": sched,
                  "boot_id": boot_id or node.boot_id,
                  "agent_version": version or node.agent_version,
                  "hostname": hostname or node.hostname}
        for key, value in wanted.items():
            if getattr(node, key) != value:
                fields[key] = value
        return fields

    def _transition(self, node: Node, state: str, now: float) -> dict[str, Any]:
        """The fields that move a node to ``state`` (time asleep added up on waking)."""
        fields: dict[str, Any] = {"state": state, "state_since": now}
        if node.state in fleet_nodes.ASLEEP and state not in fleet_nodes.ASLEEP:
            fields["hibernated_s"] = fleet_nodes.asleep_s(node, now)
            fields["idle_gpu_s_avoided"] = fleet_nodes.idle_gpu_s(node, now)
        if state == "hibernated" and node.state in fleet_nodes.ASLEEP:
            fields.pop("state_since")  # still the same sleep
        if state != "waking":
            fields["wake_started_at"] = None
        return fields

    @staticmethod
    def _apply(node: Node, fields: dict[str, Any]) -> None:
        for key, value in fields.items():
            if key != "heartbeat" and hasattr(node, key):
                setattr(node, key, value)
        if fields.get("state") != "waking" and "state" in fields:
            node.wake_started_mono = None

    async def events(self, request: web.Request) -> web.Response:
        node = self._node_of(request)
        batch = await self._json(request, list)
        if len(batch) > MAX_BATCH_EVENTS:
            raise HttpError(413, f"{len(batch)} events in one batch; at most {MAX_BATCH_EVENTS}")
        acks: list[tuple[str, bool, str | None]] = []
        for event in batch:
            if not isinstance(event, dict) or fleet_nodes.text(event.get("id"), 128) is None or \
                    fleet_nodes.text(event.get("event_type"), 64) is None:
                raise HttpError(400, "each event needs an id (at most 128 characters) and an "
                                "event_type (at most 64), both printable text")
            if event.get("instance_id") != node.instance_id:
                raise HttpError(403, f"this token is {node.instance_id}'s; an event says it is "
                                f"from {str(event.get('instance_id'))[:100]!r}")
            if event["event_type"] in ("command_applied", "command_failed") and \
                    fleet_commands.valid_id(event.get("command_id")):
                error = event.get("error")
                acks.append((event["command_id"], event["event_type"] == "command_applied",
                             _printable(error, 500) if isinstance(error, str) else None))
        batch = [_bounded(event) for event in batch]
        now = self.clock()
        async with self._lock(node.instance_id):
            self._still_enrolled(request, node)
            new, duplicates = await self.db(self.store.add_events, node.instance_id, batch,
                                            now, acks)
            self._noted(node, new)
            done = {command_id for command_id, _, _ in acks}
            if done and node.instance_id in self.pending:
                self.pending[node.instance_id] = [
                    c for c in self.pending[node.instance_id] if c.id not in done]
            await self._events_move_state(node, batch, now)
        self.events_stored += len(new)
        return web.json_response({"stored": len(new), "duplicates": duplicates})

    async def _events_move_state(self, node: Node, batch: list[dict[str, Any]],
                                 now: float) -> None:
        """A node's `hibernated` event: it is going to sleep now (its last word)."""
        if any(e["event_type"] == "hibernated" for e in batch) and \
                node.state not in fleet_nodes.ASLEEP and node.state != "revoked":
            fields = self._transition(node, "hibernated", now)
            await self.db(self.store.update_node, node.instance_id, fields,
                          [self._event("node_hibernated", node.instance_id,
                                       "the node reported that it hibernated", now)], now)
            self._apply(node, fields)
            self._count_live()

    async def node_hibernate_request(self, request: web.Request, node: Node) -> web.Response:
        """The node's own `control` hibernation action: it is about to go to sleep."""
        now = self.clock()
        async with self._lock(node.instance_id):
            fields = {} if node.state == "hibernating" else \
                self._transition(node, "hibernating", now)
            await self.db(self.store.update_node, node.instance_id, fields,
                          [self._event("hibernate_requested", node.instance_id,
                                       "the node asked to be hibernated", now)], now)
            self._apply(node, fields)
            node.reported = "hibernating"
        return web.json_response({"success": True, "instance_destroyed": False})

    # -- operator side -----------------------------------------------------------
    async def healthz(self, _request: web.Request) -> web.Response:
        try:
            await self.db(self.store.ping)
        except DatabaseUnavailable as err:
            return web.json_response({"status": "unhealthy", "database": err.message},
                                     status=503)
        return web.json_response({"status": "ok", "database": "ok",
                                  "nodes": len(self.nodes), "version": __version__})

    async def instances(self, request: web.Request) -> web.Response:
        self._admin(request)
        listed = list(self.nodes.values())
        now = self.clock()

        def render() -> str:  # 10,000 nodes take a quarter second: off the event loop
            return json.dumps({"now": iso_utc(now),
                               "instances": [n.summary(now) for n in
                                             sorted(listed, key=lambda n: n.instance_id)]})

        return web.Response(text=await asyncio.to_thread(render),
                            content_type="application/json")

    async def instance_status(self, request: web.Request) -> web.Response:
        node = self._instance(request)
        return web.json_response({
            **node.summary(self.clock()), "heartbeat": node.heartbeat,
            "pending_commands": [c.shown() for c in self.pending.get(node.instance_id, ())]})

    async def get_config(self, request: web.Request) -> web.Response:
        node = self._instance(request)
        return web.json_response({
            "hibernate": node.hibernate,
            "pending": [c.shown() for c in self.pending.get(node.instance_id, ())
                        if c.type == "set_hibernate"]})

    async def put_config(self, request: web.Request) -> web.Response:
        node = self._instance(request)
        body = await self._json(request, dict)
        return await self._queue(node, "set_hibernate", body)

    async def get_schedule(self, request: web.Request) -> web.Response:
        node = self._instance(request)
        return web.json_response({"schedule": node.schedule})

    async def put_schedule(self, request: web.Request) -> web.Response:
        node = self._instance(request)
        return await self._queue(node, "set_schedule", await self._json(request, dict))

    async def delete_schedule(self, request: web.Request) -> web.Response:
        return await self._queue(self._instance(request), "clear_schedule", {})

    async def inhibit(self, request: web.Request) -> web.Response:
        node = self._instance(request)
        return await self._queue(node, "inhibit", await self._json(request, dict))

    async def hibernate(self, request: web.Request) -> web.Response:
        token = _bearer(request)
        node_id = self.by_token.get(token_hash(token)) if token else None
        if node_id is not None and node_id == request.match_info["id"]:
            return await self.node_hibernate_request(request, self.nodes[node_id])
        return await self._queue(self._instance(request), "hibernate", {})

    async def _queue(self, node: Node, kind: str, args: object) -> web.Response:
        if node.state == "revoked":
            raise HttpError(409, f"{node.instance_id} is revoked; it takes no commands")
        kind, checked = fleet_commands.parse(kind, args)
        now = self.clock()
        command = Command(id=f"c-{uuid.uuid4().hex[:20]}", instance_id=node.instance_id,
                          type=kind, args=checked, created_at=now)
        await self.db(self.store.add_command, command,
                      self._event("command_queued", node.instance_id,
                                  f"{kind} queued by the operator", now,
                                  command_id=command.id, command_type=kind, args=checked))
        self.pending.setdefault(node.instance_id, []).append(command)
        note = None
        if node.accept_commands is False:
            note = "this node refuses commands ([heartbeat] accept_commands = false)"
        return web.json_response({"command": command.shown(), "note": note}, status=202)

    async def events_of(self, request: web.Request) -> web.Response:
        node = self._instance(request)
        raw = request.query.get("limit", "50")
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 4) or \
                not 1 <= int(raw) <= MAX_EVENTS_LIMIT:
            raise HttpError(400, f"limit must be a whole number from 1 to {MAX_EVENTS_LIMIT}")
        found = await self.db(self.store.events, node.instance_id, int(raw))
        return web.json_response({"events": found})

    async def wake(self, request: web.Request) -> web.Response:
        node = self._instance(request)
        return web.json_response(await self.wake_node(node, "the operator asked"), status=202)

    async def wake_node(self, node: Node, why: str) -> dict[str, Any]:
        if node.state not in ("hibernated", "lost", "wake_failed", "hibernating"):
            raise HttpError(409, f"{node.instance_id} is {node.state}; only a hibernated, lost "
                            "or wake_failed node is woken")
        target = fleet_wake.Target(node.instance_id, node.hostname or node.instance_id,
                                   node.mac)
        now = self.clock()
        try:
            # not on the database's threads: a wake command may take its whole minute
            done = await asyncio.to_thread(
                lambda: system_wake.send(fleet_wake.plan(self.config, target)))
        except (HostError, UsageError) as err:
            self._wake_result("failed")
            self._noted(node, ["wake_failed"])
            await self.db(self.store.update_node, node.instance_id, {},
                          [self._event("wake_failed", node.instance_id, err.one_line(), now,
                                       method=self.config.wake)], now)
            raise HttpError(502 if isinstance(err, HostError) else 400, err.message,
                            err.fix) from err
        async with self._lock(node.instance_id):
            fields = self._transition(node, "waking", now)
            fields["wake_started_at"] = now
            await self.db(self.store.update_node, node.instance_id, fields,
                          [self._event("wake_sent", node.instance_id, f"{why}: {done}", now,
                                       method=self.config.wake)], now)
            self._apply(node, fields)
            node.wake_started_mono = self.monotonic()
            self._count_live()
        self._wake_result("sent")
        return {"instance_id": node.instance_id, "state": "waking", "method": self.config.wake,
                "done": done}

    async def revoke(self, request: web.Request) -> web.Response:
        node = self._instance(request)
        body = await self._json(request, dict) if request.can_read_body else {}
        forget = body.get("forget", False) if isinstance(body, dict) else False
        if not isinstance(forget, bool):
            raise HttpError(400, "forget must be true or false")
        now = self.clock()
        async with self._lock(node.instance_id):
            await self.db(self.store.revoke, node.instance_id, now, forget=forget,
                          event=self._event("node_revoked", node.instance_id,
                                            "forgotten by the operator" if forget
                                            else "revoked by the operator", now))
            if node.token_hash:
                self.by_token.pop(node.token_hash, None)
            self.pending.pop(node.instance_id, None)
            if forget:
                self.nodes.pop(node.instance_id, None)
                for key in [k for k in self.node_events if k[0] == node.instance_id]:
                    del self.node_events[key]  # an id enrolled again starts afresh
            else:
                node.token_hash, node.state, node.state_since = None, "revoked", now
            self._count_live()
        return web.json_response({"instance_id": node.instance_id, "revoked": True,
                                  "forgotten": forget})

    def stats_now(self) -> dict[str, Any]:
        now = self.clock()
        counts = dict.fromkeys(fleet_nodes.STATES, 0)
        for node in self.nodes.values():
            counts[node.state] = counts.get(node.state, 0) + 1
        return {"nodes": len(self.nodes), **counts,
                "hibernated_hours": round(sum(fleet_nodes.asleep_s(n, now)
                                              for n in self.nodes.values()) / 3600, 3),
                "idle_gpu_hours_avoided": round(sum(fleet_nodes.idle_gpu_s(n, now)
                                                    for n in self.nodes.values()) / 3600, 3),
                **_gpu_kwh(self.nodes.values())}

    async def stats(self, request: web.Request) -> web.Response:
        self._admin(request)
        return web.json_response(self.stats_now())

    async def history_of(self, request: web.Request) -> web.Response:
        self._admin(request)
        return web.json_response(self.history.shown(self.clock()))

    async def metrics(self, request: web.Request) -> web.Response:
        """The series are taken here, on the loop, so that they agree with each other;
        the text (3 MB at 10,000 nodes) is rendered in a thread."""
        self._admin(request)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Taken(list(_Collector(self).collect())))
        return web.Response(body=await asyncio.to_thread(generate_latest, registry),
                            content_type="text/plain", charset="utf-8",
                            headers={"X-Version": "0.0.4"})

    # -- the liveness loop ---------------------------------------------------------
    async def tick(self) -> None:
        """One pass: silence, wake timeouts, scheduled wakes. A node that heartbeat
        recently costs one comparison, and the pass lets requests in every TICK_CHUNK
        nodes: at 10,000 nodes it must not hold heartbeats up for tens of milliseconds."""
        now, now_mono = self.clock(), self.monotonic()
        nodes = list(self.nodes.values())
        for start in range(0, len(nodes), TICK_CHUNK):
            if start:
                await asyncio.sleep(0)
            for node in nodes[start:start + TICK_CHUNK]:
                seen = node.seen_mono
                if node.state in _HEARTBEATING and seen is not None and \
                        now_mono - seen <= fleet_nodes.silent_limit_s(node):
                    continue  # heard from in time: nothing can change
                await self._silent(node, now, now_mono)
                if node.state == "hibernated":
                    await self._scheduled_wake(node, now)
        self._count_live()
        if self.history.due(now):
            self.history.sample(now, self.nodes.values())

    async def _silent(self, node: Node, now: float, now_mono: float) -> None:
        change = fleet_nodes.on_silence(node, now_mono, self.config.resume_timeout_s)
        if change is None:
            return
        async with self._lock(node.instance_id):
            fields = self._transition(node, change.state, now)
            if change.state == "hibernated" and node.last_seen is not None:
                fields["state_since"] = node.last_seen  # asleep since its last word
            event = self._event(change.event or change.state, node.instance_id,
                                change.reason, now)
            await self.db(self.store.update_node, node.instance_id, fields, [event], now)
            self._apply(node, fields)
            if change.state == "wake_failed":
                self._wake_result("timed_out")
                self._noted(node, ["wake_failed"])
            log.warning("%s: %s (%s)", node.instance_id, change.state, change.reason)

    async def _scheduled_wake(self, node: Node, now: float) -> None:
        """Start the wake of a node whose schedule says it is time; the wake runs on its
        own, so that a slow one does not hold up the pass (and systemd's watchdog)."""
        wake_at = node.schedule.get("wake_at") if isinstance(node.schedule, dict) else None
        if node.state != "hibernated" or not isinstance(wake_at, str) or \
                self.scheduled_wakes.get(node.instance_id) == wake_at:
            return
        with contextlib.suppress(ValueError, OverflowError):
            if datetime.fromisoformat(wake_at.replace("Z", "+00:00")).timestamp() > now:
                return
            self.scheduled_wakes[node.instance_id] = wake_at
            task = asyncio.create_task(self._wake_on_schedule(node, wake_at))
            self.wakes.add(task)
            task.add_done_callback(self.wakes.discard)

    async def _wake_on_schedule(self, node: Node, wake_at: str) -> None:
        try:
            await self.wake_node(node, f"its schedule wakes it at {wake_at}")
        except ClusterctlError as err:
            log.warning("%s: the scheduled wake failed: %s", node.instance_id, err.one_line())
        except Exception:  # a bug: logged; the next pass goes on
            log.exception("%s: the scheduled wake failed", node.instance_id)

    async def liveness_loop(self) -> None:
        while True:
            try:
                await self.tick()
                self._notifier.notify(f"WATCHDOG=1\nSTATUS={self._status_line()}")
            except DatabaseUnavailable as err:
                log.warning("%s", err.one_line())
            except Exception:  # the loop outlives any one failure
                log.exception("the liveness pass failed; it runs again in %g s", LOOP_PERIOD_S)
            await asyncio.sleep(LOOP_PERIOD_S)

    def _status_line(self) -> str:
        stats = self.stats_now()
        return (f"{stats['nodes']} nodes: {stats['running']} running, {stats['idle']} idle, "
                f"{stats['hibernated']} hibernated, {stats['lost']} lost; "
                f"{self.heartbeats} heartbeats")

    # -- the app -----------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_post("/api/agent/enroll", self.enroll)
        app.router.add_post("/api/agent/status", self.status)
        app.router.add_post("/api/agent/events", self.events)
        app.router.add_get("/api/instances", self.instances)
        app.router.add_get("/api/instances/{id}/status", self.instance_status)
        app.router.add_get("/api/instances/{id}/config", self.get_config)
        app.router.add_put("/api/instances/{id}/config", self.put_config)
        app.router.add_get("/api/instances/{id}/schedule", self.get_schedule)
        app.router.add_put("/api/instances/{id}/schedule", self.put_schedule)
        app.router.add_delete("/api/instances/{id}/schedule", self.delete_schedule)
        app.router.add_get("/api/instances/{id}/events", self.events_of)
        app.router.add_post("/api/instances/{id}/hibernate", self.hibernate)
        app.router.add_post("/api/instances/{id}/inhibit", self.inhibit)
        app.router.add_post("/api/instances/{id}/wake", self.wake)
        app.router.add_post("/api/instances/{id}/revoke", self.revoke)
        app.router.add_get("/api/hibernation/stats", self.stats)
        app.router.add_get("/api/fleet/history", self.history_of)
        app.router.add_get("/metrics", self.metrics)
        fleet_page.add_routes(app)  # the fleet page at /
        return app

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.store.close()


def _gpu_kwh(nodes: Iterable[Node]) -> dict[str, float]:
    """What the nodes' GPUs burned idle and busy, each since its node's boot, as their
    last heartbeats say; a heartbeat is read once (the sums are kept on the node)."""
    idle = busy = 0.0
    for node in nodes:
        kept = node.extra.get("gpu_joules")
        if kept is None or kept[0] is not node.heartbeat:
            kept = node.extra["gpu_joules"] = (node.heartbeat,
                                               *gpu_energy.heartbeat_joules(node.heartbeat))
        idle, busy = idle + kept[1], busy + kept[2]
    return {"idle_gpu_kwh": round(gpu_energy.kwh(idle), 3),
            "busy_gpu_kwh": round(gpu_energy.kwh(busy), 3)}


class _Collector:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Any:
        stats = self.fleet.stats_now()
        nodes = GaugeMetricFamily("clusterctl_fleet_nodes", "Nodes by state", labels=["state"])
        for state in fleet_nodes.STATES:
            nodes.add_metric([state], stats[state])
        yield nodes
        yield CounterMetricFamily("clusterctl_fleet_heartbeats", "Heartbeats received",
                                  value=self.fleet.heartbeats)
        yield CounterMetricFamily("clusterctl_fleet_events_stored",
                                  "Node events stored (duplicates not counted)",
                                  value=self.fleet.events_stored)
        yield GaugeMetricFamily("clusterctl_fleet_hibernated_hours",
                                "Node-hours spent hibernated", value=stats["hibernated_hours"])
        yield GaugeMetricFamily("clusterctl_fleet_idle_gpu_hours_avoided",
                                "GPU-hours not spent idle because their node slept",
                                value=stats["idle_gpu_hours_avoided"])
        pending = sum(len(v) for v in self.fleet.pending.values())
        yield GaugeMetricFamily("clusterctl_fleet_commands_pending",
                                "Commands queued and not yet acknowledged", value=pending)
        yield from self._per_node()
        received = CounterMetricFamily("clusterctl_fleet_events_received",
                                       "Node events stored, by type (beyond 100 types: other)",
                                       labels=["event_type"])
        for event_type, count in sorted(self.fleet.events_received.items()):
            received.add_metric([event_type], count)
        yield received
        wakes = CounterMetricFamily("clusterctl_fleet_wakes", "Wakes by method and result "
                                    "(sent, failed to send, woke, timed_out)",
                                    labels=["method", "result"])
        for (method, result), count in sorted(self.fleet.wake_results.items()):
            wakes.add_metric([method, result], count)
        yield wakes
        latency = HistogramMetricFamily("clusterctl_fleet_database_seconds",
                                        "Time of each database call, by operation",
                                        labels=["operation"])
        for operation, h in sorted(self.fleet.db_latency.items()):
            latency.add_metric([operation], h.buckets(), h.sum_s)
        yield latency

    def _per_node(self) -> Any:
        fleet = self.fleet
        now_mono = fleet.monotonic()
        labels = ["instance_id", "hostname"]
        state = GaugeMetricFamily("clusterctl_fleet_node_state", "1 for the node's state",
                                  labels=[*labels, "state"])
        age = GaugeMetricFamily("clusterctl_fleet_node_heartbeat_age_seconds",
                                "Seconds since the node's last heartbeat", labels=labels)
        interval = GaugeMetricFamily("clusterctl_fleet_node_heartbeat_interval_seconds",
                                     "The heartbeat interval the node was given", labels=labels)
        for node in list(fleet.nodes.values()):
            names = [node.instance_id, node.hostname]
            state.add_metric([*names, node.state], 1)
            if node.last_seen is not None and node.seen_mono is not None:
                age.add_metric(names, round(max(0.0, now_mono - node.seen_mono), 3))
            interval.add_metric(names, node.assigned_s)
        events = CounterMetricFamily("clusterctl_fleet_node_events",
                                     "Notable node events (failures) since the server started",
                                     labels=[*labels, "event_type"])
        for (instance_id, event_type), count in sorted(fleet.node_events.items()):
            known = fleet.nodes.get(instance_id)
            if known is not None:
                events.add_metric([instance_id, known.hostname, event_type], count)
        yield from (state, age, interval, events)


class _Taken:
    """Families already collected, for a registry to render."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Any:
        return iter(self.families)


class Latency:
    """A histogram of durations (DB_BUCKETS_S), updated on the event loop only."""

    def __init__(self) -> None:
        self.counts = [0] * (len(DB_BUCKETS_S) + 1)
        self.sum_s = 0.0

    def add(self, seconds: float) -> None:
        self.sum_s += seconds
        for i, bound in enumerate(DB_BUCKETS_S):
            if seconds <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs, +Inf last, as Prometheus has them."""
        out, total = [], 0
        for bound, count in zip((*map(str, DB_BUCKETS_S), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, float(total)))
        return out


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


async def serve(config: FleetConfig, store: Store, *,
                ready: Callable[[Fleet], None] | None = None,
                reload: Callable[[], FleetConfig | None] | None = None,
                stop: asyncio.Event | None = None,
                clock: Callable[[], float] = time.time,
                monotonic: Callable[[], float] = time.monotonic) -> None:
    """Serve until ``stop`` is set, or SIGTERM/SIGINT in the main thread; SIGHUP calls
    ``reload`` for new tuning."""
    fleet = Fleet(config, store, clock=clock, monotonic=monotonic)
    try:
        await fleet.db(fleet.load)
        runner = web.AppRunner(fleet.app(), access_log=None, handle_signals=False)
        await runner.setup()
    except BaseException:
        fleet.close()
        raise
    host, port = split_listen(config.listen)
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024)
    try:
        await site.start()
    except OSError as err:
        await runner.cleanup()
        fleet.close()
        raise HostError(f"cannot listen on {config.listen}: {err.strerror}",
                        fix="free the port or change [fleet] listen") from err
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = threading.current_thread() is threading.main_thread()

    def _reload() -> None:
        fresh = reload() if reload else None
        if fresh is not None:
            if (fresh.listen, fresh.database) != (config.listen, config.database):
                log.warning("[fleet] listen and database take effect at the next start")
            fleet.config = replace(fresh, listen=config.listen, database=config.database)
            log.info("reloaded [fleet]")

    if signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, _reload)
    live = asyncio.create_task(fleet.liveness_loop())
    log.info("serving the fleet on %s (%d nodes known)", config.listen, len(fleet.nodes))
    fleet._notifier.notify(f"READY=1\nSTATUS={fleet._status_line()}")
    if ready:
        ready(fleet)
    try:
        await stop.wait()
    finally:
        fleet._notifier.notify("STOPPING=1")
        live.cancel()
        for task in (live, *fleet.wakes):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await runner.cleanup()
        fleet.close()


def run(config: FleetConfig, reload: Callable[[], FleetConfig | None]) -> int:
    """Open the store (migrations), serve; 0 on a clean stop."""
    store = open_store(config.database)
    asyncio.run(serve(config, store, reload=reload))
    return 0

