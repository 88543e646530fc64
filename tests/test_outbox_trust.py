"""The outbox against what a crash, a full disk or a hostile hand leaves in its files:
junk lines, a cursor of the wrong shape or a symlink, a drop followed by a rotation, a
deleted file whose inode another file got, a writer rotating the log while the outbox
reads it, a broken heartbeat sequence file. Delivery goes on, every event arrives once
(at least once where the files do not say more), in order. A damaged cursor is kept aside
as ``outbox.json.corrupt-<time>`` and a ``state_file_set_aside`` event (sent like any
other) says so."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterctl import config as cfg
from clusterctl.agent.control import ControlClient
from clusterctl.agent.heartbeat import Delivery
from clusterctl.errors import ClusterctlError
from clusterctl.events.log import EventLog, parse_event
from clusterctl.events.outbox import Outbox
from tests.fakes.control_plane import running
from tests.faults import fill, tmpfs

FAST_DIR = "/dev/shm" if Path("/dev/shm").is_dir() else None  # fsync'd cursors: fast there
ROTATED = "events.jsonl.20000101T000000.{:06d}Z"  # before any test event
SET_ASIDE = "state_file_set_aside"


def record(log: EventLog, *numbers: int) -> list[str]:
    return [log.record("swap_expanded", f"event {n}", {"n": n}, now=1_700_000_000 + n)["id"]
            for n in numbers]


def tags(events: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> list[int | str]:
    """Each event's number, or its type for one this test did not record (a set-aside)."""
    return [e["n"] if "n" in e else e["event_type"] for e in events]


def drain(outbox: Outbox, limit: int = 200, rounds: int = 100) -> list[int | str]:
    """Batches taken and acknowledged until none is left; their events' tags."""
    sent: list[int | str] = []
    for _ in range(rounds):
        batch = outbox.pending(limit=limit)
        if batch.cursor is None:
            break
        sent += tags(batch.events)
        outbox.ack(batch.cursor)
    return sent


def set_aside(state: Path) -> tuple[Path, dict[str, Any]]:
    """The one copy of the cursor kept aside, and the one event that says so."""
    (aside,) = state.glob("outbox.json.corrupt-*")
    (event,) = [e for e in EventLog(state, "node").read() if e["event_type"] == SET_ASIDE]
    assert event["file"] == str(state / "outbox.json")
    assert event["kept_as"] == str(aside)
    return aside, event


def warnings_of(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and text in r.getMessage()]


def delivery(url: str, state: Path) -> Delivery:
    client = ControlClient(cfg.HeartbeatConfig(control_url=url, token_file=state / "none"))
    return Delivery(client, Outbox(state), state)


# -- lines that are not events -----------------------------------------------------------

JUNK = [b"42\n", b"[]\n", b"null\n", b'"text"\n', b'{"id": 5, "event_type": "x"}\n',
        b'{"event_type": "x"}\n', b"\xff\xfe not utf-8\n", b"\0\0\0\0\n",
        b'{"id":"a\0b","event_type":"x"}\n', b"[" * 100_000 + b"\n"]


@pytest.mark.parametrize("junk", JUNK, ids=range(len(JUNK)))
def test_a_line_that_is_not_an_event_is_skipped_counted_once_and_the_rest_arrive(
        tmp_path: Path, junk: bytes, caplog: pytest.LogCaptureFixture) -> None:
    log, outbox = EventLog(tmp_path, "node"), Outbox(tmp_path)
    record(log, 1)
    with (tmp_path / "events.jsonl").open("ab") as handle:
        handle.write(junk)
    record(log, 2)
    for _ in range(3):  # not acknowledged (the control plane is down): read again
        assert [e["n"] for e in outbox.pending().events] == [1, 2]
    assert outbox.skipped_lines == 1
    assert len(warnings_of(caplog, "not events skipped")) == 1  # once, not every cycle
    assert drain(outbox) == [1, 2]
    record(log, 3)
    assert drain(outbox) == [3]
    assert outbox.skipped_lines == 1


