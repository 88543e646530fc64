from __future__ import annotations

import json
import multiprocessing
import re
from pathlib import Path

from clusterctl.events.log import EventLog

NOW = 1_765_967_700.0  # 2025-12-17T10:35:00Z


def test_an_event_has_id_type_timestamp_instance_reason_and_details(tmp_path: Path) -> None:
    log = EventLog(tmp_path, "gpu-node-07")
    event = log.record("swap_expanded", "memory 82% in use", {"size_bytes": 1024}, now=NOW)
    assert re.fullmatch(r"[0-9a-f-]{36}", event["id"])
    assert event == {"id": event["id"], "event_type": "swap_expanded",
                     "timestamp": "2025-12-17T10:35:00Z", "instance_id": "gpu-node-07",
                     "reason": "memory 82% in use", "size_bytes": 1024}
    assert log.read() == [event]
    assert (tmp_path / "events.jsonl").stat().st_mode & 0o777 == 0o600


def test_events_keep_their_order_and_ids_are_unique(tmp_path: Path) -> None:
    log = EventLog(tmp_path, "n")
    for i in range(5):
        log.record("swap_shrunk", f"step {i}", {}, now=NOW + i)
    events = log.read()
    assert [e["reason"] for e in events] == [f"step {i}" for i in range(5)]
    assert len({e["id"] for e in events}) == 5
    assert [e["reason"] for e in log.read(limit=2)] == ["step 3", "step 4"]


def _append_many(state_dir: str, writer: int) -> None:
    log = EventLog(Path(state_dir), f"writer-{writer}")
    for i in range(200):
        log.record("tick", "x" * 300, {"n": i}, now=NOW)


def test_writers_in_several_processes_never_interleave_lines(tmp_path: Path) -> None:
    procs = [multiprocessing.Process(target=_append_many, args=(str(tmp_path), w))
             for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    events = EventLog(tmp_path, "reader").read()
    assert len(events) == 800  # every line parsed: nothing torn
    for writer in range(4):
        mine = [e["n"] for e in events if e["instance_id"] == f"writer-{writer}"]
        assert mine == list(range(200))


def test_a_line_cut_by_a_crash_does_not_hide_the_others(tmp_path: Path) -> None:
    log = EventLog(tmp_path, "n")
    log.record("a", "first", {}, now=NOW)
    with (tmp_path / "events.jsonl").open("a") as handle:
        handle.write('{"id": "cut')
    log.record("b", "after", {}, now=NOW)
    assert [e["event_type"] for e in log.read()] == ["a", "b"]


def test_a_full_log_is_rotated_and_the_next_event_starts_a_new_one(tmp_path: Path) -> None:
    log = EventLog(tmp_path, "node-1", rotate_bytes=400)
    for i in range(3):
        log.record("swap_expanded", f"event {i}", {"n": i}, now=1_700_000_000 + i)
    rotated = sorted(p.name for p in tmp_path.glob("events.jsonl.*"))
    assert rotated == ["events.jsonl.20231114T221322.000000Z"]  # the third passed 400 bytes
    old = [json.loads(x)["n"] for x in (tmp_path / rotated[0]).read_text().splitlines()]
    assert old == [0, 1, 2]
    assert log.read() == []
    log.record("swap_shrunk", "after", {"n": 3}, now=1_700_000_010)
    assert [e["n"] for e in log.read()] == [3]
