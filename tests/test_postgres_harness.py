"""The tests' throwaway PostgreSQL (tests.postgres, the conftest fixtures): it answers, each
test gets a database of its own, and nothing is left running or on disk afterwards, even
when the test that used it failed."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
import sqlalchemy as sa

from tests.conftest import REPO
from tests.postgres import PostgresServer, PostgresUnavailable, find_bindir, port_open


def running(pid: int) -> bool:
    """Whether process pid lives (a zombie that has yet to be reaped does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


SEEN: list[str] = []  # the databases the two tests below were given, in order


def test_a_query_works(postgres_url: str) -> None:
    assert urlsplit(postgres_url).hostname == "127.0.0.1"
    with psycopg.connect(postgres_url) as conn:
        row = conn.execute("SELECT 6 * 7, current_database()").fetchone()
    assert row is not None
    assert row[0] == 42
    assert postgres_url.endswith(f"/{row[1]}")


@pytest.mark.parametrize("turn", [1, 2])
def test_two_tests_get_separate_databases(postgres_server: str, postgres_url: str,
                                          turn: int) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'mark'"
                              ).fetchone()
        assert tables == (0,)  # nothing from the other test
        conn.execute("CREATE TABLE mark (turn int)")
        conn.execute("INSERT INTO mark VALUES (%s)", (turn,))
        name = conn.execute("SELECT current_database()").fetchone()
    assert name is not None
    SEEN.append(name[0])
    if turn == 2:
        assert len(set(SEEN)) == 2
        with psycopg.connect(postgres_server + "postgres") as conn:
            left = conn.execute("SELECT datname FROM pg_database WHERE datname = %s",
                                (SEEN[0],)).fetchall()
        assert left == []  # the first test's database was dropped after it


def test_database_url_serves_both_backends(database_url: str) -> None:
    """What storage tests get: SQLite in tmp_path, or a fresh PostgreSQL database (plain
    postgresql://, which SQLAlchemy is told to drive with psycopg 3)."""
    engine = sa.create_engine(database_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE nodes (id text PRIMARY KEY)"))
            conn.execute(sa.text("INSERT INTO nodes VALUES ('vast_1')"))
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT id FROM nodes")).scalars().all() == ["vast_1"]
            dialect = conn.dialect.name
    finally:
        engine.dispose()
    assert dialect == database_url.split(":", maxsplit=1)[0]


def test_a_server_stops_and_leaves_nothing_behind() -> None:
    with PostgresServer() as server:
        base = server.base
        assert base is not None
        pid = int((server.data / "postmaster.pid").read_text().split()[0])
        with psycopg.connect(server.url + "postgres") as conn:
            sockets = conn.execute("SHOW unix_socket_directories").fetchone()
        assert sockets == (str(base),)  # not /var/run/postgresql
        assert port_open(server.port)
    assert not port_open(server.port)
    assert not base.exists()
    assert not running(pid)


INNER = """
import psycopg

def test_uses_the_server_then_fails(postgres_url):
    with psycopg.connect(postgres_url) as conn:
        data = conn.execute("SHOW data_directory").fetchone()[0]
        port = conn.execute("SHOW port").fetchone()[0]
    pid = open(f"{data}/postmaster.pid").read().split()[0]
    print(f"SERVER {port} {pid} {data}")
    assert False, "this test fails on purpose"
"""


def test_the_session_server_is_gone_after_a_failing_run(tmp_path: Path) -> None:
    """A pytest run whose test used the fixtures and failed: afterwards its port is closed
    and its temporary directory (TMPDIR is a fresh one here) is empty."""
    (tmp_path / "test_inner.py").write_text(INNER)
    tmpdir = Path(tempfile.mkdtemp(prefix="clusterctl-pgtest-"))
    tmpdir.chmod(0o755)  # the server's user must reach its directory inside
    try:
        env = {**os.environ, "TMPDIR": str(tmpdir),
               "PYTHONPATH": os.pathsep.join((str(REPO), str(REPO / "agent")))}
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
             "-s", "--rootdir", str(tmp_path), "--basetemp", str(tmp_path / "basetemp"),
             str(tmp_path / "test_inner.py")],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, check=False)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "this test fails on purpose" in result.stdout
        line = next(x for x in result.stdout.splitlines() if "SERVER " in x)
        port, pid, data = line.split("SERVER ", 1)[1].split(" ", 2)
        assert Path(data).is_relative_to(tmpdir)
        assert not port_open(int(port))
        assert not running(int(pid))
        assert list(tmpdir.iterdir()) == []
    finally:
        subprocess.run(["rm", "-rf", str(tmpdir)], check=False)


def test_without_postgresql_the_fixture_says_what_to_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PostgresUnavailable, match=r"apt-get install postgresql"):
        find_bindir(tmp_path / "lib")


def test_the_highest_installed_version_is_used(tmp_path: Path) -> None:
    for version in ("9.6", "15", "16"):
        bindir = tmp_path / version / "bin"
        bindir.mkdir(parents=True)
        for tool in ("initdb", "pg_ctl", "postgres"):
            (bindir / tool).touch()
    (tmp_path / "17/bin").mkdir(parents=True)  # a client-only version: no server
    assert find_bindir(tmp_path) == tmp_path / "16/bin"
