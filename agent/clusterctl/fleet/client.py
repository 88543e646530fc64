"""The operator's client of a control plane's API (`clusterctl fleet ...`)."""

from __future__ import annotations

import http.client
import json
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from clusterctl.agent.control import read_token
from clusterctl.errors import HostError, TemporaryError, UsageError

TIMEOUT_S = 30.0
MAX_ANSWER_BYTES = 64 << 20


def default_server(listen: str) -> str:
    """Where this host's own control plane answers, from [fleet] listen."""
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", "[::]", ""):  # noqa: S104 - the wildcard names this host
        host = "127.0.0.1"
    return f"http://{host}:{port}"


class FleetClient:
    def __init__(self, server: str, token_file: Path) -> None:
        parts = urlsplit(server.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"--server {server}: expected http(s)://host:port")
        self.server = server.rstrip("/")
        self.parts = parts
        self.token_file = token_file

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """The JSON answer of a 2xx; HostError with the server's error and fix else."""
        token = read_token(self.token_file)
        if token is None:
            raise UsageError(f"no admin token in {self.token_file}",
                             fix="run this on the control-plane host as root, or pass "
                                 "--token-file")
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        port = self.parts.port or (443 if self.parts.scheme == "https" else 80)
        conn: http.client.HTTPConnection
        if self.parts.scheme == "https":
            conn = http.client.HTTPSConnection(self.parts.hostname or "", port,
                                               timeout=TIMEOUT_S,
                                               context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(self.parts.hostname or "", port, timeout=TIMEOUT_S)
        try:
            conn.request(method, self.parts.path + path, body=data, headers=headers)
            answer = conn.getresponse()
            raw = answer.read(MAX_ANSWER_BYTES)
        except (OSError, http.client.HTTPException) as err:
            raise TemporaryError(f"the control plane at {self.server} did not answer: "
                                 f"{str(err)[:200] or type(err).__name__}",
                                 fix="is clusterctl-fleet running? "
                                     "(systemctl status clusterctl-fleet)") from err
        finally:
            conn.close()
        try:
            parsed = json.loads(raw) if raw.strip() else None
        except (ValueError, RecursionError):  # not JSON, or nested too deep to read
            parsed = None
        if not 200 <= answer.status < 300:
            error = parsed.get("error") if isinstance(parsed, dict) else None
            fix = parsed.get("fix") if isinstance(parsed, dict) else None
            raise HostError(f"{self.server}{path}: HTTP {answer.status}"
                            + (f": {error}" if error else ""), fix=fix)
        return parsed


def node_path(instance_id: str, tail: str) -> str:
    return f"/api/instances/{quote(instance_id, safe='')}{tail}"
