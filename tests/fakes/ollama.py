"""A stand-in for Ollama's HTTP API on 127.0.0.1, for machines without Ollama.

Answers what clusterctl asks, in Ollama's shapes: ``GET /api/version`` ->
``{"version": "..."}``. Anything else is a 404 like Ollama's router gives.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOllama(ThreadingHTTPServer):
    def __init__(self, version: str = "0.5.7", *, body: bytes | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.version = version
        self.raw_body = body  # send this instead of the JSON (a misbehaving server)
        self.requests: list[str] = []

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeOllama

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        if self.path != "/api/version":
            self._send(404, b"404 page not found", "text/plain")
            return
        body = self.server.raw_body
        if body is None:
            body = json.dumps({"version": self.server.version}).encode()
        self._send(200, body, "application/json; charset=utf-8")

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
