"""The agent's local HTTP API and /metrics (loopback by default: ``[api] listen``).

GET  /api/v1/monitoring/gpu-metrics          the fleet-manager seed's shape
GET  /api/gpu/status?gpu_id=N                 junmai's {"success", "data"}
GET  /api/gpu/temperature/trend?gpu_id=N&duration=M
POST /api/gpu/memory/allocate                 {"allocation_id", "required_mb", "gpu_id"?}
PUT  /api/gpu/config                          {"temp_throttle": 80, ...}
GET  /metrics                                 Prometheus text (dcgm-exporter names)
GET  /healthz                                 200 healthy/degraded, 503 unhealthy

POST and PUT need ``Authorization: Bearer <token>`` from ``[api] token_file`` (root-only);
without that file they are refused. Bodies are limited to 64 KiB; a malformed request
gets a 4xx with {"success": false, "error": ...} and changes nothing.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from clusterctl import config as cfg
from clusterctl.agent.control import read_token
from clusterctl.agent.metrics import render
from clusterctl.errors import ClusterctlError, ConfigError
from clusterctl.gpu import placement, shapes

if TYPE_CHECKING:
    from clusterctl.agent.service import Agent

log = logging.getLogger("clusterctl.agent")
MAX_BODY_BYTES = 64 * 1024


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Server(ThreadingHTTPServer):
    daemon_threads = True
    agent: Agent


def serve(agent: Agent) -> Server:
    host, _, port = agent.config.api.listen.rpartition(":")
    host = host.strip("[]")
    if ":" in host:
        Server.address_family = __import__("socket").AF_INET6
    server = Server((host, int(port)), Handler)
    server.agent = agent
    threading.Thread(target=server.serve_forever, name="api", daemon=True).start()
    log.info("API on %s", agent.config.api.listen)
    return server


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

    # -- plumbing --------------------------------------------------------------------

    def log_message(self, format: str, *args: object) -> None:
        log.debug("api: " + format, *args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _dispatch(self, method: str) -> None:
        try:
            route = ROUTES.get((method, urlsplit(self.path).path))
            if route is None:
                known = {m for m, p in ROUTES if p == urlsplit(self.path).path}
                if known:
                    raise ApiError(405, f"{method} not allowed here; use {', '.join(known)}")
                raise ApiError(404, f"no endpoint {urlsplit(self.path).path}")
            route(self)
        except ApiError as err:
            self._json(err.status, {"success": False, "error": err.message})
        except Exception:
            log.exception("api: %s %s failed", method, self.path)
            self._json(500, {"success": False, "error": "internal error (see the journal)"})

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def query(self, name: str, default: float | None = None) -> float:
        values = parse_qs(urlsplit(self.path).query).get(name)
        if not values:
            if default is None:
                raise ApiError(400, f"missing query parameter {name}")
            return default
        try:
            return float(values[0])
        except ValueError as err:
            raise ApiError(400, f"{name} must be a number, got {values[0]!r}") from err

    def authorised(self) -> None:
        agent = self.server.agent
        try:
            token = read_token(agent.config.api.token_file)
        except ClusterctlError as err:
            raise ApiError(403, f"changes are disabled: {err.one_line()}") from err
        if token is None:
            raise ApiError(403, f"changes are disabled: no token file "
                           f"{agent.config.api.token_file} (create it, mode 0600)")
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ApiError(401, "missing or wrong bearer token")

    def body(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(411, "a JSON body with Content-Length is required")
        if int(length) > MAX_BODY_BYTES:
            raise ApiError(413, f"body over {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(int(length))
        try:
            data = json.loads(raw)
        except ValueError as err:
            raise ApiError(400, f"the body is not JSON: {err}") from err
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        return data

    def view(self) -> Any:
        gpu_id = int(self.query("gpu_id", 0))
        for view in self.server.agent.monitor.views:
            if view.sample.index == gpu_id:
                return view
        raise ApiError(404, f"no GPU {gpu_id}")


# -- the endpoints --------------------------------------------------------------------


def gpu_metrics(h: Handler) -> None:
    h._json(200, h.server.agent.gpu_metrics())


def gpu_status(h: Handler) -> None:
    h._json(200, {"success": True, "data": shapes.manager_status(h.view())})


def gpu_trend(h: Handler) -> None:
    view = h.view()
    minutes = h.query("duration", 5)
    if not 0 < minutes <= 24 * 60:
        raise ApiError(400, "duration must be 0-1440 minutes")
    history = h.server.agent.monitor.histories.get(view.sample.uuid or f"index-{view.gpu_id}")
    trend = history.trend(minutes, time.time()) if history else None
    h._json(200, {"success": True, "data": shapes.trend_dict(trend, view.gpu_id)})


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
    agent = h.server.agent
    try:
        placed = placement.place(agent.config.paths.state_dir, agent.config.paths.run_dir,
                                 agent.nvml.sample, name, mb, agent.config.gpu.memory_reserve_mb,
                                 gpu_index=gpu, now=time.time(), wait_s=2.0)
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
    agent = h.server.agent
    try:
        new = cfg.with_changes(agent.config, "gpu", changes, source="PUT /api/gpu/config")
    except ConfigError as err:
        raise ApiError(400, err.one_line()) from err
    agent.config = new
    agent.monitor.config = new
    agent.monitor.with_config(new)
    log.warning("GPU settings changed through the API (until the next reload): %s",
                ", ".join(f"{k}={v}" for k, v in changes.items()))
    h._json(200, {"success": True, "data": cfg.as_toml_dict(new)["gpu"]})


def metrics(h: Handler) -> None:
    body, content_type = render(h.server.agent)
    h._send(200, body, content_type)


def healthz(h: Handler) -> None:
    agent = h.server.agent
    snapshot = agent.monitor.snapshot
    result = shapes.health(agent.monitor.views, agent.config.gpu.temp_critical_c,
                           snapshot.reason if snapshot else "no sample yet")
    h._json(503 if result["status"] == "unhealthy" else 200, result)


ROUTES = {
    ("GET", "/api/v1/monitoring/gpu-metrics"): gpu_metrics,
    ("GET", "/api/gpu/status"): gpu_status,
    ("GET", "/api/gpu/temperature/trend"): gpu_trend,
    ("POST", "/api/gpu/memory/allocate"): allocate,
    ("PUT", "/api/gpu/config"): put_config,
    ("GET", "/metrics"): metrics,
    ("GET", "/healthz"): healthz,
}
