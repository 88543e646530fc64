"""Every JSON state file, one policy for a damaged copy.

The table below lists each state file clusterctl keeps, how its owner reads it, and what
a damaged copy costs: START_OVER / REDERIVE keep it aside as ``NAME.corrupt-<time>``,
record a ``state_file_set_aside`` event and go on from empty; REFUSE (the saved
originals) changes nothing on disk and says which file and what to do. Every write is
mode 0600 (the GPU history 0644: the CLI shows it) with a schema version.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from clusterctl import config as cfg
from clusterctl.agent.control import ControlClient
from clusterctl.agent.heartbeat import Delivery
from clusterctl.errors import ClusterctlError
from clusterctl.events.outbox import Cursor, Outbox
from clusterctl.gpu import monitor as gpu_monitor
from clusterctl.gpu import placement, power
from clusterctl.gpu.throttle import Throttled
from clusterctl.hibernate import controller, schedule
from clusterctl.hibernate.idle import IdleState
from clusterctl.optimize import monitor as optimize_monitor
from clusterctl.optimize import state as optimize_state
from clusterctl.swap import ledger
from clusterctl.system import statefile

NOW = 1_800_000_000.0


@dataclass(frozen=True)
class Owner:
    name: str
    where: str  # "state" or "run"
    load: Callable[[Path, Path], object]  # (state_dir, run_dir) -> what the owner sees
    fresh: object  # what it sees with no file
    policy: statefile.Policy
    valid: dict[str, Any]  # as an older clusterctl wrote it: no version field
    save: Callable[[Path, Path], None]


def _sequence(state: Path, run: Path) -> int:
    client = ControlClient(cfg.HeartbeatConfig(control_url="http://127.0.0.1:9",
                                               token_file=state / "none"))
    return Delivery(client, Outbox(state), state).next_sequence()


def _history(state: Path, run: Path) -> object:
    return {k: h.points() for k, h in
            gpu_monitor.load_history(run, 60, record=statefile.events_to(state)).items()}


def _save_history(state: Path, run: Path) -> None:
    statefile.write(gpu_monitor.HISTORY_SPEC, run,  # what the monitor's _save_history writes
                    {"GPU-0": [[NOW, 40, 1.0, 5.0]]})


THROTTLED = Throttled("GPU-0", 700.0, 600.0, NOW)
OWNERS = [
    Owner("swap.json", "state", lambda s, r: ledger.load(s), ledger.Ledger(),
          statefile.Policy.REDERIVE,
          {"files": [{"name": "swap-0001", "size_bytes": 2**30, "created_at": NOW,
                      "method": "fallocate"}], "low_since": None, "blocked": None},
          lambda s, r: ledger.save(s, ledger.Ledger(low_since=NOW))),
    # the saved originals: one file, one section per owner, each refused when damaged
    Owner("originals.json", "state", lambda s, r: optimize_state.load(s),
          optimize_state.OptimizeState(), statefile.Policy.REFUSE,
          {"optimize": {"originals": {"sysctl": {"vm.swappiness": "60"}, "files": {},
                                      "dirs": []},
                        "applied": {"sysctl": {"vm.swappiness": "10"}, "files": {}}}},
          lambda s, r: optimize_state.save(s, optimize_state.OptimizeState(
              original_sysctl={"vm.swappiness": "60"}))),
    Owner("originals.json", "state", lambda s, r: power.load(s), {}, statefile.Policy.REFUSE,
          {"gpu-power": {"gpus": {"GPU-0": {"uuid": "GPU-0", "original_limit_w": 700.0,
                                            "limit_w": 600.0, "changed_at": NOW,
                                            "cool_since": None}}}},
          lambda s, r: power.save(s, {"GPU-0": THROTTLED})),
    Owner("gpu-allocations.json", "state", lambda s, r: placement.load(s), [],
          statefile.Policy.START_OVER,
          {"allocations": [{"name": "llm", "gpu_uuid": "GPU-1", "gpu_index": 1,
                            "vram_mib": 1024, "placed_at": NOW, "used_mib_at_place": 0}]},
          lambda s, r: placement.save(s, [placement.Allocation("llm", "GPU-1", 1, 1024, NOW,
                                                               0)])),
    Owner("hibernate.json", "state", lambda s, r: controller.load_state(s), IdleState(),
          statefile.Policy.START_OVER,
          {"status": "idle", "idle_since": NOW, "last_activity": NOW, "last_utilization": 0.0},
          lambda s, r: controller.save_state(s, IdleState("idle", NOW, NOW, 0.0))),
    Owner("hibernate-inhibit.json", "state",
          lambda s, r: controller.inhibited_by(s, NOW, logind=False), None,
          statefile.Policy.START_OVER, {"until": NOW + 3600, "why": "maintenance", "by": "ops"},
          lambda s, r: controller.inhibit(s, NOW + 3600, "maintenance", "ops")),
    Owner("hibernate-schedule.json", "state", lambda s, r: schedule.load(s), None,
          statefile.Policy.START_OVER, {"wake": "09:00", "sleep": "18:00", "tz": "UTC"},
          lambda s, r: schedule.save(s, schedule.Schedule("09:00", "18:00", "UTC"))),
    Owner("heartbeat.json", "state", _sequence, 1, statefile.Policy.START_OVER,
          {"sequence": 41}, lambda s, r: None),  # written by next_sequence() itself
    Owner("outbox.json", "state", lambda s, r: Outbox(s).cursor(), None,
          statefile.Policy.START_OVER, {"file": "events.jsonl", "offset": 0, "last_id": ""},
          lambda s, r: Outbox(s).ack(Cursor("events.jsonl", 0, ""))),
    Owner("monitor.json", "state", lambda s, r: optimize_monitor.load_state(s),
          optimize_monitor.MonitorState(), statefile.Policy.START_OVER,
          {"cpu_high_since": NOW},
          lambda s, r: optimize_monitor.save_state(s, optimize_monitor.MonitorState(NOW))),
    Owner("gpu-history.json", "run", _history, {}, statefile.Policy.START_OVER,
          {"GPU-0": [[NOW, 40, 1.0, 5.0]]}, _save_history),
]
IDS = [o.name for o in OWNERS]


def _plant(path: Path, damage: str, victim: Path, valid: dict[str, Any]) -> None:
    if damage == "truncated":
        text = json.dumps(valid)
        path.write_text(text[: len(text) // 2])
    elif damage == "list":
        path.write_text(json.dumps([valid]))
    elif damage == "symlink":  # to a file like /etc/passwd (a copy under tmp_path)
        path.symlink_to(victim)
    elif damage == "fifo":
        os.mkfifo(path)
    elif damage == "future":
        path.write_text(json.dumps({"version": 99, **valid}))
    else:
        raise AssertionError(damage)


def _tree(root: Path) -> dict[str, tuple[str, bytes | str]]:
    """Every entry under ``root``: its kind and what it holds (a link: where it points)."""
    out: dict[str, tuple[str, bytes | str]] = {}
    for path in sorted(root.rglob("*")):
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            out[str(path.relative_to(root))] = ("link", str(path.readlink()))
        elif stat.S_ISFIFO(mode):
            out[str(path.relative_to(root))] = ("fifo", b"")
        elif stat.S_ISREG(mode):
            out[str(path.relative_to(root))] = ("file", path.read_bytes())
    return out


def _load(owner: Owner, state: Path, run: Path, planted: Path) -> object:
    """``owner.load``, failed (not hung) when it blocks: a FIFO planted as the file would
    hang a reader that opens it blindly; the FIFO is then opened for writing to free it."""
    result: list[object] = []

    def run_it() -> None:
        try:
            result.append(owner.load(state, run))
        except BaseException as err:  # handed to the test's thread below
            result.append(err)

    thread = threading.Thread(target=run_it, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        os.close(os.open(planted, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail(f"reading {planted.name} hung on what was planted there")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _events(state: Path) -> list[dict[str, Any]]:
    log = state / "events.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("damage", ["truncated", "list", "symlink", "fifo", "future"])
@pytest.mark.parametrize("owner", OWNERS, ids=IDS)
def test_a_damaged_state_file_is_set_aside_with_an_event_or_refused_naming_the_fix(
        tmp_path: Path, owner: Owner, damage: str) -> None:
    state, run = tmp_path / "state", tmp_path / "run"
    state.mkdir()
    run.mkdir()
    victim = tmp_path / "passwd"
    victim.write_text("root:x:0:0:root:/root:/bin/bash\n")
    path = (state if owner.where == "state" else run) / owner.name
    _plant(path, damage, victim, owner.valid)
    before = _tree(tmp_path)

    if owner.policy is statefile.Policy.REFUSE:
        with pytest.raises(ClusterctlError) as refused:
            _load(owner, state, run, path)
        assert str(path) in refused.value.message
        assert owner.name in (refused.value.fix or "")  # the fix names the file
        assert _tree(tmp_path) == before  # nothing moved, nothing recorded
        return

    assert _load(owner, state, run, path) == owner.fresh  # went on from empty
    after = _tree(tmp_path)
    relative = str(path.relative_to(tmp_path))
    (aside,) = [name for name in after if name.startswith(f"{relative}.corrupt-")]
    assert after[aside] == before[relative]  # kept aside whole: the link itself, not its target
    assert after["passwd"] == before["passwd"]
    (event,) = [e for e in _events(state) if e["event_type"] == "state_file_set_aside"]
    assert event["file"] == str(path)
    assert event["kept_as"] == str(tmp_path / aside)
    assert event["policy"] == owner.policy.value
    changed = {name for name in set(before) | set(after)
               if before.get(name) != after.get(name)}
    # only: the file (gone, or written afresh by its owner), its copy aside, the event log
    assert changed <= {relative, aside, "state/events.jsonl"}
    if relative in after:
        assert after[relative][0] == "file"


@pytest.mark.parametrize("owner", OWNERS, ids=IDS)
def test_a_state_file_an_older_version_wrote_without_a_version_still_loads(
        tmp_path: Path, owner: Owner) -> None:
    state, run = tmp_path / "state", tmp_path / "run"
    state.mkdir()
    run.mkdir()
    path = (state if owner.where == "state" else run) / owner.name
    path.write_text(json.dumps(owner.valid) + "\n")
    before = path.read_bytes()
    loaded = owner.load(state, run)
    if owner.name != "heartbeat.json":  # next_sequence() writes the next one
        assert path.read_bytes() == before
    assert loaded != owner.fresh
    assert not list(path.parent.glob(f"{owner.name}.corrupt-*"))
    if owner.name == "heartbeat.json":
        assert loaded == 42


@pytest.mark.parametrize("owner", OWNERS, ids=IDS)
def test_every_state_file_is_written_root_only_with_its_schema_version(
        tmp_path: Path, owner: Owner) -> None:
    state, run = tmp_path / "state", tmp_path / "run"
    state.mkdir()
    run.mkdir()
    path = (state if owner.where == "state" else run) / owner.name
    path.write_text(json.dumps(owner.valid) + "\n")
    path.chmod(0o644)  # as an older clusterctl left it
    if owner.name == "heartbeat.json":
        owner.load(state, run)
    else:
        owner.save(state, run)
    expected = 0o644 if owner.name == "gpu-history.json" else 0o600
    assert stat.S_IMODE(path.stat().st_mode) == expected
    data = json.loads(path.read_text())
    assert next(iter(data)) == "version"
    assert data["version"] == 1
    assert owner.load(state, run) not in (None, {}, [])  # what was written reads back


# -- the event about a damaged file names this node as configured ------------------------


def _node_config(tmp_path: Path) -> Path:
    """A config naming this node ``vast_12345`` (not the host name), all under tmp_path."""
    conf = tmp_path / "clusterctl.toml"
    conf.write_text(f'[heartbeat]\ninstance_id = "vast_12345"\ntoken_file = "{tmp_path / "none"}"\n'
                    f'[paths]\nstate_dir = "{tmp_path / "state"}"\n'
                    f'run_dir = "{tmp_path / "run"}"\n'
                    f'[swap]\ndir = "{tmp_path / "swap"}"\n'
                    '[ollama]\nurl = "http://127.0.0.1:9"\n')
    return conf


def test_a_damaged_swap_ledger_is_reported_under_the_configured_instance_id(
        tmp_path: Path) -> None:
    from clusterctl.swap import executor as swap_executor

    conf = _node_config(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    (state / "swap.json").write_text('{"files": [{"name": "swap-00')  # cut by a crash
    facts, _ = swap_executor.status(cfg.load(conf).config)
    assert facts.ledger == ledger.Ledger()  # rebuilt from the host
    (event,) = [e for e in _events(state) if e["event_type"] == "state_file_set_aside"]
    assert event["file"] == str(state / "swap.json")
    assert event["instance_id"] == "vast_12345"  # what the control plane files it under


def test_a_damaged_gpu_history_read_by_gpu_trend_is_reported_under_the_configured_instance_id(
        tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import FAKE_NVML_DIR, H100, write_scenario

    conf = _node_config(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "gpu-history.json").write_text('{"GPU-0": [[1800000000.0, 4')  # cut by a crash
    scenario = write_scenario(tmp_path / "scenario.json",
                              {"driver_version": "580.95.05", "gpus": [{**H100, "uuid": "GPU-0"}]})
    env = {k: v for k, v in os.environ.items() if k != "CLUSTERCTL_CONFIG"} | {
        "PYTHONPATH": f"{FAKE_NVML_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "FAKE_NVML_SCENARIO": str(scenario)}
    trend = subprocess.run([sys.executable, "-m", "clusterctl", "gpu", "trend", "--json",
                            "--config", str(conf)], capture_output=True, text=True, env=env,
                           timeout=60, check=False)
    assert trend.returncode == 0, trend.stderr
    assert json.loads(trend.stdout)["samples"] == 0  # went on from an empty history
    assert list(run.glob("gpu-history.json.corrupt-*"))
    (event,) = [e for e in _events(tmp_path / "state")
                if e["event_type"] == "state_file_set_aside"]
    assert event["file"] == str(run / "gpu-history.json")
    assert event["instance_id"] == "vast_12345"


def test_a_damaged_outbox_cursor_is_reported_under_the_agents_instance_id(
        tmp_path: Path) -> None:
    from clusterctl.events.outbox import Outbox

    state = tmp_path / "state"
    state.mkdir()
    (state / "outbox.json").write_text("{garbage")
    assert Outbox(state, instance_id="vast_12345").cursor() is None  # all sent again
    (event,) = [e for e in _events(state) if e["event_type"] == "state_file_set_aside"]
    assert event["file"] == str(state / "outbox.json")
    assert event["instance_id"] == "vast_12345"
