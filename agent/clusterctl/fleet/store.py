"""The fleet's database: nodes, their events and the commands queued for them.

One interface, two engines through SQLAlchemy Core: SQLite (WAL, a busy timeout) by
default, PostgreSQL (psycopg 3) for larger fleets. The schema is versioned with Alembic;
``open_store`` migrates to the newest revision before anything else runs. What changes
often (a node's last heartbeat time) stays in the server's memory: only transitions,
events, commands and settings are written here.

Every call is synchronous (the server runs them on worker threads). A database that is
down, locked or refusing is a ``DatabaseUnavailable`` (a TemporaryError: the server
answers 503 and the node keeps its events); nothing half-written is kept, each call is
one transaction.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from clusterctl.errors import ConfigError, HostError, TemporaryError

MIGRATIONS = Path(__file__).parent / "migrations"
BUSY_TIMEOUT_S = 5.0

metadata = sa.MetaData()
nodes = sa.Table(
    "nodes", metadata,
    sa.Column("instance_id", sa.String(253), primary_key=True),
    sa.Column("hostname", sa.String(253)),
    sa.Column("token_hash", sa.String(64)),
    sa.Column("enrolled_at", sa.Float),
    sa.Column("revoked_at", sa.Float),
    sa.Column("state", sa.String(16)),
    sa.Column("state_since", sa.Float),
    sa.Column("last_seen", sa.Float),
    sa.Column("boot_id", sa.String(64)),
    sa.Column("mac", sa.String(17)),
    sa.Column("interface", sa.String(64)),
    sa.Column("agent_version", sa.String(64)),
    sa.Column("interval_s", sa.Integer),
    sa.Column("gpus", sa.Integer),
    sa.Column("heartbeat", sa.Text),
    sa.Column("hibernate", sa.Text),
    sa.Column("schedule", sa.Text),
    sa.Column("wake_started_at", sa.Float),
    sa.Column("hibernated_s", sa.Float),
    sa.Column("idle_gpu_s_avoided", sa.Float),
)
events = sa.Table(
    "events", metadata,
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
              autoincrement=True),
    sa.Column("instance_id", sa.String(253)),
    sa.Column("event_id", sa.String(128)),
    sa.Column("event_type", sa.String(64)),
    sa.Column("source", sa.String(8)),
    sa.Column("received_at", sa.Float),
    sa.Column("body", sa.Text),
)
commands = sa.Table(
    "commands", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("instance_id", sa.String(253)),
    sa.Column("type", sa.String(32)),
    sa.Column("args", sa.Text),
    sa.Column("created_at", sa.Float),
    sa.Column("state", sa.String(10)),
    sa.Column("finished_at", sa.Float),
    sa.Column("error", sa.Text),
)
JSON_COLUMNS = ("heartbeat", "hibernate", "schedule")
NODE_FIELDS = tuple(c.name for c in nodes.columns)


class DatabaseUnavailable(TemporaryError):
    """The database did not answer, or refused (down, locked, out of space)."""


class Refused(HostError):
    """What was asked contradicts what is stored (a second enrolment, a revoked node)."""

    def __init__(self, message: str, *, status: int, fix: str | None = None) -> None:
        super().__init__(message, fix=fix)
        self.status = status


@dataclass(frozen=True)
class Command:
    id: str
    instance_id: str
    type: str
    args: Mapping[str, Any]
    created_at: float
    state: str = "pending"  # pending | applied | failed
    finished_at: float | None = None
    error: str | None = None

    def wire(self) -> dict[str, Any]:
        """As a heartbeat answer carries it."""
        return {"id": self.id, "type": self.type, "args": dict(self.args)}

    def shown(self) -> dict[str, Any]:
        return {**self.wire(), "instance_id": self.instance_id, "created_at": self.created_at,
                "state": self.state, "finished_at": self.finished_at, "error": self.error}


def engine_url(url: str) -> sa.URL:
    """The SQLAlchemy URL for a [fleet] database (postgresql:// means psycopg 3)."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as err:
        raise ConfigError(f"database {url!r:.200} is not a database URL",
                          key="fleet.database") from err
    if parsed.drivername in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername == "sqlite":
        return parsed
    raise ConfigError(f"database {parsed.drivername}:// is not supported", key="fleet.database",
                      fix='use "sqlite:////var/lib/clusterctl/fleet.db" or "postgresql://..."')


def _unavailable(url: sa.URL, err: Exception) -> DatabaseUnavailable:
    detail = str(getattr(err, "orig", None) or err).strip().splitlines()
    return DatabaseUnavailable(
        f"the fleet database "
        f"{url.set(drivername=url.get_backend_name()).render_as_string(hide_password=True)} "
        f"is unavailable: "
        f"{(detail[0] if detail else type(err).__name__)[:300]}",
        fix="check that it is running and reachable, with space left; nodes keep their "
            "events and send them again")


class Store:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.url = engine.url
        self._lock = threading.Lock() if engine.dialect.name == "sqlite" else None

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        """One transaction; a database error becomes DatabaseUnavailable."""
        try:
            if self._lock is not None:  # one SQLite writer at a time, in this process
                with self._lock, self.engine.begin() as conn:
                    yield conn
            else:
                with self.engine.begin() as conn:
                    yield conn
        except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.InternalError,
                sa.exc.DBAPIError) as err:
            if isinstance(err, sa.exc.IntegrityError):
                raise
            raise _unavailable(self.url, err) from err

    def close(self) -> None:
        self.engine.dispose()

    # -- health ----------------------------------------------------------------
    def ping(self) -> None:
        with self._tx() as conn:
            conn.execute(sa.text("SELECT 1"))

    # -- nodes -----------------------------------------------------------------
    def nodes(self) -> list[dict[str, Any]]:
        with self._tx() as conn:
            rows = conn.execute(sa.select(nodes).order_by(nodes.c.instance_id)).mappings()
            return [_node(row) for row in rows]

    def enrol(self, instance_id: str, hostname: str, token_hash: str, now: float,
              event: Mapping[str, Any]) -> None:
        """A new node, or a forgotten one again; Refused when the id is taken or revoked."""
        with self._tx() as conn:
            row = conn.execute(sa.select(nodes.c.token_hash, nodes.c.revoked_at)
                               .where(nodes.c.instance_id == instance_id)).first()
            if row is not None and row.revoked_at is not None:
                raise Refused(f"instance {instance_id} was revoked by the operator", status=403,
                              fix=f"on the control plane: clusterctl fleet revoke {instance_id} "
                                  "--forget, then the node enrols again")
            if row is not None:
                raise Refused(f"instance {instance_id} is already enrolled", status=409,
                              fix=f"if this is a reinstalled node, revoke the old one first: "
                                  f"clusterctl fleet revoke {instance_id} --forget")
            conn.execute(sa.insert(nodes).values(
                instance_id=instance_id, hostname=hostname, token_hash=token_hash,
                enrolled_at=now, state="running", state_since=now, last_seen=now,
                interval_s=30, gpus=0, hibernated_s=0.0, idle_gpu_s_avoided=0.0))
            self._insert_events(conn, instance_id, [event], "fleet", now)

    def update_node(self, instance_id: str, fields: Mapping[str, Any],
                    fleet_events: Sequence[Mapping[str, Any]] = (), now: float = 0.0) -> None:
        """Write changed fields (JSON ones as objects) and the fleet events they caused."""
        values = {k: (None if v is None else json.dumps(v, separators=(",", ":")))
                  if k in JSON_COLUMNS else v for k, v in fields.items()}
        unknown = set(values) - set(NODE_FIELDS)
        assert not unknown, unknown
        with self._tx() as conn:
            if values:
                conn.execute(sa.update(nodes).where(nodes.c.instance_id == instance_id)
                             .values(**values))
            self._insert_events(conn, instance_id, fleet_events, "fleet", now)

    def revoke(self, instance_id: str, now: float, *, forget: bool,
               event: Mapping[str, Any]) -> bool:
        """Revoke a node's token (its history stays); ``forget`` also removes the node's
        row, so that it can enrol again. False when there is no such node."""
        with self._tx() as conn:
            if forget:
                gone = conn.execute(sa.delete(nodes).where(nodes.c.instance_id == instance_id))
                conn.execute(sa.delete(commands).where(commands.c.instance_id == instance_id))
            else:
                gone = conn.execute(sa.update(nodes).where(nodes.c.instance_id == instance_id)
                                    .values(token_hash=None, revoked_at=now, state="revoked",
                                            state_since=now))
            if gone.rowcount:
                self._insert_events(conn, instance_id, [event], "fleet", now)
            return bool(gone.rowcount)

    # -- events ----------------------------------------------------------------
    def add_events(self, instance_id: str, batch: Sequence[Mapping[str, Any]], now: float,
                   acks: Sequence[tuple[str, bool, str | None]] = ()
                   ) -> tuple[list[str], int]:
        """Store a node's events once each, in order, and in the same transaction mark
        the commands they acknowledge (id, ok, error) done; (the types of the events that
        were new, the number of duplicates)."""
        with self._tx() as conn:
            new = self._insert_events(conn, instance_id, batch, "node", now)
            for command_id, ok, error in acks:
                conn.execute(sa.update(commands).where(
                    commands.c.id == command_id, commands.c.instance_id == instance_id,
                    commands.c.state == "pending").values(
                        state="applied" if ok else "failed", finished_at=now,
                        error=None if error is None else error[:500]))
        return new, len(batch) - len(new)

    def _insert_events(self, conn: Connection, instance_id: str,
                       batch: Sequence[Mapping[str, Any]], source: str, now: float
                       ) -> list[str]:
        """The events not stored yet, stored; their types."""
        if not batch:
            return []
        ids = [str(e["id"]) for e in batch]
        have = set(conn.execute(sa.select(events.c.event_id).where(
            events.c.instance_id == instance_id, events.c.event_id.in_(ids))).scalars())
        rows, seen = [], set(have)
        for event in batch:
            key = str(event["id"])
            if key in seen:
                continue
            seen.add(key)
            rows.append({"instance_id": instance_id, "event_id": key,
                         "event_type": str(event["event_type"]), "source": source,
                         "received_at": now,
                         "body": json.dumps(event, separators=(",", ":"))})
        if rows:
            conn.execute(sa.insert(events), rows)
        return [str(row["event_type"]) for row in rows]

    def events(self, instance_id: str, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` events of a node, newest first."""
        with self._tx() as conn:
            rows = conn.execute(sa.select(events.c.body, events.c.source)
                                .where(events.c.instance_id == instance_id)
                                .order_by(events.c.seq.desc()).limit(limit))
            return [{**json.loads(body), "source": source} for body, source in rows]

    # -- commands --------------------------------------------------------------
    def add_command(self, command: Command, event: Mapping[str, Any]) -> None:
        with self._tx() as conn:
            conn.execute(sa.insert(commands).values(
                id=command.id, instance_id=command.instance_id, type=command.type,
                args=json.dumps(dict(command.args)), created_at=command.created_at,
                state="pending"))
            self._insert_events(conn, command.instance_id, [event], "fleet", command.created_at)

    def pending_commands(self) -> list[Command]:
        with self._tx() as conn:
            rows = conn.execute(sa.select(commands).where(commands.c.state == "pending")
                                .order_by(commands.c.created_at, commands.c.id)).mappings()
            return [_command(row) for row in rows]


def _node(row: sa.RowMapping) -> dict[str, Any]:
    node = dict(row)
    for key in JSON_COLUMNS:
        try:
            node[key] = None if node[key] is None else json.loads(node[key])
        except ValueError:
            node[key] = None
    return node


def _command(row: sa.RowMapping) -> Command:
    try:
        args = json.loads(row["args"])
    except ValueError:
        args = {}
    return Command(id=row["id"], instance_id=row["instance_id"], type=row["type"],
                   args=args if isinstance(args, dict) else {}, created_at=row["created_at"],
                   state=row["state"], finished_at=row["finished_at"], error=row["error"])


def _refuse_unknown_revision(conn: Connection, settings: AlembicConfig, url: str) -> None:
    """HostError when the database was migrated by a newer clusterctl (a revision that
    this one's migrations do not have): migrating it down or around it would lose data."""
    current = MigrationContext.configure(conn).get_current_heads()
    script = ScriptDirectory.from_config(settings)
    known = {rev.revision for rev in script.walk_revisions()}
    unknown = [rev for rev in current if rev not in known]
    if unknown:
        raise HostError(f"the fleet database {sa.make_url(url).render_as_string()} is at "
                        f"schema revision {unknown[0]}, newer than this clusterctl knows "
                        f"(its newest is {script.get_current_head()})",
                        fix="upgrade clusterctl on this host to the version that wrote it, "
                            "or set [fleet] database to another database")


def open_store(url: str) -> Store:
    """Connect and migrate to the newest schema; ConfigError for a bad URL,
    DatabaseUnavailable when the database cannot be reached or migrated."""
    target = engine_url(url)
    if target.drivername == "sqlite":
        file = Path(target.database or "")
        if not file.is_absolute():
            raise ConfigError(f"database {url}: the SQLite file must be an absolute path",
                              key="fleet.database")
        try:
            file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as err:
            raise HostError(f"cannot create {file.parent} for the fleet database: "
                            f"{err.strerror}", fix="create it, or set [fleet] database") from err
        if file.is_symlink():  # SQLite would follow it, and the chmod below too
            raise HostError(f"the fleet database {file} is a symbolic link",
                            fix="set [fleet] database to the real file's path")
        if file.exists() and not file.is_file():
            raise HostError(f"the fleet database {file} is not a regular file",
                            fix="move it away, or set [fleet] database to another path")
        engine = sa.create_engine(target, connect_args={"timeout": BUSY_TIMEOUT_S,
                                                        "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_settings(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
    else:
        engine = sa.create_engine(target, pool_pre_ping=True, pool_size=8, max_overflow=4,
                                  connect_args={"connect_timeout": 5})
    store = Store(engine)
    settings = AlembicConfig()
    settings.set_main_option("script_location", str(MIGRATIONS))
    try:
        with store._tx() as conn:
            settings.attributes["connection"] = conn
            _refuse_unknown_revision(conn, settings, url)
            alembic_command.upgrade(settings, "head")
    except BaseException:
        engine.dispose()
        raise
    if target.drivername == "sqlite":
        Path(target.database or "").chmod(0o600)
    return store
