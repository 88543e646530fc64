"""The agent's local HTTP API and /metrics (loopback by default: ``[api] listen``).

GET  /api/v1/monitoring/gpu-metrics          every GPU's gauges, fleet-style
GET  /api/gpu/status?gpu_id=N                 one GPU, as {"success", "data"}
GET  /api/gpu/temperature/trend?gpu_id=N&duration=M
POST /api/gpu/memory/allocate                 {"allocation_id", "required_mb", "gpu_id"?}
PUT  /api/gpu/config                          {"temp_throttle": 80, ...}
POST /api/hibernate/now                       run [hibernate] action now (202; 409 if running)
GET  /metrics                                 Prometheus text (dcgm-exporter names)
GET  /healthz                                 200 healthy/degraded, 503 unhealthy

POST and PUT need ``Authorization: Bearer <token>`` from ``[api] token_file`` (root-only);
without that file they are refused. Bodies are limited to 64 KiB; a malformed request
gets a 4xx with {"success": false, "error": ...} and changes nothing; no request gets a
500. One request per connection (every answer says ``Connection: close``).

It cannot be starved: a request has 10 s to arrive whole (head and body), at most 32
connections are served at once, and when all are taken a new one pushes out the oldest
that has not yet sent its request head, or is answered 503 at once. So a flood of
half-sent or idle connections holds neither threads nor file descriptors.

Every answer is made from one ``snapshot()`` of the agent per request (the GPU views, the
config, ...), never from the agent's insides; a change goes through the agent's own
methods (``apply_config``, ``place``, ``hibernate_now``).
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import io
import json
import logging
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import SplitResult, parse_qs, urlsplit

from clusterctl import config as cfg
from clusterctl.agent.control import DeadlineReader, read_token
from clusterctl.agent.metrics import Metrics
from clusterctl.errors import ClusterctlError, ConfigError, TemporaryError
from clusterctl.gpu import placement, shapes
from clusterctl.gpu.history import History, Point, Trend

if TYPE_CHECKING:
    from clusterctl.agent.service import AgentSnapshot
    from clusterctl.gpu.monitor import GpuView

log = logging.getLogger("clusterctl.agent")
MAX_BODY_BYTES = 64 * 1024
REQUEST_TIMEOUT_S = 10.0  # for the whole request, head and body; also for the answer
MAX_CONNECTIONS = 32
_BUSY_BODY = json.dumps({"success": False, "error": f"over {MAX_CONNECTIONS} connections at "
                         "once; retry in a moment"}).encode()
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class Served(Protocol):
    """What the API needs of the agent: a snapshot to read, and the changes it may ask."""

    def snapshot(self, *, histories: bool = False) -> AgentSnapshot: ...

    def apply_config(self, new: cfg.Config) -> None: ...

    def place(self, name: str, vram_mib: int, gpu_index: int | None) -> placement.Placed: ...

    def hibernate_now(self, reason: str) -> None: ...

    def loop_failed(self, loop: str, err: BaseException) -> None: ...

    @property
    def metrics(self) -> Metrics: ...


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # listen backlog: a burst is accepted (and sorted) at once
    agent: Served
    metrics: Metrics

    def __init__(self, address: tuple[str, int], handler: type[Handler]) -> None:
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.lock = threading.Lock()
        self.reading: dict[socket.socket, None] = {}  # no whole request head yet, oldest first

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return super().get_request()
        except OSError as err:
            if err.errno in (errno.EMFILE, errno.ENFILE):
                time.sleep(0.1)  # out of descriptors: do not spin on a readable listener
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.push_out_oldest_reader()
            if not self.slots.acquire(timeout=0.5):
                with contextlib.suppress(OSError):
                    request.setblocking(False)
                    request.send(BUSY)
                self.shutdown_request(request)
                return
        with self.lock:
            self.reading[request] = None
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.done_reading(request)
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.done_reading(request)
            self.slots.release()

    def done_reading(self, request: socket.socket) -> None:
        with self.lock:
            self.reading.pop(request, None)

    def push_out_oldest_reader(self) -> None:
        with self.lock:
            oldest = next(iter(self.reading), None)
            if oldest is None:
                return
            del self.reading[oldest]
        with contextlib.suppress(OSError):
            oldest.shutdown(socket.SHUT_RDWR)  # its thread sees the end and lets go

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("api: a connection from %s ended badly", client_address, exc_info=True)


def serve(agent: Served) -> Server:
    listen = agent.snapshot().config.api.listen
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if ":" in host:
        Server.address_family = __import__("socket").AF_INET6
    server = Server((host, int(port)), Handler)
    server.agent = agent
    server.metrics = agent.metrics  # rendered once per GPU sample by the agent
    threading.Thread(target=server.serve_forever, name="api", daemon=True).start()
    log.info("API on %s", listen)
    return server


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

    # -- plumbing --------------------------------------------------------------------

    def log_message(self, format: str, *args: object) -> None:
        log.debug("api: " + format, *args)

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # reads go through a deadline instead
        self.reader = DeadlineReader(self.connection, time.monotonic() + REQUEST_TIMEOUT_S)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self) -> None:
        self.reader.deadline = time.monotonic() + REQUEST_TIMEOUT_S
        self._snapshot: AgentSnapshot | None = None
        self._with_histories = False
        super().handle_one_request()
        self.close_connection = True

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        self.server.done_reading(self.connection)
        return parsed

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        self.log_error("code %d, message %s", code, message)
        self._json(code, {"success": False,
                          "error": message or self.responses.get(code, ("refused",))[0]})

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.close_connection = True
        self.connection.settimeout(REQUEST_TIMEOUT_S)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _dispatch(self, method: str) -> None:
        try:
            path = self.split().path
            route = ROUTES.get((method, path))
            if route is None:
                known = {m for m, p in ROUTES if p == path}
                if known:
                    raise ApiError(405, f"{method} not allowed here; use {', '.join(known)}")
                raise ApiError(404, f"no endpoint {path[:200]}")
            route(self)
        except ApiError as err:
            self._json(err.status, {"success": False, "error": err.message})
        except (ConnectionError, TimeoutError):  # the client hung up or stopped reading:
            self.close_connection = True  # its business, not a failure of the API
            log.debug("api: %s %s: the client went away", method, self.path[:200])
        except Exception as err:  # the last guard: a bug, never the caller's input
            self.server.agent.loop_failed("api", err)  # logged once per cause, counted
            self._json(500, {"success": False, "error": "internal error (see the journal)"})

    def snapshot(self, *, histories: bool = False) -> AgentSnapshot:
        """The agent as this request sees it: taken once (again only to add histories)."""
        if self._snapshot is None or (histories and not self._with_histories):
            self._snapshot = self.server.agent.snapshot(histories=histories)
            self._with_histories = histories
        return self._snapshot

    def split(self) -> SplitResult:
        try:
            return urlsplit(self.path)
        except ValueError as err:
            raise ApiError(400, f"the request target is not a URL path: {err}") from err

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def query(self, name: str, default: float) -> float:
        """A query parameter that must be a plain decimal number (no nan, inf, 1e400)."""
        values = parse_qs(self.split().query).get(name)
        if not values:
            return float(default)  # an int default has no is_integer() before Python 3.12
        if not re.fullmatch(r"[0-9]{1,9}(\.[0-9]{1,9})?", values[0]):
            raise ApiError(400, f"{name} must be a plain decimal number, got {values[0][:40]!r}")
        return float(values[0])

    def authorised(self) -> None:
        token_file = self.snapshot().config.api.token_file
        try:
            token = read_token(token_file)
        except ClusterctlError as err:
            raise ApiError(403, f"changes are disabled: {err.one_line()}") from err
        if token is None:
            raise ApiError(403, f"changes are disabled: no token file "
                           f"{token_file} (create it, mode 0600)")
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ApiError(401, "missing or wrong bearer token")

    def body(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None or not re.fullmatch(r"[0-9]{1,9}", length):
            raise ApiError(411, "a JSON body with Content-Length (ASCII digits) is required")
        if int(length) > MAX_BODY_BYTES:
            raise ApiError(413, f"body over {MAX_BODY_BYTES} bytes")
        try:
            raw = self.rfile.read(int(length))
        except TimeoutError as err:
            raise ApiError(408, f"the body did not arrive within {REQUEST_TIMEOUT_S:g} s"
                           ) from err
        except OSError as err:
            raise ApiError(400, f"the body could not be read: {err}") from err
        if len(raw) < int(length):
            raise ApiError(400, "the body ended before Content-Length bytes")
        try:
            data = json.loads(raw, parse_constant=_no_constant)
        except (ValueError, RecursionError) as err:
            raise ApiError(400, f"the body is not JSON: {err}") from err
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        return data

    def view(self, *, histories: bool = False) -> GpuView:
        gpu_id = self.query("gpu_id", 0)
        if not gpu_id.is_integer():
            raise ApiError(400, f"gpu_id must be a GPU index, got {gpu_id:g}")
        view = self.snapshot(histories=histories).gpu_view(int(gpu_id))
        if view is None:
            raise ApiError(404, f"no GPU {int(gpu_id)}")
        return view


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


# -- the endpoints --------------------------------------------------------------------


def gpu_metrics(h: Handler) -> None:
    h._json(200, dict(h.snapshot().gpu_metrics))


def gpu_status(h: Handler) -> None:
    h._json(200, {"success": True, "data": shapes.manager_status(h.view())})


def gpu_trend(h: Handler) -> None:
    view = h.view(histories=True)
    minutes = h.query("duration", 5)
    if not 0 < minutes <= 24 * 60:
        raise ApiError(400, "duration must be 0-1440 minutes")
    points = h.snapshot(histories=True).histories.get(
        view.sample.uuid or f"index-{view.gpu_id}")
    trend = _trend(points, minutes, time.time()) if points else None
    h._json(200, {"success": True, "data": shapes.trend_dict(trend, view.gpu_id)})


def _trend(points: tuple[Point, ...], minutes: float, now: float) -> Trend | None:
    history = History(len(points))
    for point in points:
        history.add(point)
    return history.trend(minutes, now)


def allocate(h: Handler) -> None:
    h.authorised()
    data = h.body()
    name, mb, gpu = data.get("allocation_id"), data.get("required_mb"), data.get("gpu_id")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "allocation_id must be a non-empty string")
    if isinstance(mb, bool) or not isinstance(mb, int) or mb <= 0:
        raise ApiError(400, "required_mb must be a positive whole number of MiB")
    if gpu is not None and (isinstance(gpu, bool) or not isinstance(gpu, int)):
        raise ApiError(400, "gpu_id must be a GPU index")
    try:
        placed = h.server.agent.place(name, mb, gpu)
    except placement.NoFit as err:
        raise ApiError(409, err.one_line()) from err
    except ClusterctlError as err:
        raise ApiError(400, err.one_line()) from err
    h._json(200, {"success": True, "data": {"allocation_id": name, "gpu_id": placed.room.index,
                                            "required_mb": mb,
                                            "already_allocated": placed.existing}})


def put_config(h: Handler) -> None:
    h.authorised()
    changes = h.body()
    try:
        new = cfg.with_changes(h.snapshot().config, "gpu", changes,
                               source="PUT /api/gpu/config")
    except ConfigError as err:
        raise ApiError(400, err.one_line()) from err
    h.server.agent.apply_config(new)  # a shorter monitor_interval takes effect now
    log.warning("GPU settings changed through the API (until the next reload): %s",
                ", ".join(f"{k}={v}" for k, v in changes.items()))
    h._json(200, {"success": True, "data": cfg.as_toml_dict(new)["gpu"]})


def hibernate_now(h: Handler) -> None:
    """`clusterctl hibernate now` through the running agent: its one action sequence."""
    h.authorised()
    try:
        h.server.agent.hibernate_now("clusterctl hibernate now")
    except TemporaryError as err:
        raise ApiError(409, err.one_line()) from err
    h._json(202, {"success": True, "data": {"status": "hibernating"}})


def metrics(h: Handler) -> None:
    body, content_type = h.server.metrics.render()
    h._send(200, body, content_type)


def healthz(h: Handler) -> None:
    snap = h.snapshot()
    result = shapes.health(snap.views, snap.config.gpu.temp_critical_c,
                           snap.gpu.reason if snap.gpu else "no sample yet",
                           snap.xids.unrecovered())  # a fatal XID not recovered from
    h._json(503 if result["status"] == "unhealthy" else 200, result)


ROUTES = {
    ("GET", "/api/v1/monitoring/gpu-metrics"): gpu_metrics,
    ("GET", "/api/gpu/status"): gpu_status,
    ("GET", "/api/gpu/temperature/trend"): gpu_trend,
    ("POST", "/api/gpu/memory/allocate"): allocate,
    ("PUT", "/api/gpu/config"): put_config,
    ("POST", "/api/hibernate/now"): hibernate_now,
    ("GET", "/metrics"): metrics,
    ("GET", "/healthz"): healthz,
}
