"""The event log and the locks against a full disk, racing rotations and planted files:
an event is written whole or not at all, once, and never through a symlink."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from clusterctl.errors import HostError
from clusterctl.events.log import EventLog
from clusterctl.locks import exclusive
from tests.faults import fill, tmpfs

NOW = 1_765_967_700.0


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


# -- a full disk -------------------------------------------------------------------------


def test_a_full_disk_gives_a_clear_error_and_leaves_only_whole_events(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", 64 * 1024) as state:
        log = EventLog(state, "node-1")
        before = [log.record("swap_expanded", f"event {n}", {"n": n}, now=NOW)["id"]
                  for n in range(3)]
        filler = fill(state)
        os.truncate(filler, max(0, filler.stat().st_size - 8192))  # room for a part only
        size = (state / "events.jsonl").stat().st_size
        with pytest.raises(HostError) as info:
            log.record("swap_expanded", "too big to fit", {"blob": "x" * 48 * 1024}, now=NOW)
        assert info.value.one_line() == (
            f"disk full: cannot record event swap_expanded in {state / 'events.jsonl'}; "
            f"free space on the filesystem of {state}")
        data = (state / "events.jsonl").read_bytes()
        assert len(data) == size and data.endswith(b"\n")  # cut back: no half event
        assert [e["id"] for e in lines_of(state / "events.jsonl")] == before
        filler.unlink()
        log.record("swap_shrunk", "room again", {}, now=NOW)
        assert [e["reason"] for e in log.read()] == [
            "event 0", "event 1", "event 2", "room again"]


# -- a writer that waited while another rotated ------------------------------------------


def test_writers_racing_rotations_record_each_event_exactly_once(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def writer(who: int) -> None:
        log = EventLog(tmp_path, f"writer-{who}", rotate_bytes=600)
        try:
            for n in range(150):
                log.record("tick", "racing", {"n": n}, now=NOW)
        except BaseException as err:  # the test reports any of them
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    files = sorted(tmp_path.glob("events.jsonl*"))
    assert len(files) > 100  # rotated many times
    events = [e for path in files for e in lines_of(path)]
    for who in range(4):
        assert sorted(e["n"] for e in events if e["instance_id"] == f"writer-{who}") == \
            list(range(150))  # each exactly once: none lost, none written twice
    assert len({e["id"] for e in events}) == len(events) == 600


# -- planted files -----------------------------------------------------------------------


def test_a_symlink_planted_as_the_event_log_is_refused_and_its_target_kept(
        tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("root's data\n")
    state = tmp_path / "state"
    state.mkdir()
    (state / "events.jsonl").symlink_to(target)
    log = EventLog(state, "node-1")
    with pytest.raises(HostError) as info:
        log.record("swap_expanded", "x", {}, now=NOW)
    assert info.value.one_line() == (
        f"the event log {state / 'events.jsonl'} is a symlink; clusterctl never writes "
        f"through one; remove {state / 'events.jsonl'}")
    with pytest.raises(HostError):
        log.read()
    assert target.read_text() == "root's data\n"


def test_an_event_log_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "events.jsonl")  # would hang a reader without O_NONBLOCK
    log = EventLog(tmp_path, "node-1")
    path = tmp_path / "events.jsonl"
    with pytest.raises(HostError) as info:
        log.record("swap_expanded", "x", {}, now=NOW)
    assert info.value.one_line() == f"the event log {path} is not a regular file; remove {path}"
    with pytest.raises(HostError):
        log.read()


def test_a_symlink_planted_as_a_lock_is_refused_and_its_target_kept(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("root's data\n")
    lock = tmp_path / "swap.lock"
    lock.symlink_to(target)
    with pytest.raises(HostError) as info, exclusive(lock, what="swap command"):
        pass
    assert info.value.one_line() == (f"the lock {lock} is a symlink; clusterctl never writes "
                                     f"through one; remove {lock}")
    assert target.read_text() == "root's data\n"


def test_a_lock_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    lock = tmp_path / "swap.lock"
    os.mkfifo(lock)
    with pytest.raises(HostError) as info, exclusive(lock, what="swap command"):
        pass
    assert info.value.one_line() == f"the lock {lock} is not a regular file; remove {lock}"


# -- junk in the log ---------------------------------------------------------------------


def test_reading_skips_lines_that_are_not_events(tmp_path: Path) -> None:
    log = EventLog(tmp_path, "node-1")
    log.record("a", "first", {}, now=NOW)
    with (tmp_path / "events.jsonl").open("ab") as handle:
        handle.write(b'42\n[1]\n{"id": 5, "event_type": "x"}\n\xff\xfe not utf-8\n\0\0\0\n')
    log.record("b", "after", {}, now=NOW)
    assert [e["event_type"] for e in log.read()] == ["a", "b"]