def test_a_10_mb_line_without_newline_at_the_end_of_a_rotated_file_is_skipped(
        tmp_path: Path) -> None:
    log, outbox = EventLog(tmp_path, "node"), Outbox(tmp_path)
    record(log, 1)
    with (tmp_path / "events.jsonl").open("ab") as handle:
        handle.write(b'{"id": "' + b"x" * 10 * 2**20)  # cut by a crash, then rotated
    (tmp_path / "events.jsonl").rename(tmp_path / ROTATED.format(0))
    record(log, 2, 3)
    assert drain(outbox, limit=1) == [1, 2, 3]
    assert outbox.skipped_lines == 1
    assert drain(outbox) == []


def test_delivery_moves_past_a_batch_of_only_junk_once(tmp_path: Path) -> None:
    (tmp_path / "events.jsonl").write_bytes(b"42\n" * 300)  # more than one batch
    with running() as plane:
        sender = delivery(plane.url, tmp_path)
        assert sender.flush() is True
        assert sender.flush() is True
        assert plane.events == []  # nothing to send, and no empty POST
        assert sender.outbox.skipped_lines == 300
        log = EventLog(tmp_path, "node")
        record(log, 1, 2)
        assert sender.flush() is True
        assert [e["n"] for e in plane.events] == [1, 2]
        assert sender.outbox.skipped_lines == 300  # the junk was not read again


# -- the cursor --------------------------------------------------------------------------

BAD_CURSORS = [
    {"offset": "12"}, {"offset": 1.5}, {"offset": -1}, {"offset": 10**30}, {"offset": True},
    {"offset": None}, {"file": "../x"}, {"file": 5}, {"file": "events.jsonl.bogus"},
    {"file": "/etc/passwd"}, {"last_id": 7}, {"device": None}, {"device": "1", "inode": 2},
    {"device": -1, "inode": 2},
]


@pytest.mark.parametrize("bad", [*BAD_CURSORS, b"42", b"[]", b"\xff\xfe", b'{"file":', b"{" * 5000],
                         ids=range(len(BAD_CURSORS) + 5))
def test_a_cursor_of_the_wrong_shape_is_reset_once_and_everything_is_sent_again(
        tmp_path: Path, bad: dict[str, object] | bytes, caplog: pytest.LogCaptureFixture
        ) -> None:
    log, outbox = EventLog(tmp_path, "node"), Outbox(tmp_path)
    record(log, 1, 2, 3)
    assert drain(outbox) == [1, 2, 3]
    cursor = tmp_path / "outbox.json"
    good = json.loads(cursor.read_text())
    planted = bad if isinstance(bad, bytes) else json.dumps({**good, **bad}).encode()
    cursor.write_bytes(planted)
    for _ in range(3):
        assert outbox.unsent_files() == {"events.jsonl"}
        assert outbox.unsent_bytes() == (tmp_path / "events.jsonl").stat().st_size
        # duplicates, no loss; then the one event saying the cursor was set aside
        assert tags(outbox.pending().events) == [1, 2, 3, SET_ASIDE]
    assert len(warnings_of(caplog, f"the outbox cursor {cursor} was damaged")) == 1
    aside, _ = set_aside(tmp_path)
    assert aside.read_bytes() == planted  # kept whole, for whoever looks into it
    assert drain(outbox) == [1, 2, 3, SET_ASIDE]
    assert drain(outbox) == []
    assert drain(Outbox(tmp_path)) == []  # written afresh: a restart resends none


def test_an_older_cursor_without_the_files_identity_still_works(tmp_path: Path) -> None:
    log, outbox = EventLog(tmp_path, "node", rotate_bytes=600), Outbox(tmp_path)
    record(log, 1, 2)
    batch = outbox.pending(limit=1)
    assert batch.cursor is not None
    (tmp_path / "outbox.json").write_text(json.dumps(
        {"file": batch.cursor.file, "offset": batch.cursor.offset,
         "last_id": batch.cursor.last_id}))  # as versions before the identity wrote it
    record(log, 3, 4, 5, 6)  # the live file rotates
    assert len(outbox.files()) > 1
    assert drain(outbox) == [2, 3, 4, 5, 6]


