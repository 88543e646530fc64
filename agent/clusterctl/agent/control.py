"""Talking to the control plane: heartbeats and events, over HTTPS with a bearer token.

- The URL: https, or http only to a loopback address unless ``allow_insecure_http``.
- The token: ``[heartbeat] token_file``, a regular file (not a symlink) owned by root
  that group and others cannot read, holding one word of printable ASCII; anything else
  is refused with the fix. No file: requests go without a token (a control plane that
  wants one answers 401, which is reported as such). A header value is never logged.
  Given the state dir, a node token there (``node-token``, written by enrolment, same
  rules) is sent instead; ``join=True`` sends the token_file's (enrolment itself).
- TLS is verified (the system's CA store). A connect timeout of 3 s and a deadline of
  10 s for the whole exchange (connect, send, headers, body), however slowly the peer
  trickles; an answer is read up to 1 MiB. Retries are the caller's, with ``Backoff``.
- Only a 2xx answer acknowledges. A redirect is not followed (it is an error that names
  where it pointed); 1xx, 4xx and 5xx are errors too.
"""

from __future__ import annotations

import errno
import http.client
import io
import json
import os
import random
import socket
import ssl
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from clusterctl.config import HeartbeatConfig, is_loopback
from clusterctl.errors import ConfigError, HostError, TemporaryError

CONNECT_TIMEOUT_S = 3.0
TOTAL_TIMEOUT_S = 10.0
MAX_ANSWER_BYTES = 1 << 20
MAX_TOKEN_BYTES = 4096
NODE_TOKEN_FILE = "node-token"  # noqa: S105 - a file name, in [paths] state_dir


def read_token(path: Path) -> str | None:
    """The bearer token; None when there is no file or it is empty.

    HostError when the file is a symlink or not a regular file, is readable by group or
    others, is owned by someone other than root (or this process's user), or holds more
    than one word of printable ASCII. The token itself never appears in a message.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise HostError(f"token file {path} is a symbolic link",
                            fix=f"replace it with a regular file: owned by root, chmod 600 "
                                f"{path}") from err
        raise HostError(f"cannot read token file {path}: {err.strerror}",
                        fix="run as root") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HostError(f"token file {path} is not a regular file",
                            fix="replace it with a regular file (owned by root, mode 0600)")
        if st.st_mode & 0o077:
            raise HostError(f"token file {path} can be read by group or others "
                            f"(mode {stat.S_IMODE(st.st_mode):04o})",
                            fix=f"chmod 600 {path}")
        if st.st_uid not in (0, os.geteuid()):
            raise HostError(f"token file {path} is owned by uid {st.st_uid}, not root",
                            fix=f"chown root:root {path}")
        raw = os.read(fd, MAX_TOKEN_BYTES + 1)
    except OSError as err:
        raise HostError(f"cannot read token file {path}: {err.strerror}",
                        fix="run as root") from err
    finally:
        os.close(fd)
    return _token(raw, path)


def _token(raw: bytes, path: Path) -> str | None:
    """The token in a file's bytes: one word of printable ASCII, the ends stripped."""
    if len(raw) > MAX_TOKEN_BYTES:
        raise HostError(f"token file {path} is over {MAX_TOKEN_BYTES} bytes",
                        fix=f"put only the token in {path}")
    token = raw.strip()
    if any(byte < 0x21 or byte > 0x7E for byte in token):
        raise HostError(f"token file {path} holds whitespace, control or non-ASCII "
                        "characters inside the token",
                        fix=f"put the token alone on one line in {path}")
    return token.decode("ascii") or None


def check_url(url: str, allow_insecure_http: bool) -> None:
    parts = urlsplit(url)
    if parts.scheme == "https":
        return
    if not is_loopback(parts.hostname or "") and not allow_insecure_http:
        raise ConfigError(f"control_url {url} is plain http to another machine: the token "
                          "and the node's data would cross the network in clear",
                          key="heartbeat.control_url",
                          fix="use https://, or set [heartbeat] allow_insecure_http = true")


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any  # parsed JSON, or None


class Refused(HostError):
    """A 4xx answer: its ``status``, its JSON body (None when it is not JSON), and whether
    the node token (not the token_file's) was the one sent."""

    def __init__(self, message: str, *, fix: str | None = None, status: int, body: Any,
                 node_token: bool = False) -> None:
        super().__init__(message, fix=fix)
        self.status = status
        self.body = body
        self.node_token = node_token


