"""A stand-in for Ollama's HTTP API on 127.0.0.1, for machines without Ollama.

Answers what clusterctl asks, in Ollama's shapes: ``GET /api/version`` ->
``{"version": "..."}``; ``GET /api/ps`` -> the loaded ``models``; ``POST /api/generate``
with ``keep_alive: 0`` and no prompt, or ``POST /api/chat`` with ``keep_alive: 0`` and no
messages, unloads a model (``done_reason: "unload"``), as Ollama does. Anything else is
a 404 like Ollama's router gives; every request is recorded (method, path, body) so a
test can check nothing was deleted, and every model unloaded is listed in ``unloads``
(name, and ``time.time()`` when it went) so a test can tell when it happened.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOllama(ThreadingHTTPServer):
    def __init__(self, version: str = "0.5.7", *, body: bytes | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.version = version
        self.raw_body = body  # send this instead of the JSON (a misbehaving server)
        self.requests: list[str] = []
        self.calls: list[tuple[str, str, dict[str, object] | None]] = []
        self.loaded: list[dict[str, object]] = []  # /api/ps entries
        self.unloads: list[tuple[str, float]] = []  # (model, time.time()) as each went

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        assert isinstance(host, str)
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeOllama

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        self.server.calls.append(("GET", self.path, None))
        if self.path == "/api/ps":
            self._json(200, {"models": self.server.loaded})
            return
        if self.path != "/api/version":
            self._send(404, b"404 page not found", "text/plain")
            return
        body = self.server.raw_body
        if body is None:
            body = json.dumps({"version": self.server.version}).encode()
        self._send(200, body, "application/json; charset=utf-8")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        self.server.calls.append(("POST", self.path, body))
        if self.path not in ("/api/generate", "/api/chat"):
            self._send(404, b"404 page not found", "text/plain")
            return
        names = [m["name"] for m in self.server.loaded]
        if body.get("model") not in names:
            self._json(404, {"error": f"model '{body.get('model')}' not found"})
            return
        asks = body.get("messages") if self.path == "/api/chat" else body.get("prompt")
        if body.get("keep_alive") == 0 and not asks:
            self.server.loaded = [m for m in self.server.loaded if m["name"] != body["model"]]
            self.server.unloads.append((body["model"], time.time()))
            said = ({"message": {"role": "assistant", "content": ""}}
                    if self.path == "/api/chat" else {"response": ""})
            self._json(200, {"model": body["model"], "created_at": "2026-11-23T00:00:00Z",
                             **said, "done": True, "done_reason": "unload"})
            return
        self._json(400, {"error": "this stand-in only unloads"})

    def do_DELETE(self) -> None:
        self.server.calls.append(("DELETE", self.path, None))
        self._send(405, b"", "text/plain")

    def _json(self, code: int, data: object) -> None:
        self._send(code, json.dumps(data).encode(), "application/json; charset=utf-8")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def running(server: FakeOllama) -> Iterator[FakeOllama]:
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
