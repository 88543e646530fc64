"""A real control plane for tests: clusterctl.fleet.server.serve on 127.0.0.1, in a
thread of its own, on SQLite or a real PostgreSQL, with a clock the test can move."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from clusterctl.config import FleetConfig
from clusterctl.fleet.server import Fleet, serve
from clusterctl.fleet.store import open_store
from tests.fakes.control_plane import free_port

JOIN = "join-token-for-tests-0123456789"
ADMIN = "admin-token-for-tests-0123456789"


def token_file(path: Path, token: str) -> Path:
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


class Clock:
    """Wall and monotonic time that a test moves by hand (``advance``)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.wall = start
        self.mono = 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono


class FleetServer:
    def __init__(self, tmp: Path, database: str, *, clock: Clock | None = None,
                 port: int | None = None, **settings: Any) -> None:
        self.tmp = tmp
        self.port = port or free_port()
        self.config = replace(
            FleetConfig(), listen=f"127.0.0.1:{self.port}", database=database,
            join_token_file=token_file(tmp / "join-token", JOIN),
            admin_token_file=token_file(tmp / "admin-token", ADMIN), **settings)
        self.clock = clock
        self.fleet: Fleet | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._failed: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FleetServer:
        ready = threading.Event()

        def ready_cb(fleet: Fleet) -> None:
            self.fleet = fleet
            ready.set()

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            clocks: dict[str, Callable[[], float]] = {}
            if self.clock is not None:
                clocks = {"clock": self.clock.time, "monotonic": self.clock.monotonic}
            store = await asyncio.to_thread(open_store, self.config.database)
            await serve(self.config, store, ready=ready_cb, stop=self._stop, **clocks)

        def thread() -> None:
            try:
                asyncio.run(main())
            except BaseException as err:
                self._failed = err
                ready.set()

        self._thread = threading.Thread(target=thread, daemon=True, name="fleet-server")
        self._thread.start()
        ready.wait(60)
        if self._failed is not None:
            raise self._failed
        assert self.fleet is not None, "the control plane did not start within 60 s"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)
        self._thread = None

    def __enter__(self) -> FleetServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run(self, coro_fn: Callable[[], Any]) -> Any:
        """Run a coroutine (e.g. ``fleet.tick``) on the server's loop; its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro_fn(), self._loop).result(30)

    def tick(self) -> None:
        assert self.fleet is not None
        self.run(self.fleet.tick)

    # -- HTTP ------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                raw: bytes | None = None, headers: dict[str, str] | None = None
                ) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=data, headers=sent)
            answer = conn.getresponse()
            text = answer.read()
        finally:
            conn.close()
        try:
            return answer.status, json.loads(text) if text.strip() else None
        except ValueError:
            return answer.status, text.decode(errors="replace")

    def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return self.request(method, path, body, token=ADMIN)

    def enrol(self, instance_id: str, hostname: str = "") -> str:
        status, answer = self.request("POST", "/api/agent/enroll",
                                      {"instance_id": instance_id,
                                       "hostname": hostname or instance_id, "boot_id": "b1"},
                                      token=JOIN)
        assert status == 200, answer
        return str(answer["node_token"])


def heartbeat(instance_id: str, *, status: str = "running", boot_id: str = "b1",
              interval_s: int = 30, gpus: int = 2, mac: str | None = "52:54:00:12:34:56",
              **extra: Any) -> dict[str, Any]:
    """A heartbeat as an agent sends it (the keys the control plane reads)."""
    return {"schema_version": 1, "instance_id": instance_id, "hostname": instance_id,
            "timestamp": "2027-01-15T08:00:00Z", "boot_id": boot_id, "sequence": 1,
            "monotonic_s": 100.0, "status": status, "idle_since": None,
            "gpu_utilization": 0.0, "gpus": [{"index": i} for i in range(gpus)],
            "memory": {}, "swap": {}, "schedule": None, "agent_version": "test",
            "interval_s": interval_s, "accept_commands": True,
            "net": {"interface": "eth0", "mac": mac},
            "hibernate": {"enabled": True, "gpu_usage_threshold": 5.0,
                          "pause_after_minutes": 3}, **extra}


def event(instance_id: str, event_id: str, event_type: str = "idle_detected",
          **details: Any) -> dict[str, Any]:
    return {"id": event_id, "event_type": event_type, "timestamp": "2027-01-15T08:00:00Z",
            "instance_id": instance_id, "reason": "test", **details}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


IDLE_H100 = {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-fleet-0",
             "pci_bus_id": "00000000:19:00.0", "memory_total": 85_520_809_984,
             "memory_used": 4_194_304_000, "utilization_gpu": 1}


def agent_conf(tmp: Path, fleet_url: str, *, port: int, extra: str = "") -> Path:
    """A node's config against a control plane: the join token in token_file, a
    `command` hibernation action that only leaves a mark, everything under ``tmp``."""
    mark = tmp / "hibernated-by-command"
    script = tmp / "sleep-now"
    script.write_text(f'#!/bin/sh\ndate +%s >> {mark}\n')
    script.chmod(0o755)
    conf = tmp / "clusterctl.toml"
    conf.write_text(
        f'[hibernate]\nenabled = false\naction = "command"\ncommand = ["{script}"]\n'
        f'[heartbeat]\ncontrol_url = "{fleet_url}"\ninterval = 10\ninstance_id = "gpu-node-1"\n'
        f'token_file = "{token_file(tmp / "join-token-node", JOIN)}"\n{extra}'
        "[gpu]\nmonitor_interval = 0.5\n"
        f'[api]\nlisten = "127.0.0.1:{port}"\n'
        f'[paths]\nstate_dir = "{tmp / "state"}"\nrun_dir = "{tmp / "run"}"\n'
        f'[swap]\ndir = "{tmp / "swap"}"\n[ollama]\nurl = "http://127.0.0.1:9"\n')
    return conf


def stop_process(proc: Any, timeout_s: float = 30) -> None:
    """SIGTERM, ``timeout_s`` to go, then SIGKILL: a subprocess the test started."""
    import signal
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
