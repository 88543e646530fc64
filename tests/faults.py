"""Harness for the fault suite: a real agent process, a tiny filesystem, a tree snapshot.

- ``tmpfs(path, size_bytes)``: a tmpfs of that size mounted at ``path`` (root only),
  always unmounted after.
- ``snapshot(root, exclude)`` / ``changes(before, after)``: what every file, link and
  directory under ``root`` is (inode, size, mtime, mode, owner, content hash), and
  what differs between two snapshots; for "nothing outside clusterctl's files changed".
- ``AgentProcess``: ``clusterctl agent run --config X`` as a subprocess of this test,
  with the fake NVML, an optional RLIMIT_NOFILE, its stderr in a file; HTTP GETs on its
  API, SIGHUP, SIGTERM. Only the process it started is ever signalled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from clusterctl.events.log import EventLog
from tests.conftest import FAKE_NVML_DIR, H100, REPO, wait_until
from tests.fakes.control_plane import free_port

INSTANCE_ID = "node-1"
GPUS = 2
# Runs clusterctl's CLI with RLIMIT_NOFILE lowered first (argv[1] is the limit; 0: as is),
# killed should this test process die first (PR_SET_PDEATHSIG), so no agent outlives it.
_LAUNCH = ("import ctypes, resource, runpy, signal, sys\n"
           "ctypes.CDLL(None).prctl(1, signal.SIGKILL)\n"
           "n = int(sys.argv.pop(1))\n"
           "if n: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))\n"
           "sys.argv[0] = 'clusterctl'\n"
           "runpy.run_module('clusterctl', run_name='__main__', alter_sys=True)\n")


# -- a small filesystem ----------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """A fresh tmpfs of ``size_bytes`` at ``path`` (created); unmounted after, always."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755",
                           "tmpfs", str(path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True,
                          check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(directory: Path, name: str = "filler") -> Path:
    """A file in ``directory`` grown until its filesystem says ENOSPC."""
    path = directory / name
    chunk = b"\0" * 4096
    with path.open("ab", buffering=0) as handle:
        with contextlib.suppress(OSError):
            while True:
                handle.write(chunk)
        with contextlib.suppress(OSError):
            while True:
                handle.write(b"\0")
    return path


# -- what is on disk -------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    kind: str  # file | link | dir | other
    inode: int
    size_bytes: int
    mtime_ns: int
    mode: int
    uid: int
    content: str  # sha256 of a file, a link's target, "" otherwise


def snapshot(root: Path, exclude: Iterable[Path] = ()) -> dict[str, Entry]:
    """Every path under ``root`` except ``exclude`` (and what is under them).

    A directory's mtime is left out (creating an excluded child changes it); what is in
    it is compared entry by entry instead.
    """
    skipped = {Path(p).absolute() for p in exclude}
    out: dict[str, Entry] = {}
    for top, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = [d for d in dirs if Path(top, d) not in skipped]
        for name in [*dirs, *files]:
            path = Path(top, name)
            if path in skipped:
                continue
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                kind, content, mtime = "link", str(path.readlink()), st.st_mtime_ns
            elif stat.S_ISDIR(st.st_mode):
                kind, content, mtime = "dir", "", 0
            elif stat.S_ISREG(st.st_mode):
                kind, mtime = "file", st.st_mtime_ns
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                kind, content, mtime = "other", "", st.st_mtime_ns
            out[str(path.relative_to(root))] = Entry(
                kind, st.st_ino, 0 if kind == "dir" else st.st_size, mtime, st.st_mode,
                st.st_uid, content)
    return out


def changes(before: dict[str, Entry], after: dict[str, Entry]) -> list[str]:
    """One line per path added, removed or changed (empty: nothing changed)."""
    lines = [f"added {p}" for p in sorted(after.keys() - before.keys())]
    lines += [f"removed {p}" for p in sorted(before.keys() - after.keys())]
    for path in sorted(before.keys() & after.keys()):
        if before[path] != after[path]:
            fields = [f for f in Entry.__dataclass_fields__
                      if getattr(before[path], f) != getattr(after[path], f)]
            lines.append(f"changed {path}: {', '.join(fields)}")
    return lines


# -- the agent as a process ------------------------------------------------------------


def scenario(gpus: int = GPUS) -> dict[str, Any]:
    return {"driver_version": "580.95.05", "gpus": [
        {**H100, "uuid": f"GPU-{i}", "pci_bus_id": f"00000000:{i:02x}:00.0",
         "utilization_gpu": 10 * i, "temperature": 40 + i} for i in range(gpus)]}


class AgentProcess:
    """`clusterctl agent run` in a scratch layout under ``root``.

    ``root/state``, ``root/run`` and ``root/swap`` are clusterctl's own; the config,
    the fake GPUs' scenario and the agent's stderr live in ``root/harness``.
    """

    def __init__(self, root: Path, control_url: str = "", *, nofile: int = 0,
                 cwd: Path | None = None, **extra: str) -> None:
        self.root = root
        self.state = root / "state"
        self.run_dir = root / "run"
        self.swap = root / "swap"
        self.harness = root / "harness"
        self.harness.mkdir(parents=True, exist_ok=True)
        self.conf = self.harness / "clusterctl.toml"
        self.stderr_path = self.harness / "agent.stderr"
        self.token = self.harness / "token"
        self.token.write_text("s3cret\n")
        self.token.chmod(0o600)
        self.api_token = self.harness / "api-token"
        self.api_token.write_text("t0ken\n")
        self.api_token.chmod(0o600)
        self.cwd = cwd or self.harness
        self.nofile = nofile
        self.port = free_port()
        self.extra = extra
        self.conf.write_text(self.config_text(control_url))
        (self.harness / "gpus.json").write_text(json.dumps(scenario()))
        self.proc: subprocess.Popen[bytes] | None = None

    def config_text(self, control_url: str, **extra: str) -> str:
        sections = {"heartbeat": f'control_url = "{control_url}"\ninterval = 1\n'
                                 f'token_file = "{self.token}"\n'
                                 f'instance_id = "{INSTANCE_ID}"\n',
                    "gpu": "monitor_interval = 0.2\n",
                    "api": f'listen = "127.0.0.1:{self.port}"\n'
                           f'token_file = "{self.api_token}"\n',
                    "paths": f'state_dir = "{self.state}"\nrun_dir = "{self.run_dir}"\n',
                    "swap": f'dir = "{self.swap}"\n',
                    "ollama": 'url = "http://127.0.0.1:9"\n'}
        for key, text in {**self.extra, **extra}.items():
            sections[key] = sections.get(key, "") + text
        return "".join(f"[{k}]\n{v}" for k, v in sections.items())

    @property
    def own(self) -> tuple[Path, ...]:
        """clusterctl's own files and the harness's: left out of snapshots."""
        return (self.state, self.run_dir, self.swap, self.harness)

    # -- life ------------------------------------------------------------------------

    def start(self, *, wait: bool = True) -> AgentProcess:
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "CLUSTERCTL_CONFIG")}
        env["PYTHONPATH"] = os.pathsep.join((str(FAKE_NVML_DIR), str(REPO / "agent"),
                                             str(REPO)))
        env["FAKE_NVML_SCENARIO"] = str(self.harness / "gpus.json")
        with self.stderr_path.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _LAUNCH, str(self.nofile), "agent", "run",
                 "--config", str(self.conf)],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, cwd=self.cwd, env=env)
        if wait:
            wait_until(lambda: self.get("/healthz")[0] in (200, 503) or not self.alive(),
                       timeout_s=30)
            assert self.alive(), f"the agent ended at start:\n{self.stderr()}"
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def hup(self) -> None:
        assert self.proc is not None and self.alive()
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it has not ended in 15 s; the exit status (-9: killed)."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        return proc.returncode

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- talking to it ---------------------------------------------------------------

    def get(self, path: str, timeout_s: float = 5.0) -> tuple[int | None, Any]:
        return self.request("GET", path, timeout_s=timeout_s)

    def request(self, method: str, path: str, body: Any = None, *, token: bool = False,
                timeout_s: float = 5.0) -> tuple[int | None, Any]:
        """(status, JSON or text); (None, the error) when nothing answered. ``body`` goes
        as JSON; ``token``: with the API's bearer token."""
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = "Bearer t0ken"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as response:
                raw, status, kind = response.read(), response.status, response.headers
        except urllib.error.HTTPError as err:
            raw, status, kind = err.read(), err.code, err.headers
        except (OSError, ValueError) as err:  # refused, reset, timed out, not HTTP
            return None, str(err)
        if "json" in kind.get("Content-Type", ""):
            return status, json.loads(raw)
        return status, raw.decode(errors="replace")

    def sample_time(self) -> str | None:
        """The timestamp of the agent's latest GPU sample (it advances while sampling)."""
        status, body = self.get("/api/v1/monitoring/gpu-metrics")
        return body.get("timestamp") if status == 200 and isinstance(body, dict) else None

    def sampling(self, timeout_s: float = 5.0) -> bool:
        """True when a new GPU sample appears within ``timeout_s``."""
        first = self.sample_time()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            now = self.sample_time()
            if now is not None and now != first:
                return True
            time.sleep(0.1)
        return False

    def record(self, *numbers: int) -> None:
        """Events ``n`` = numbers, as `clusterctl` commands record them (the real log)."""
        log = EventLog(self.state, INSTANCE_ID)
        for n in numbers:
            log.record("swap_expanded", f"event {n}", {"n": n}, now=time.time())


def idle_connections(port: int, count: int, *, timeout_s: float = 3.0,
                     pace_s: float = 0.005) -> list[socket.socket]:
    """Up to ``count`` TCP connections to 127.0.0.1:port that never send a byte.

    One at a time, ``pace_s`` apart, so a server that accepts keeps its accept queue
    clear; it stops early when two connects in a row time out (the server no longer
    accepts). Close them after.
    """
    held: list[socket.socket] = []
    failed = 0
    while len(held) < count and failed < 2:
        s = socket.socket()
        s.settimeout(timeout_s)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            s.close()
            failed += 1
            continue
        failed = 0
        held.append(s)
        time.sleep(pace_s)
    return held
