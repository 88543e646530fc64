"""optimize monitor: the emergency rules (pure), and their actions on real files."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from clusterctl.agent.control import ControlClient
from clusterctl.agent.heartbeat import Delivery
from clusterctl.config import Config, HeartbeatConfig, OllamaConfig, OptimizeConfig, PathsConfig
from clusterctl.events.log import EventLog
from clusterctl.events.outbox import Outbox
from clusterctl.optimize.monitor import (
    MonitorAction,
    MonitorState,
    Sample,
    execute,
    plan_monitor,
    run_once,
)
from tests.fakes.control_plane import running

CONFIG = Config(optimize=OptimizeConfig(cpu_sustain_s=60, calm_s=300))
QUIET = Sample(cpu_percent=20, memory_percent=40, disk_percent=50, dask_workers=6)


def step(sample: Sample, state: MonitorState, now: float
         ) -> tuple[list[tuple[str, int | None]], MonitorState]:
    actions, state = plan_monitor(sample, state, CONFIG, now)
    return [(a.kind, a.workers) for a in actions], state


def test_sustained_cpu_halves_the_workers_and_calm_brings_them_back() -> None:
    hot = replace(QUIET, cpu_percent=97)
    state = MonitorState()
    assert step(hot, state, 0)[0] == []  # not sustained yet
    _, state = step(hot, state, 0)
    assert step(hot, state, 59)[0] == []
    actions, state = step(hot, state, 60)
    assert actions == [("reduce_dask", 3)]
    assert state.dask_planned_workers == 6
    reduced = replace(hot, dask_workers=3)
    assert step(reduced, state, 100)[0] == []  # the next halving waits a full window
    actions, state = step(reduced, state, 120)
    assert actions == [("reduce_dask", 1)]
    assert state.dask_planned_workers == 6  # the plan's count, not the last one
    one = replace(QUIET, cpu_percent=75, dask_workers=1)  # between: neither hot nor calm
    _, state = step(one, state, 200)
    calm = replace(QUIET, cpu_percent=30, dask_workers=1)
    _, state = step(calm, state, 300)
    assert step(calm, state, 599)[0] == []
    actions, state = step(calm, state, 600)
    assert actions == [("restore_dask", 6)]
    assert state.dask_planned_workers is None


def test_a_cpu_blip_or_a_single_worker_does_nothing() -> None:
    state = MonitorState()
    _, state = step(replace(QUIET, cpu_percent=99), state, 0)
    _, state = step(replace(QUIET, cpu_percent=50), state, 30)  # the blip ended
    assert step(replace(QUIET, cpu_percent=99), state, 70)[0] == []
    single = replace(QUIET, cpu_percent=99, dask_workers=1)
    state = MonitorState(cpu_high_since=0)
    assert step(single, state, 1000)[0] == []
    no_dask = replace(QUIET, cpu_percent=99, dask_workers=None)
    assert step(no_dask, state, 1000)[0] == []


def test_memory_and_disk_act_at_their_thresholds_with_a_cooldown() -> None:
    full = replace(QUIET, memory_percent=85, disk_percent=90)
    actions, state = step(full, MonitorState(), 0)
    assert actions == [("relieve_memory", None), ("clean_disk", None)]
    assert step(full, state, 30)[0] == []
    assert step(full, state, 60)[0] == [("relieve_memory", None)]
    assert step(full, state, 300)[0] == [("relieve_memory", None), ("clean_disk", None)]
    assert step(replace(QUIET, memory_percent=84.9), MonitorState(), 0)[0] == []


def test_reducing_workers_rewrites_only_that_line_and_says_who_restarts(tmp_path: Path
                                                                       ) -> None:
    env = tmp_path / "etc/clusterctl/dask-worker.env"
    env.parent.mkdir(parents=True)
    env.write_text("# Written by clusterctl\nDASK_SCHEDULER_ADDRESS=tcp://10.0.0.1:8786\n"
                   "DASK_NWORKERS=6\nDASK_NTHREADS=2\n")
    config = Config(paths=PathsConfig(state_dir=Path("/state")))
    (done,) = execute((MonitorAction("reduce_dask", "CPU 97% for 60 s", 3),), config,
                      root=tmp_path, now=lambda: 1_700_000_000.0)
    assert env.read_text() == ("# Written by clusterctl\nDASK_SCHEDULER_ADDRESS="
                               "tcp://10.0.0.1:8786\nDASK_NWORKERS=3\nDASK_NTHREADS=2\n")
    assert done.notes == ("systemd is not running here: restart clusterctl-dask-worker.service"
                          " yourself to use the new settings",)
    event = json.loads((tmp_path / "state/events.jsonl").read_text())
    assert (event["event_type"], event["reason"]) == ("dask_workers_reduced", "CPU 97% for 60 s")


def test_cleaning_the_disk_keeps_rotated_logs_of_unsent_events_and_they_arrive_later(
        tmp_path: Path) -> None:
    root = tmp_path / "root"  # a fake root: the cleanup never sees this machine's "/"
    state = root / "state"
    log = EventLog(state, "node-1", rotate_bytes=600)  # about four events a file
    with running() as plane:
        config = Config(heartbeat=HeartbeatConfig(control_url=plane.url,
                                                  token_file=tmp_path / "none"),
                        ollama=OllamaConfig(url="http://127.0.0.1:9"),
                        paths=PathsConfig(state_dir=Path("/state"), run_dir=Path("/run")))
        sender = Delivery(ControlClient(config.heartbeat), Outbox(state), state)
        for n in range(1, 13):
            log.record("swap_expanded", f"event {n}", {"n": n}, now=time.time())
        assert sender.flush() is True  # acknowledged: 1-12
        sent_files = sorted(state.glob("events.jsonl.*"))
        for n in range(13, 18):  # unsent when the disk fills up
            log.record("swap_expanded", f"event {n}", {"n": n}, now=time.time())
        unsent_files = sorted(set(state.glob("events.jsonl.*")) - set(sent_files))
        assert len(sent_files) >= 3 and unsent_files
        for path in state.glob("events.jsonl.*"):
            os.utime(path, (0, 0))  # every rotated log is past retention
        (done,) = execute((MonitorAction("clean_disk", "disk 95% full"),), config, root=root)
        # acknowledged: removed (the last may stay: the acknowledged position is in it)
        assert done.did and not any(path.exists() for path in sent_files[:-1])
        assert all(path.exists() for path in unsent_files)  # unsent: kept
        assert sender.flush() is True
    assert [e.get("n") for e in plane.events] == [*range(1, 18), None]
    assert plane.events[-1]["event_type"] == "disk_cleaned"
    assert len({e["id"] for e in plane.events}) == 18


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs: a disk that fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.integration
def test_a_full_disk_removes_old_rotated_logs_and_listed_caches_only(small_disk: Path) -> None:
    state, cache, mine = small_disk / "state", small_disk / "pip-cache", small_disk / "data"
    for d in (state, cache / "wheels", mine):
        d.mkdir(parents=True)
    old, recent = state / "events.jsonl.20240101T000000Z", state / "events.jsonl.20991231T0Z"
    for path in (old, recent, state / "events.jsonl"):
        path.write_bytes(b"{}\n" * 200_000)  # 600 KB each
    os.utime(old, (0, 0))
    (cache / "wheels" / "x.whl").write_bytes(b"w" * 3_000_000)
    (cache / "index").write_bytes(b"i" * 1_000_000)
    (mine / "user-data").write_bytes(b"u" * 9_500_000)  # not clusterctl's, not listed
    config = Config(optimize=OptimizeConfig(cleanup_paths=(cache,)),
                    ollama=OllamaConfig(url="http://127.0.0.1:9"),
                    paths=PathsConfig(state_dir=state, run_dir=small_disk / "run"))
    sample, actions, done = run_once(config, cpu_window_s=0.05)
    assert sample.disk_percent is not None and sample.disk_percent >= 90
    assert [a.kind for a in actions] == ["clean_disk"]
    assert not old.exists()
    assert recent.exists() and (state / "events.jsonl").exists()
    assert list(cache.iterdir()) == [] and cache.is_dir()
    assert (mine / "user-data").stat().st_size == 9_500_000
    assert done[0].did[0].startswith(f"removed {old} (")
    assert done[0].did[1] == f"emptied {cache} (3.8M; listed in cleanup_paths)"
    again, actions, _ = run_once(config, cpu_window_s=0.05)
    assert again.disk_percent is not None and again.disk_percent < 90
    assert actions == ()
    event = json.loads((state / "events.jsonl").read_text().splitlines()[-1])
    assert event["event_type"] == "disk_cleaned"


@pytest.mark.integration
def test_relieving_memory_grows_swap_with_the_swap_policy_and_frees_memory(tmp_path: Path
                                                                          ) -> None:
    from clusterctl.config import SwapConfig
    from tests.loopfs import active_swaps_under, loop_mount

    with loop_mount(tmp_path, "ext4", size_mib=1024) as mount:
        config = Config(
            swap=SwapConfig(dir=mount / "swap", min_size_bytes=64 * 2**20,
                            max_size_bytes=256 * 2**20, increment_bytes=64 * 2**20),
            ollama=OllamaConfig(url="http://127.0.0.1:9"),
            paths=PathsConfig(state_dir=tmp_path / "state", run_dir=tmp_path / "run"))
        (done,) = execute((MonitorAction("relieve_memory", "memory 91% in use"),), config)
        assert done.did[0] == "swap grown: swap-0001 (64M)"
        assert done.did[1].startswith("freed memory: ")
        assert "dropped the page cache" in done.did[1]
        assert active_swaps_under(mount / "swap") == [str(mount / "swap/swap-0001")]
        events = [json.loads(x)["event_type"] for x in
                  (tmp_path / "state/events.jsonl").read_text().splitlines()]
        assert events == ["swap_expanded", "memory_freed", "memory_relieved"]