def test_a_symlink_planted_as_the_cursor_is_not_followed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log, outbox = EventLog(tmp_path, "node"), Outbox(tmp_path)
    record(log, 1, 2)
    assert drain(outbox) == [1, 2]
    target = tmp_path / "elsewhere"
    (tmp_path / "outbox.json").rename(target)  # a cursor that says "all sent"
    planted = target.read_text()
    (tmp_path / "outbox.json").symlink_to(target)
    assert tags(outbox.pending().events) == [1, 2, SET_ASIDE]  # not "all sent"
    assert warnings_of(caplog, "is a symlink")
    aside, _ = set_aside(tmp_path)
    assert aside.is_symlink() and aside.readlink() == target  # the link itself moved aside
    assert drain(outbox) == [1, 2, SET_ASIDE]
    assert target.read_text() == planted  # never written through
    assert not (tmp_path / "outbox.json").is_symlink()
    assert drain(Outbox(tmp_path)) == []


def test_a_cursor_that_cannot_be_written_is_kept_in_memory_and_nothing_is_sent_twice(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with tmpfs(tmp_path / "small", 64 * 1024) as state, running() as plane:
        log = EventLog(state, "node")
        record(log, 1, 2)
        filler = fill(state)  # a full disk: no new file can take a byte
        sender = delivery(plane.url, state)
        assert sender.flush() is True
        assert sender.flush() is True
        record(log, 3)  # appended within the log's last block: a full disk still takes it
        assert sender.flush() is True
        assert tags(plane.events) == [1, 2, 3]  # once each, in order
        assert len(warnings_of(caplog, f"cannot write {state / 'outbox.json'}")) == 1
        assert not (state / "outbox.json").exists()  # the cursor lives in memory only
        assert tags(Outbox(state).pending().events) == [1, 2, 3]  # a restart: no loss
        filler.unlink()  # space again
        record(log, 4)
        assert sender.flush() is True
        assert tags(plane.events) == [1, 2, 3, 4]
        assert Outbox(state).pending().events == ()  # written again: a restart resends none


# -- a drop, then a rotation -------------------------------------------------------------


def test_a_drop_then_a_rotation_of_the_live_file_loses_no_event(tmp_path: Path) -> None:
    log = EventLog(tmp_path, "node", rotate_bytes=600)
    outbox = Outbox(tmp_path, max_unsent_bytes=100)
    record(log, *range(1, 15))
    assert len(outbox.files()) > 2
    dropped = outbox.bound()
    assert outbox.files() == ["events.jsonl"]  # every rotated file went; the cursor: live@0
    kept = [e["n"] for e in log.read()]
    assert dropped + len(kept) == 14
    live_inode = (tmp_path / "events.jsonl").stat().st_ino
    record(log, *range(15, 21))  # the live file rotates
    rotated = [p.name for p in tmp_path.glob("events.jsonl.*") if p.stat().st_ino == live_inode]
    assert len(rotated) == 1  # what was the live file at the drop
    assert rotated[0] in outbox.unsent_files()  # optimize monitor keeps it
    assert drain(outbox, limit=4) == [*kept, *range(15, 21)]


def test_a_drop_cursor_of_an_older_version_still_finds_the_rotated_events(
        tmp_path: Path) -> None:
    log, outbox = EventLog(tmp_path, "node", rotate_bytes=600), Outbox(tmp_path)
    record(log, 1, 2)
    assert drain(outbox) == [1, 2]
    (tmp_path / "events.jsonl").rename(tmp_path / ROTATED.format(0))  # sent, then rotated
    (tmp_path / "outbox.json").write_text('{"file": "events.jsonl", "offset": 0, '
                                          '"last_id": ""}')  # an older bound() wrote it
    record(log, *range(3, 10))  # rotates again
    assert len(outbox.files()) > 2
    assert drain(outbox) == list(range(3, 10))


# -- a deleted file's inode, reused -------------------------------------------------------


def numbers_on_disk(state: Path) -> list[int]:
    return [json.loads(line)["n"] for name in Outbox(state).files()
            for line in (state / name).read_bytes().splitlines()]


@pytest.mark.parametrize("cursor_at", ["an acknowledged event", "the start after a drop"])
def test_a_cursor_whose_file_was_deleted_and_its_inode_reused_loses_no_event(
        tmp_path: Path, cursor_at: str) -> None:
    log, outbox = EventLog(tmp_path, "node", rotate_bytes=600), Outbox(tmp_path)
    record(log, *range(1, 8))
    if cursor_at == "an acknowledged event":
        assert drain(outbox, limit=1, rounds=1) == [1]  # then the control plane went down
    else:
        outbox.ack(outbox.pending().cursor or pytest.fail("no cursor"))
        first = outbox.files()[0]
        (tmp_path / "outbox.json").write_text(json.dumps(  # what bound() writes
            {"file": first, "offset": 0, "last_id": ""}))
    record(log, *range(100, 130))  # more rotations; longer lines (3 digits)
    files = outbox.files()
    assert len(files) >= 4
    cursor = json.loads((tmp_path / "outbox.json").read_text())
    (tmp_path / cursor["file"]).unlink()  # an operator frees space
    reused = tmp_path / files[2]  # a later file got the inode (ext4 reuses one at once)
    if cursor["offset"]:
        assert reused.read_bytes()[cursor["offset"] - 1:cursor["offset"]] != b"\n"  # mid-line
    st_ = reused.stat()
    (tmp_path / "outbox.json").write_text(json.dumps(
        {**cursor, "device": st_.st_dev, "inode": st_.st_ino}))
    kept = numbers_on_disk(tmp_path)
    sent = drain(Outbox(tmp_path))  # a restart
    assert set(kept) <= set(sent)  # duplicates at worst, never a loss
    assert sent == sorted(sent)
    assert drain(Outbox(tmp_path)) == []


def test_a_drop_on_a_full_disk_deletes_nothing_while_the_cursor_cannot_be_written(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with tmpfs(tmp_path / "small", 64 * 1024) as state:
        log = EventLog(state, "node", rotate_bytes=600)
        record(log, *range(1, 15))
        assert drain(Outbox(state), limit=2, rounds=1) == [1, 2]  # then the plane went down
        filler = fill(state)
        before = _contents(state)
        outbox = Outbox(state, max_unsent_bytes=100)
        assert outbox.bound() == 0
        assert _contents(state) == before  # every event file kept: outbox.json names them
        assert warnings_of(caplog, f"cannot write {state / 'outbox.json'}: No space left")
        filler.unlink()  # space again, and a restart
        assert drain(Outbox(state)) == list(range(3, 15))
        assert Outbox(state, max_unsent_bytes=100).bound() == 0  # all sent: nothing to drop


# -- a writer rotating the log while the outbox reads it ---------------------------------


class RotatedWhileListing(Outbox):
    """An outbox whose ``at``-th listing of the files is followed at once by a writer (a CLI
    command, the monitor timer) recording ``numbers``, which rotates the live file."""

    def __init__(self, state: Path, log: EventLog, numbers: range, *, at: int,
                 max_unsent_bytes: int = 2**20) -> None:
        super().__init__(state, max_unsent_bytes=max_unsent_bytes)
        self.log, self.numbers, self.at, self.listings = log, numbers, at, 0

    def files(self) -> list[str]:
        names = super().files()
        self.listings += 1
        if self.listings == self.at:
            before = len(super().files())
            record(self.log, *self.numbers)
            assert len(super().files()) > before  # it did rotate
        return names


def test_a_rotation_between_listing_and_reading_loses_no_event(tmp_path: Path) -> None:
    log = EventLog(tmp_path, "node", rotate_bytes=1000)
    record(log, *range(1, 10))
    assert drain(Outbox(tmp_path)) == list(range(1, 10))
    record(log, 10, 11)  # unsent, in the live file
    sent = drain(RotatedWhileListing(tmp_path, log, range(12, 25), at=1))
    sent += drain(Outbox(tmp_path))
    assert sent == list(range(10, 25))


def test_a_file_rotated_while_the_unsent_ones_are_listed_is_unsent(tmp_path: Path) -> None:
    log = EventLog(tmp_path, "node", rotate_bytes=1000)
    record(log, *range(1, 10))
    assert drain(Outbox(tmp_path)) == list(range(1, 10))
    record(log, 10, 11)
    live_inode = (tmp_path / "events.jsonl").stat().st_ino
    unsent = RotatedWhileListing(tmp_path, log, range(12, 25), at=1).unsent_files()
    rotated = [p.name for p in tmp_path.glob("events.jsonl.*") if p.stat().st_ino == live_inode]
    assert rotated and rotated[0] in unsent  # optimize monitor must keep it
    assert drain(Outbox(tmp_path)) == list(range(10, 25))


def test_a_rotation_during_a_drop_loses_no_event_it_did_not_count(tmp_path: Path) -> None:
    log = EventLog(tmp_path, "node", rotate_bytes=600)
    record(log, *range(1, 6))
    assert len(Outbox(tmp_path).files()) == 2  # the next after the oldest is the live file
    outbox = RotatedWhileListing(tmp_path, log, range(6, 21), at=2, max_unsent_bytes=100)
    dropped = outbox.bound()  # its 2nd listing: which file comes after the one it drops
    sent = drain(Outbox(tmp_path))
    assert sent == list(range(21 - len(sent), 21))  # the newest, in order
    assert dropped + len(sent) == 20  # each event sent or counted as dropped


# -- the heartbeat sequence file ---------------------------------------------------------

BROKEN_SEQUENCES = [b'{"sequ', b"\xff\0", b"42", b"[]", b'{"sequence": 1e400}',
                    b'{"sequence": "7"}', b'{"sequence": -5}', b'{"sequence": true}',
                    "symlink", "directory"]


@pytest.mark.parametrize("broken", BROKEN_SEQUENCES, ids=range(len(BROKEN_SEQUENCES)))
def test_a_broken_heartbeat_sequence_file_never_stops_heartbeats(
        tmp_path: Path, broken: bytes | str, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "heartbeat.json"
    target = tmp_path / "elsewhere"
    target.write_text('{"sequence": 41}\n')
    if broken == "symlink":
        path.symlink_to(target)
    elif broken == "directory":
        path.mkdir()
    else:
        assert isinstance(broken, bytes)
        path.write_bytes(broken)
    sender = delivery("http://127.0.0.1:9", tmp_path)
    assert sender.next_sequence() == 1  # never from the symlink's target
    told = warnings_of(caplog, str(path))
    assert told  # said what is wrong with the file
    assert [sender.next_sequence() for _ in range(3)] == [2, 3, 4]
    assert warnings_of(caplog, str(path)) == told  # once, not every heartbeat
    assert target.read_text() == '{"sequence": 41}\n'


# -- any files, any cursor: a property ---------------------------------------------------

_JUNK_LINE = st.sampled_from([b"42", b"[]", b"null", b'{"id": 5, "event_type": "t"}',
                              b'{"id": "x"}', b"\xff\xfe", b"\0\0", b'{"id":"a']) | \
    st.binary(max_size=30).filter(lambda b: b"\n" not in b)
_LINE = st.one_of(st.just(None), _JUNK_LINE)  # None: a valid event
_FILE = st.tuples(st.lists(_LINE, max_size=8), st.none() | _JUNK_LINE | st.just(b"EVENT"))
_BAD_CURSOR = st.binary(max_size=40) | st.sampled_from(
    [json.dumps({"file": "events.jsonl", "offset": x, "last_id": "e0"}).encode()
     for x in ("1", 1.5, -1, 10**30, None)])
_CURSOR = st.one_of(st.none(), st.tuples(st.just("bad"), _BAD_CURSOR),
                    st.tuples(st.integers(0, 40), st.booleans()))


def _write(state: Path, files: list[tuple[list[bytes | None], bytes | None]]
           ) -> list[tuple[str, int, str]]:
    """The files on disk; each valid event as (file, offset past it, id), in order."""
    events: list[tuple[str, int, str]] = []
    names = [ROTATED.format(i) for i in range(len(files) - 1)] + ["events.jsonl"]
    for name, (lines, tail) in zip(names, files, strict=True):
        data = b""
        for line in lines:
            if line is None:
                event_id = f"e{len(events)}"
                data += json.dumps({"id": event_id, "event_type": "t"}).encode() + b"\n"
                events.append((name, len(data), event_id))
            else:
                data += line + b"\n"
        if tail is not None:  # an unfinished last line: never an event
            data += b'{"id": "tail", "event_type": "t"}' if tail == b"EVENT" else tail
        (state / name).write_bytes(data)
    return events


def _contents(state: Path) -> dict[str, bytes]:
    """Every file but the cursor and any copy of it set aside."""
    return {p.name: p.read_bytes() for p in state.iterdir()
            if not p.name.startswith("outbox.json")}


def _set_aside_in(state: Path, planted: bytes, before: dict[str, bytes]
                  ) -> list[tuple[str, int, str]]:
    """After a bad cursor was read: it is kept aside whole, and the one thing written is a
    line in the live log saying so (after a fresh newline when a crash cut the last line).
    ``before`` is brought up to date; what the live log now holds that is to be sent."""
    aside, event = set_aside(state)
    assert aside.read_bytes() == planted
    live, now = before["events.jsonl"], (state / "events.jsonl").read_bytes()
    cut = live[-1:] not in (b"", b"\n")
    assert now.startswith(live + b"\n" * cut)
    added = now[len(live) + cut:]
    assert added.endswith(b"\n") and added.count(b"\n") == 1
    assert parse_event(added) == event
    before["events.jsonl"] = now
    completed = parse_event(live.rsplit(b"\n", 1)[-1]) if cut else None
    return [*([("events.jsonl", len(live) + 1, str(completed["id"]))] if completed else []),
            ("events.jsonl", len(now), str(event["id"]))]


@settings(max_examples=200, deadline=None)
@given(files=st.lists(_FILE, min_size=1, max_size=4), cursor=_CURSOR,
       limit=st.integers(1, 5), max_unsent=st.none() | st.integers(0, 600))
def test_the_outbox_sends_every_event_once_in_order_whatever_its_files_hold(
        files: list[tuple[list[bytes | None], bytes | None]],
        cursor: tuple[str, bytes] | tuple[int, bool] | None, limit: int,
        max_unsent: int | None) -> None:
    with tempfile.TemporaryDirectory(dir=FAST_DIR) as tmp:
        state = Path(tmp)
        events = _write(state, files)
        expected = events
        if cursor is not None and cursor[0] == "bad":
            (state / "outbox.json").write_bytes(cursor[1])
        elif cursor is not None and events:
            at, with_identity = cursor
            name, offset, last_id = events[int(at) % len(events)]
            data: dict[str, object] = {"file": name, "offset": offset, "last_id": last_id}
            if with_identity:
                st_ = (state / name).stat()
                data |= {"device": st_.st_dev, "inode": st_.st_ino}
            (state / "outbox.json").write_text(json.dumps(data))
            expected = events[int(at) % len(events) + 1:]
        outbox = Outbox(state, max_unsent_bytes=max_unsent or 0)
        before = _contents(state)
        try:
            assert outbox.unsent_bytes() >= 0
            assert {name for name, _, _ in expected} <= outbox.unsent_files()
            if max_unsent is not None:
                outbox.bound()
        except ClusterctlError:
            pass
        if cursor is not None and cursor[0] == "bad":  # read first thing: set aside by now
            expected = [*expected, *_set_aside_in(state, cursor[1], before)]
        after = _contents(state)
        if max_unsent is None:
            assert after == before  # nothing deleted, nothing changed, except by bound()
        gone = set(before) - set(after)
        assert all(before[name] == after[name] for name in after)
        assert "events.jsonl" in after  # the live file is never dropped
        sent: list[str] = []
        for _ in range(len(events) + sum(len(lines) + 1 for lines, _ in files) + 4):
            batch = outbox.pending(limit=limit)
            if batch.cursor is None:
                break
            sent += [e["id"] for e in batch.events]
            outbox.ack(batch.cursor)
        assert outbox.pending().cursor is None  # all read: nothing loops
        assert sent == [event_id for name, _, event_id in expected if name not in gone]
        assert _contents(state) == after
