"""A control plane on 127.0.0.1 that records what agents send it.

``POST /api/agent/status``, ``POST /api/agent/events`` and the
``POST /api/instances/{id}/hibernate`` are recorded (with the Authorization header).
It can be told to answer 500, to answer garbage (a reply that is not HTTP), to be
slow, or to refuse a token; stopping it makes the port refuse connections, as a
control plane that is down.

``received`` is everything taken, in order, as ``Received(at, kind, payload)``: ``at``
is ``time.monotonic()`` when the request arrived, ``kind`` is ``heartbeat``, ``events``
or ``hibernate``, ``payload`` the JSON body (``received_list()`` copies it under the
lock). ``hold``: an events POST is recorded as it arrives (a control plane that
committed the batch) but answered only once ``hold.release()`` is called, so a test can
kill the agent between its POST and its acknowledgement.

Opt-in, for the fleet protocol (off by default: ``/api/agent/enroll`` answers 404, as
a control plane that is not clusterctl's): ``enroll = Enroll(token)`` answers enrolment
(recorded in ``enrolls`` as (Authorization, body), kind ``enroll``); ``refused_tokens``:
status and events requests with one of those bearer tokens are answered 401;
``status_answer``: the body of the answer to a heartbeat (any JSON value, or bytes sent
as they are).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

HOLD_LIMIT_S = 60.0  # a held answer goes out after this even if never released


class Received(NamedTuple):
    at: float  # time.monotonic() when the request arrived
    kind: str  # heartbeat | events | hibernate | enroll
    payload: Any  # the JSON body: a heartbeat, a list of events, a hibernate request


class Enroll:
    """Answers ``POST /api/agent/enroll``: 200 with ``token``, or ``status`` and ``body``."""

    def __init__(self, token: str, status: int = 200, body: Any = None) -> None:
        self.token = token
        self.status = status
        self.body = body


class Hold:
    """Events POSTs recorded at once, answered (2xx) only after ``release()``."""

    def __init__(self) -> None:
        self.arrived = threading.Event()  # an events POST was recorded and is held
        self._released = threading.Event()

    def release(self) -> None:
        self._released.set()

    def wait(self) -> None:
        self.arrived.set()
        self._released.wait(HOLD_LIMIT_S)


class ControlPlane(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.heartbeats: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []  # as received, duplicates included
        self.auth: list[str | None] = []
        self.hibernate_requests: list[tuple[str, dict[str, Any]]] = []
        self.received: list[Received] = []  # all of the above, in order, with times
        self.hold: Hold | None = None
        self.mode = "ok"  # ok | error | garbage | unauthorised
        self.delay_s = 0.0
        self.enroll: Enroll | None = None  # None: /api/agent/enroll is a 404
        self.enrolls: list[tuple[str | None, Any]] = []
        self.refused_tokens: set[str] = set()  # answered 401 on status and events
        self.status_answer: Any = None  # None: {"ok": true}; bytes: sent as they are
        self.lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def received_list(self) -> list[Received]:
        with self.lock:
            return list(self.received)

    def start(self) -> ControlPlane:
        self._thread = threading.Thread(target=self.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self.hold is not None:
            self.hold.release()  # no answer left waiting
        self.shutdown()
        self.server_close()
        if self._thread:
            self._thread.join()


class _Handler(BaseHTTPRequestHandler):
    server: ControlPlane

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        arrived = time.monotonic()
        if self.server.delay_s:
            time.sleep(self.server.delay_s)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.mode == "garbage":
            self.wfile.write(b"this is not HTTP\r\n\r\n")
            return
        if self.server.mode == "error":
            self._answer(500, {"error": "database is down"})
            return
        if self.server.mode == "unauthorised":
            self._answer(401, {"error": "bad token"})
            return
        data = json.loads(body)
        hold: Hold | None = None
        answer: Any = {"ok": True}
        with self.server.lock:
            auth = self.headers.get("Authorization")
            self.server.auth.append(auth)
            enroll = self.server.enroll
            if self.path == "/api/agent/enroll" and enroll is not None:
                self.server.enrolls.append((auth, data))
                self.server.received.append(Received(arrived, "enroll", data))
                self._answer(enroll.status, enroll.body if enroll.body is not None else
                             {"instance_id": data.get("instance_id"), "node_token": enroll.token})
                return
            if self.path in ("/api/agent/status", "/api/agent/events") and \
                    (auth or "").removeprefix("Bearer ") in self.server.refused_tokens:
                self._answer(401, {"error": "unknown node token", "fix": None})
                return
            if self.path == "/api/agent/status":
                if self.server.status_answer is not None:
                    answer = self.server.status_answer
                self.server.heartbeats.append(data)
                self.server.received.append(Received(arrived, "heartbeat", data))
            elif self.path == "/api/agent/events":
                self.server.events.extend(data)
                self.server.received.append(Received(arrived, "events", data))
                hold = self.server.hold
            elif self.path.startswith("/api/instances/") and self.path.endswith("/hibernate"):
                instance = self.path.split("/")[3]
                self.server.hibernate_requests.append((instance, data))
                self.server.received.append(Received(arrived, "hibernate", data))
                self._answer(200, {"success": True,
                                   "snapshot_id": f"{instance}_hibernate_1734441600",
                                   "instance_destroyed": True})
                return
            else:
                self._answer(404, {"error": "no such endpoint"})
                return
        if hold is not None:
            hold.wait()  # recorded; the answer only once released
        with contextlib.suppress(OSError):  # the agent is gone (killed while it waited)
            self._answer(200, answer)

    def _answer(self, code: int, data: Any) -> None:
        body = data if isinstance(data, bytes) else json.dumps(data).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running(port: int = 0) -> Iterator[ControlPlane]:
    plane = ControlPlane(port).start()
    try:
        yield plane
    finally:
        plane.stop()
