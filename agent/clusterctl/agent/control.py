"""Talking to the control plane: heartbeats and events, over HTTPS with a bearer token.

- The URL: https, or http only to a loopback address unless ``allow_insecure_http``.
- The token: ``[heartbeat] token_file``, refused when group or others can read it.
  No file: requests go without a token (a control plane that wants one answers 401,
  which is reported as such).
- TLS is verified (the system's CA store). A connect timeout of 3 s and a total
  of 10 s per request; retries are the caller's, with ``Backoff``.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import random
import ssl
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from clusterctl.config import HeartbeatConfig
from clusterctl.errors import ConfigError, HostError, TemporaryError

CONNECT_TIMEOUT_S = 3.0
TOTAL_TIMEOUT_S = 10.0
MAX_ANSWER_BYTES = 1 << 20


def read_token(path: Path) -> str | None:
    """The bearer token; None when there is no file. HostError when it is not root-only."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if st.st_mode & 0o077:
        raise HostError(f"token file {path} can be read by group or others "
                        f"(mode {stat.S_IMODE(st.st_mode):04o})",
                        fix=f"chmod 600 {path}")
    try:
        token = path.read_text().strip()
    except OSError as err:
        raise HostError(f"cannot read token file {path}: {err.strerror}",
                        fix="run as root") from err
    return token or None


def check_url(url: str, allow_insecure_http: bool) -> None:
    parts = urlsplit(url)
    if parts.scheme == "https":
        return
    host = parts.hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not allow_insecure_http:
        raise ConfigError(f"control_url {url} is plain http to another machine: the token "
                          "and the node's data would cross the network in clear",
                          key="heartbeat.control_url",
                          fix="use https://, or set [heartbeat] allow_insecure_http = true")


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any  # parsed JSON, or None


class ControlClient:
    def __init__(self, config: HeartbeatConfig) -> None:
        self.base = config.control_url.rstrip("/")
        check_url(self.base, config.allow_insecure_http)
        self.token_file = config.token_file
        self._context = ssl.create_default_context()

    def post(self, path: str, payload: Any) -> Answer:
        """POST JSON; TemporaryError for what a retry may fix, HostError for what it won't."""
        token = read_token(self.token_file)
        parts = urlsplit(self.base + path)
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body)),
                   "User-Agent": "clusterctl-agent"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.hostname or "", parts.port,
                                               timeout=CONNECT_TIMEOUT_S, context=self._context)
        else:
            conn = http.client.HTTPConnection(parts.hostname or "", parts.port,
                                              timeout=CONNECT_TIMEOUT_S)
        deadline = time.monotonic() + TOTAL_TIMEOUT_S
        try:
            conn.connect()
            if conn.sock is not None:
                conn.sock.settimeout(max(0.1, deadline - time.monotonic()))
            conn.request("POST", target, body=body, headers=headers)
            response = conn.getresponse()
            raw = response.read(MAX_ANSWER_BYTES)
            status = response.status
        except ssl.SSLCertVerificationError as err:
            raise HostError(f"control plane {self.base}: TLS certificate not trusted "
                            f"({err.verify_message})",
                            fix="install its CA in the system store, or fix control_url") from err
        except (OSError, http.client.HTTPException) as err:  # timeouts are OSErrors
            raise TemporaryError(f"control plane {self.base} unreachable: {err}") from err
        finally:
            conn.close()
        if status >= 500 or status == 429:
            raise TemporaryError(f"control plane {self.base}{path} answered HTTP {status}")
        if status in (401, 403):
            raise HostError(f"control plane {self.base}{path} refused the token (HTTP {status})",
                            fix=f"put the right token in {self.token_file} (mode 0600)")
        if status >= 400:
            raise HostError(f"control plane {self.base}{path} rejected the request "
                            f"(HTTP {status}): {raw[:200]!r}")
        try:
            parsed = json.loads(raw) if raw.strip() else None
        except ValueError:
            parsed = None  # 2xx is the acknowledgement; the body is a courtesy
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
