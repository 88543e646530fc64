"""A throwaway PostgreSQL server for the tests: ``initdb`` and ``pg_ctl`` from Debian's
``postgresql`` package in a temporary directory, on 127.0.0.1 and a free port only (its
unix socket in that directory too), fsync off. Run as the ``postgres`` user when the
tests run as root (postgres refuses root). Stopped (``pg_ctl stop -m immediate``) and
removed whatever happens.

    with PostgresServer() as server:
        server.url  # postgresql://USER:PASS@127.0.0.1:PORT/
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

TOOLS = ("initdb", "pg_ctl", "postgres")
USER = "clusterctl"
INSTALL_HINT = "apt-get install postgresql (./scripts/test installs it when run as root)"


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be started here; the message says why and what to do."""


def _version_key(path: Path) -> tuple[int, ...]:
    """/usr/lib/postgresql/15/bin -> (15,); a name that is not a version sorts first."""
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name)) or (-1,)


def find_bindir(lib: Path = Path("/usr/lib/postgresql")) -> Path:
    """The directory of initdb, pg_ctl and postgres: Debian's highest version, else PATH."""
    found = [b for b in lib.glob("*/bin") if all((b / t).is_file() for t in TOOLS)]
    if found:
        return max(found, key=_version_key)
    initdb = shutil.which("initdb")
    if initdb is not None:
        bindir = Path(initdb).resolve().parent
        if all((bindir / t).is_file() for t in TOOLS):
            return bindir
    raise PostgresUnavailable(
        f"PostgreSQL is not installed (no initdb in {lib}/*/bin or on PATH); {INSTALL_HINT}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _wait_gone(pid: int, timeout_s: float) -> None:
    """Until process pid has exited (gone, or a zombie its reaper has yet to collect)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return
        time.sleep(0.05)


class PostgresServer:
    """One server in its own temporary directory (under ``tempfile.gettempdir()``)."""

    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.password = secrets.token_hex(16)
        self.port = 0
        self.base: Path | None = None
        self._account: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._account = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable(
                    "postgres refuses to run as root and there is no 'postgres' user to run "
                    f"it as; {INSTALL_HINT} (it creates the user)") from None

    @property
    def data(self) -> Path:
        assert self.base is not None
        return self.base / "data"

    @property
    def log(self) -> Path:
        assert self.base is not None
        return self.base / "server.log"

    @property
    def url(self) -> str:
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/"

    def _run(self, *argv: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        """A PostgreSQL tool as the server's user, in its directory, without PG* settings."""
        assert self.base is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", HOME=str(self.base))
        account = self._account
        return subprocess.run(
            [str(self.bindir / argv[0]), *argv[1:]], cwd=self.base, env=env,
            user=account.pw_uid if account else None, group=account.pw_gid if account else None,
            extra_groups=[] if account else None, capture_output=True, text=True,
            timeout=timeout_s, check=False)

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no server log)"

    def start(self) -> None:
        """initdb, then pg_ctl start on a free port (another one if it was taken meanwhile)."""
        self.base = Path(tempfile.mkdtemp(prefix="clusterctl-pg-"))
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        assert self.base is not None
        self.base.chmod(0o700)
        (self.base / "pwfile").write_text(self.password + "\n")
        if self._account is not None:
            os.chown(self.base, self._account.pw_uid, self._account.pw_gid)
            os.chown(self.base / "pwfile", self._account.pw_uid, self._account.pw_gid)
        init = self._run("initdb", "-D", str(self.data), "-U", USER, "--pwfile",
                         str(self.base / "pwfile"), "--auth=scram-sha-256", "-E", "UTF8",
                         "--locale=C", "--no-sync")
        if init.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {(init.stderr or init.stdout).strip()}")
        (self.base / "pwfile").unlink()
        for _ in range(5):
            self.port = free_port()
            settings = (f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                        f"unix_socket_directories = '{self.base}'\n"
                        "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                        "max_connections = 200\n")
            (self.data / "postgresql.auto.conf").write_text(settings)
            started = self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data),
                                "-l", str(self.log))
            if started.returncode == 0:
                return
            if "already in use" not in self._log_tail():
                break
        raise PostgresUnavailable(
            f"pg_ctl start failed: {(started.stderr or started.stdout).strip()}\n"
            f"server log:\n{self._log_tail()}")

    def stop(self) -> None:
        """Stop the server (immediate: a throwaway needs no checkpoint) and remove its
        directory; safe to call on a half-started server and more than once."""
        if self.base is None:
            return
        try:
            pid = self._postmaster_pid()
            if pid is not None:
                self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", "immediate", "-D",
                          str(self.data))
                _wait_gone(pid, timeout_s=30)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new database ``t_<random>`` on the server; its URL. Dropped at the end, connections
    the test left open included."""
    import psycopg

    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(server_url + "postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield server_url + name
    finally:
        with psycopg.connect(server_url + "postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
