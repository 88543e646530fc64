"""The CLI's way to the running agent: its local API (``[api] listen``), so that what the
agent owns (the hibernation state, the action sequence) has one writer.

``ask`` returns None when no agent listens there, so the command can do the work itself.
"""

from __future__ import annotations

import http.client
import json
from typing import Any

from clusterctl.agent.control import read_token
from clusterctl.config import Config
from clusterctl.errors import HostError

ANSWER_LIMIT_BYTES = 1 << 20
TIMEOUT_S = 15.0


def _address(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", ""):  # noqa: S104 (where an agent listening everywhere answers)
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, int(port)


def ask(config: Config, method: str, path: str) -> tuple[int, dict[str, Any]] | None:
    """(status, answer) of the running agent to ``method path``, with the bearer token;
    None when nothing listens at ``[api] listen``. HostError when something answers
    that is not the agent's API."""
    host, port = _address(config.api.listen)
    token = read_token(config.api.token_file)
    headers = {"Content-Length": "0"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    connection = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
    try:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        raw = response.read(ANSWER_LIMIT_BYTES)
    except ConnectionRefusedError:
        return None
    except (OSError, http.client.HTTPException) as err:
        raise HostError(f"the agent's API at {config.api.listen} did not answer "
                        f"{method} {path}: {err}",
                        fix="systemctl status clusterctl-agent") from err
    finally:
        connection.close()
    try:
        answer = json.loads(raw)
    except (ValueError, RecursionError):
        answer = None
    if not isinstance(answer, dict):
        raise HostError(f"what listens at {config.api.listen} is not clusterctl's agent "
                        f"(HTTP {response.status} to {method} {path})",
                        fix="check [api] listen")
    return response.status, answer