class DeadlineReader(io.RawIOBase):
    """Reads a socket, each read given only the time left before ``deadline``.

    ``deadline`` is a ``time.monotonic()`` value; past it a read raises TimeoutError,
    so a peer that sends one byte at a time cannot stretch the exchange.
    """

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self.sock = sock
        self.deadline = deadline
        self._raw = sock.makefile("rb", buffering=0)  # holds the socket open until closed

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        left_s = self.deadline - time.monotonic()
        if left_s <= 0:
            raise TimeoutError("deadline passed")
        self.sock.settimeout(left_s)
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineSocket:
    """What http.client needs of a socket, held to one deadline for the whole exchange."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline

    def sendall(self, data: bytes) -> None:
        left_s = self.deadline - time.monotonic()
        if left_s <= 0:
            raise TimeoutError("deadline passed")
        self.sock.settimeout(left_s)  # for sendall, a bound on the whole call
        self.sock.sendall(data)

    def makefile(self, mode: str) -> io.BufferedReader:
        assert mode == "rb"
        return io.BufferedReader(DeadlineReader(self.sock, self.deadline))

    def close(self) -> None:
        self.sock.close()


class ControlClient:
    def __init__(self, config: HeartbeatConfig, state_dir: Path | None = None) -> None:
        self.base = config.control_url.rstrip("/")
        check_url(self.base, config.allow_insecure_http)
        parts = urlsplit(self.base)
        try:
            self.port = parts.port
        except ValueError as err:
            raise ConfigError(f"control_url {self.base} has an invalid port",
                              key="heartbeat.control_url", fix="use host or host:port") from err
        self.host = parts.hostname or ""
        self.scheme = parts.scheme
        if self.port is None:  # always explicit: http.client would read an IPv6 host's
            self.port = 443 if self.scheme == "https" else 80  # last group as a port
        self.token_file = config.token_file
        self.state_dir = state_dir  # where the node token is; None: the token_file's only
        self._context = ssl.create_default_context()

    @property
    def node_token_file(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / NODE_TOKEN_FILE

    def post(self, path: str, payload: Any, *, join: bool = False) -> Answer:
        """POST JSON; only a 2xx answer returns. TemporaryError for what a retry may fix,
        HostError for what it won't (Refused for a 4xx). The bearer is the node token when
        there is one, else the token_file's; ``join``: the token_file's whatever."""
        node_file = None if join else self.node_token_file
        token = None if node_file is None else read_token(node_file)
        node_token = token is not None
        if token is None:
            token = read_token(self.token_file)
        parts = urlsplit(self.base + path)
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body)),
                   "User-Agent": "clusterctl-agent"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        deadline = time.monotonic() + TOTAL_TIMEOUT_S
        timeout_s = min(CONNECT_TIMEOUT_S, TOTAL_TIMEOUT_S)
        conn: http.client.HTTPConnection
        where = f"control plane {self.base}{path}"
        try:
            if self.scheme == "https":
                conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout_s,
                                                   context=self._context)
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout_s)
        except (http.client.HTTPException, ValueError) as err:  # InvalidURL and its kin
            raise ConfigError(f"control_url {self.base} cannot be used: {err}",
                              key="heartbeat.control_url") from err
        try:
            conn.connect()
            conn.sock = _DeadlineSocket(conn.sock, deadline)
            try:
                conn.request("POST", target, body=body, headers=headers)
            except ValueError:  # http.client refused a header or the path: never echo them
                raise HostError(f"{where}: the request has characters HTTP does not allow",
                                fix=f"check [heartbeat] token_file {self.token_file} and the "
                                    "instance id") from None
            response = conn.getresponse()
            status = response.status
            location = response.getheader("Location")
            raw = response.read(MAX_ANSWER_BYTES)
            if response.length and len(raw) < MAX_ANSWER_BYTES:
                raise http.client.IncompleteRead(raw, response.length)
        except ssl.SSLCertVerificationError as err:
            raise HostError(f"control plane {self.base}: TLS certificate not trusted "
                            f"({err.verify_message})",
                            fix="install its CA in the system store, or fix control_url") from err
        except TimeoutError as err:
            raise TemporaryError(f"{where}: no whole answer within {TOTAL_TIMEOUT_S:g} s"
                                 ) from err
        except OSError as err:
            raise TemporaryError(f"control plane {self.base} unreachable: "
                                 f"{str(err)[:200] or type(err).__name__}") from err
        except (http.client.HTTPException, ValueError) as err:  # ValueError: a bad chunk size
            raise TemporaryError(f"{where} answered something that is not HTTP: "
                                 f"{type(err).__name__} {str(err)[:100]}") from err
        finally:
            conn.close()
        return _answer(where, status, location, raw,
                       node_file if node_token and node_file else self.token_file,
                       node_token=node_token)


def _answer(where: str, status: int, location: str | None, raw: bytes,
            token_file: Path, *, node_token: bool = False) -> Answer:
    """A 2xx answer, or the error that the status means (pure)."""
    if 300 <= status < 400:
        raise HostError(f"{where} answered a redirect (HTTP {status}) to {location!r:.200}",
                        fix="redirects are not followed: fix [heartbeat] control_url")
    if status >= 500 or status == 429:
        raise TemporaryError(f"{where} answered HTTP {status}")
    parsed: Any = None
    if 400 <= status < 500 or 200 <= status < 300:
        try:
            parsed = json.loads(raw) if raw.strip() else None
        except (ValueError, RecursionError):
            parsed = None  # 2xx is the acknowledgement; the body is a courtesy
    if status in (401, 403):
        if node_token:
            raise Refused(f"{where} refused the node token (HTTP {status})",
                          fix=f"the agent enrols again; else remove {token_file} and restart "
                              "it", status=status, body=parsed, node_token=True)
        raise Refused(f"{where} refused the token (HTTP {status})",
                      fix=f"put the right token in {token_file} (mode 0600)",
                      status=status, body=parsed)
    if 400 <= status < 500:
        raise Refused(f"{where} rejected the request (HTTP {status}): {raw[:200]!r}",
                      status=status, body=parsed, node_token=node_token)
    if not 200 <= status < 300:
        raise TemporaryError(f"{where} answered HTTP {status}, which is not an answer")
    return Answer(status, parsed)


class Backoff:
    """Exponential backoff with full jitter, capped (1 s, 2 s, 4 s ... about a minute)."""

    def __init__(self, *, base_s: float = 1.0, cap_s: float = 60.0,
                 rng: random.Random | None = None) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.failures = 0
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not secrets

    def failed(self) -> float:
        """Seconds to wait before the next try."""
        self.failures += 1
        ceiling = min(self.cap_s, self.base_s * 2 ** (self.failures - 1))
        return self.rng.uniform(ceiling / 2, ceiling)

    def succeeded(self) -> None:
        self.failures = 0
