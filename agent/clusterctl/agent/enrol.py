"""Enrolment: the node's own token from a clusterctl control plane.

``[heartbeat] token_file`` holds the fleet's join token. Before a request, a node with
no ``{state_dir}/node-token`` and a join token asks ``POST /api/agent/enroll`` (with the
join token) for a node token, and writes it there (mode 0600, atomically); the client
sends it from then on. A control plane that answers 404 has no enrolment (it is not
clusterctl's): the join token goes on being sent as it is, and enrolment is asked again
only after an hour. A node token answered 401 (the control plane forgot it) makes the
node enrol again, at most once a minute; a refusal (401 to the join token, 403 revoked,
409 enrolled already) is logged once with the fix and tried again after a minute. A
token is never logged.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clusterctl import system
from clusterctl.agent.control import ControlClient, Refused, read_token
from clusterctl.errors import ClusterctlError, TemporaryError
from clusterctl.host.procfs import read_boot_id

log = logging.getLogger("clusterctl.agent")
ENROL_PATH = "/api/agent/enroll"
AGAIN_AFTER_S = 60.0  # a refused or lost enrolment: asked again at most this often
NOT_OURS_AGAIN_S = 3600.0  # a control plane without enrolment (404): asked again after this
_NODE_TOKEN = re.compile(r"^[A-Za-z0-9_-]{43,4096}$")
_FIXES = {
    403: "the operator revoked this node; clusterctl fleet revoke ID --forget lets it enrol "
         "again",
    409: "revoke it on the control plane (clusterctl fleet revoke ID) to enrol again",
}


def node_token_of(body: Any) -> str | None:
    """The node token in an enrolment answer: 43 to 4096 URL-safe characters (pure)."""
    token = body.get("node_token") if isinstance(body, dict) else None
    return token if isinstance(token, str) and _NODE_TOKEN.match(token) else None


def said_by_server(body: Any, key: str) -> str | None:
    """``body[key]`` when it is a string, as one printable line of at most 300 characters
    (the control plane's words, never trusted to be tidy) (pure)."""
    value = body.get(key) if isinstance(body, dict) else None
    if not isinstance(value, str) or not value.strip():
        return None
    line = "".join(c if c.isprintable() else " " for c in value).strip()
    return line[:300]


def refusal(status: int, body: Any, instance_id: str, token_file: Path) -> tuple[str, str]:
    """(problem, fix) for an enrolment the control plane refused (pure)."""
    if status == 401:
        return (f"the control plane refused the join token (HTTP 401) to enrol {instance_id}",
                f"put the fleet's join token in {token_file} (mode 0600)")
    error = said_by_server(body, "error")
    problem = f"the control plane refused to enrol {instance_id} (HTTP {status})"
    return (f"{problem}: {error}" if error else problem,
            said_by_server(body, "fix") or _FIXES.get(status, "see the control plane's log"))


class Enrolment:
    """When to enrol, and doing it, for one client (a new client: a fresh start)."""

    def __init__(self, client: ControlClient, instance_id: str, *,
                 monotonic: Callable[[], float] = time.monotonic,
                 root: Path = Path("/")) -> None:
        self.client = client
        self.instance_id = instance_id
        self.monotonic = monotonic
        self.root = root  # where boot_id is read
        self._lock = threading.Lock()
        self._not_before: float | None = None  # no enrolment before this (monotonic)
        self._again_at: float | None = None  # the last enrolment after a refused token
        self._said: str | None = None  # the problem last logged

    def before(self) -> None:
        """Before a request: enrol when there is no node token and token_file holds a join
        token (not again within the wait a refusal or a 404 set). A node-token file that
        breaks the token rules raises HostError, as the request would."""
        path = self.client.node_token_file
        if path is None or read_token(path) is not None:
            return
        if read_token(self.client.token_file) is None:
            return  # nothing to enrol with: requests go as they are
        with self._lock:
            if self._not_before is not None and self.monotonic() < self._not_before:
                return
            self._enrol()

    def again(self) -> bool:
        """The node token was refused (401): enrol again, at most once per AGAIN_AFTER_S.
        True when a new node token is in place (the request may be sent again)."""
        if self.client.node_token_file is None:
            return False
        with self._lock:
            now = self.monotonic()
            if self._again_at is not None and now - self._again_at < AGAIN_AFTER_S:
                return False
            self._again_at = now
            return self._enrol()

    def _enrol(self) -> bool:
        path = self.client.node_token_file
        assert path is not None
        body = {"instance_id": self.instance_id, "hostname": socket.gethostname(),
                "boot_id": read_boot_id(self.root)}
        try:
            answer = self.client.post(ENROL_PATH, body, join=True)
        except Refused as err:
            if err.status == 404:
                self._not_before = self.monotonic() + NOT_OURS_AGAIN_S
                self._say(f"{self.client.base} has no enrolment (HTTP 404): the token in "
                          f"{self.client.token_file} is sent as it is", error=False)
                return False
            self._not_before = self.monotonic() + AGAIN_AFTER_S
            self._say("; ".join(refusal(err.status, err.body, self.instance_id,
                                        self.client.token_file)))
            return False
        except TemporaryError as err:  # the request after this one says it too
            log.debug("enrolment: %s", err.one_line())
            return False
        except ClusterctlError as err:  # a redirect, an untrusted certificate
            self._not_before = self.monotonic() + AGAIN_AFTER_S
            self._say(f"cannot enrol: {err.one_line()}")
            return False
        token = node_token_of(answer.body)
        if token is None:
            self._not_before = self.monotonic() + AGAIN_AFTER_S
            self._say(f"{self.client.base} answered the enrolment without a node token "
                      "(43 or more URL-safe characters)")
            return False
        try:
            system.atomic_write_text(path, token + "\n", mode=0o600, keep_owner=False)
        except (OSError, ClusterctlError) as err:
            self._not_before = self.monotonic() + AGAIN_AFTER_S
            why = err.one_line() if isinstance(err, ClusterctlError) else err.strerror
            self._say(f"cannot keep the node token in {path}: {why}")
            return False
        self._not_before = None
        self._said = None
        log.info("enrolled %s at %s; node token in %s", self.instance_id, self.client.base,
                 path)
        return True

    def _say(self, problem: str, *, error: bool = True) -> None:
        if problem != self._said:  # once per distinct problem, not every minute
            self._said = problem
            log.log(logging.ERROR if error else logging.INFO, "enrolment: %s", problem)
