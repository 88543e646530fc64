"""The outbox over the real event log: order, acknowledgement, rotation, crashes, bounds."""

from __future__ import annotations

from pathlib import Path

from clusterctl.events.log import EventLog
from clusterctl.events.outbox import Outbox


def record(log: EventLog, *numbers: int) -> None:
    for n in numbers:
        log.record("swap_expanded", f"event {n}", {"n": n}, now=1_700_000_000 + n)


def sent(outbox: Outbox, limit: int = 200) -> list[int | str]:
    """Take one batch, acknowledge it, return its numbers (the type of an event this test
    did not record)."""
    batch = outbox.pending(limit=limit)
    if batch.cursor:
        outbox.ack(batch.cursor)
    return [e["n"] if "n" in e else e["event_type"] for e in batch.events]


def test_events_go_in_order_once_each(tmp_path: Path) -> None:
    log, outbox = EventLog(tmp_path, "node"), Outbox(tmp_path)
    assert outbox.pending().events == ()
    record(log, 1, 2, 3)
    assert sent(outbox, limit=2) == [1, 2]
    assert sent(outbox) == [3]
    assert sent(outbox) == []
    record(log, 4)
    unacked = outbox.pending()
    assert [e["n"] for e in unacked.events] == [4]
    assert [e["n"] for e in outbox.pending().events] == [4]  # not acknowledged: sent again
    assert len({e["id"] for e in unacked.events}) == 1


def test_rotation_between_batches_loses_and_repeats_nothing(tmp_path: Path) -> None:
    log, outbox = EventLog(tmp_path, "node", rotate_bytes=600), Outbox(tmp_path)
    record(log, 1, 2)
    assert sent(outbox) == [1, 2]
    record(log, 3, 4, 5, 6, 7, 8)  # rotates at least once
    assert len(list(tmp_path.glob("events.jsonl.*"))) >= 1
    assert sent(outbox, limit=3) == [3, 4, 5]
    record(log, 9)
    assert sent(outbox) == [6, 7, 8, 9]


def test_a_line_cut_by_a_crash_is_skipped_and_the_rest_arrive(tmp_path: Path) -> None:
    log, outbox = EventLog(tmp_path, "node"), Outbox(tmp_path)
    record(log, 1)
    with (tmp_path / "events.jsonl").open("ab") as handle:
        handle.write(b'{"id":"half-writ')  # the power went out mid-write
    record(log, 2)  # the log starts a fresh line
    assert sent(outbox) == [1, 2]


def test_a_lost_cursor_resends_from_the_oldest_kept(tmp_path: Path) -> None:
    log, outbox = EventLog(tmp_path, "node"), Outbox(tmp_path)
    record(log, 1, 2)
    assert sent(outbox) == [1, 2]
    (tmp_path / "outbox.json").write_text("{garbage")
    # duplicates by id, never a loss; and an event that the cursor was set aside
    assert sent(outbox) == [1, 2, "state_file_set_aside"]
    (aside,) = tmp_path.glob("outbox.json.corrupt-*")
    assert aside.read_text() == "{garbage"
    (event,) = [e for e in log.read() if e["event_type"] == "state_file_set_aside"]
    assert (event["file"], event["kept_as"]) == (str(tmp_path / "outbox.json"), str(aside))
    assert sent(outbox) == []


def test_too_much_unsent_drops_the_oldest_files_and_counts_them(tmp_path: Path) -> None:
    log = EventLog(tmp_path, "node", rotate_bytes=600)
    outbox = Outbox(tmp_path, max_unsent_bytes=1000)
    record(log, *range(1, 15))
    before = outbox.unsent_bytes()
    assert before > 1000
    dropped = outbox.bound()
    assert dropped > 0
    assert outbox.unsent_bytes() <= 1000 or len(outbox.files()) == 1
    numbers = sent(outbox)
    assert numbers == list(range(15 - len(numbers), 15))  # the newest, still in order
    assert dropped + len(numbers) == 14
