"""A hostile HTTP peer on 127.0.0.1, on raw sockets: it misbehaves the way you choose.

    with Hostile(redirect(302, "https://elsewhere/")) as peer:
        client_pointed_at(peer.url) ...
        peer.behaviour = answer(200, b'{"ok": true}')   # switch at any time
    peer.requests  # every request received, raw bytes, in arrival order

Each connection gets its own thread: the request (head and Content-Length body) is
read and recorded, then the behaviour in force at that moment plays out on the socket.
A behaviour is ``(socket, stop_event) -> None``; the ones here answer, redirect,
trickle, reset, send garbage, a truncated status line, a huge body, a 1xx, or nothing
at all. ``stop()`` (or leaving the ``with``) closes the port and ends every connection.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

Behaviour = Callable[[socket.socket, threading.Event], None]


def raw(data: bytes) -> Behaviour:
    """Send these bytes as the answer, then close."""
    def play(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(data)
    return play


def answer(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Behaviour:
    """A well-formed HTTP/1.1 answer with Content-Length, then close."""
    head = [f"HTTP/1.1 {status} Whatever", f"Content-Length: {len(body)}",
            "Connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return raw(("\r\n".join(head) + "\r\n\r\n").encode() + body)


def redirect(status: int, location: str, *, with_body: bool = True) -> Behaviour:
    """A 301/302/307/308 to ``location``, with a JSON body or none."""
    return answer(status, b'{"ok": true}' if with_body else b"", {"Location": location})


def trickle(data: bytes, every_s: float) -> Behaviour:
    """Send ``data`` one byte every ``every_s`` seconds (until stopped)."""
    def play(conn: socket.socket, stop: threading.Event) -> None:
        for byte in data:
            conn.sendall(bytes([byte]))
            if stop.wait(every_s):
                return
    return play


def reset() -> Behaviour:
    """Close with a TCP reset (SO_LINGER 0) instead of answering."""
    def play(conn: socket.socket, stop: threading.Event) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return play


def silent() -> Behaviour:
    """Keep the connection open and never answer (until stopped)."""
    def play(conn: socket.socket, stop: threading.Event) -> None:
        stop.wait()
    return play


def huge_body(size_bytes: int, status: int = 200) -> Behaviour:
    """An answer announcing and sending ``size_bytes`` of body."""
    return answer(status, b"x" * size_bytes)


GARBAGE = raw(b"this is not HTTP\r\n\r\n")
TRUNCATED_STATUS = raw(b"HTTP/1.1 20")
INFORMATIONAL = raw(b"HTTP/1.1 102 Processing\r\n\r\n")


class Hostile:
    """The peer: ``url``, ``requests`` (raw, in order), ``behaviour`` (switchable)."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.requests: list[bytes] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def json_bodies(self) -> list[Any]:
        """The JSON body of each request received (None where it is not JSON)."""
        bodies = []
        for request in self.requests:
            try:
                bodies.append(json.loads(request.partition(b"\r\n\r\n")[2]))
            except ValueError:
                bodies.append(None)
        return bodies

    def start(self) -> Hostile:
        self._accepter.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._accepter.join()
        self._listener.close()
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> Hostile:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                request = _read_request(conn)
                with self.lock:
                    self.requests.append(request)
                self.behaviour(conn, self.stopping)
            except OSError:
                pass  # the client gave up first: that is its right


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body
