"""XID errors through NVML's event API, on the fake NVML: the watcher (registration, waits,
GPUs lost and back, NVML errors), and the agent (each XID an event once, /metrics,
heartbeats, /healthz and placement held off a GPU with a fatal XID until it recovers or an
operator clears it with `clusterctl gpu clear-xid`, across agent restarts within a boot,
a stop not held up by the wait), in-process and as a real agent process."""

from __future__ import annotations

import getpass
import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from clusterctl.events.log import EventLog
from clusterctl.gpu import placement, xid, xid_ledger
from clusterctl.host.nvml import Nvml
from clusterctl.host.nvml_events import MAX_EVENTS_PER_WAIT, XidEvent, XidWatcher
from clusterctl.system import statefile
from tests.conftest import FAKE_NVML_DIR, H100, agent_config, load_fake_nvml, wait_until
from tests.fakes.control_plane import free_port, running
from tests.faults import fill, tmpfs
from tests.fleet import stop_process
from tests.test_agent import Node

GIB = 2**30


@pytest.fixture
def nv(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Three H100s, GPU-0 to GPU-2, each with 10 GiB in use."""
    fake = load_fake_nvml(monkeypatch)
    fake.configure({"gpus": [{**H100, "uuid": f"GPU-{i}", "pci_bus_id": f"00000000:{i:02x}:00.0",
                              "memory_used": 10 * GIB} for i in range(3)]})
    return fake


def waited(watcher: XidWatcher, seconds: float = 2.0) -> list[XidEvent]:
    """What waits bring within ``seconds``: once the first brought anything, that."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = watcher.wait(0.1)
        if found:
            return found
    return []


def registered(nv: ModuleType, *indices: int) -> Callable[[], bool]:
    return lambda: all(nv.xid_listeners(i) for i in indices)


# -- the codes (pure) ------------------------------------------------------------------


def test_the_fatal_codes_are_the_memory_bus_nvlink_and_gsp_ones_and_faults_are_not() -> None:
    assert {48, 63, 64, 94, 95, 74, 79, 119, 120} <= xid.FATAL
    assert not {13, 31, 43, 45} & xid.FATAL
    assert {13, 31, 43, 45} <= xid.APPLICATION
    assert "fallen off the bus" in xid.describe(79).meaning
    assert "nvidia-smi -r -i 3" in xid.describe(48).action_for(3)
    unknown = xid.describe(4242)
    assert not unknown.fatal and xid.CATALOG in unknown.action


# -- the watcher -----------------------------------------------------------------------


def test_an_xid_is_handed_back_once_with_its_gpu(nv: ModuleType) -> None:
    watcher = XidWatcher(Nvml(module=nv))
    assert watcher.wait(0.05) == []  # registers: nothing came
    assert watcher.watched == {0, 1, 2} and watcher.problem is None
    assert nv.inject_xid(1, 79) == 1
    [event] = watcher.wait(1)
    assert (event.index, event.uuid, event.xid) == (1, "GPU-1", 79)
    assert watcher.wait(0.1) == []  # once
    for code in (13, 31, 43):  # a burst comes back whole
        nv.inject_xid(2, code)
    assert [e.xid for e in watcher.wait(1)] == [13, 31, 43]
    watcher.close()
    assert nv.event_sets == []  # freed


def test_a_wait_with_nothing_to_hear_takes_its_timeout_and_returns_nothing(
        nv: ModuleType) -> None:
    watcher = XidWatcher(Nvml(module=nv))
    watcher.wait(0.05)
    started = time.monotonic()
    assert watcher.wait(0.3) == []
    assert 0.25 <= time.monotonic() - started < 1.0


def test_a_gpu_without_xid_events_is_skipped_saying_why_once(
        nv: ModuleType, caplog: pytest.LogCaptureFixture) -> None:
    nv.machine.gpus[1].supported_event_types = nv.nvmlEventTypePState  # no XIDs
    nv.machine.gpus[2].supported_event_types = None  # NOT_SUPPORTED
    caplog.set_level(logging.INFO, "clusterctl")
    watcher = XidWatcher(Nvml(module=nv))
    watcher.wait(0.05)
    nv.machine.gpus[0].errors["nvmlEventSetWait_v2"] = nv.NVML_ERROR_UNKNOWN
    for _ in range(3):  # the set built again after each failed wait
        watcher.wait(0.05)
    del nv.machine.gpus[0].errors["nvmlEventSetWait_v2"]
    assert watcher.watched == {0}
    assert watcher.problem is not None and "GPU 1" in watcher.problem \
        and "GPU 2" in watcher.problem
    said = [r.getMessage() for r in caplog.records if "not watching XID errors" in
            r.getMessage()]
    assert len([m for m in said if "GPU 1" in m]) == 1
    assert len([m for m in said if "GPU 2" in m]) == 1
    assert nv.inject_xid(1, 79) == 0  # nobody listens on GPU 1
    nv.inject_xid(0, 79)
    assert [e.index for e in waited(watcher)] == [0]


def test_nvml_failures_in_the_wait_are_counted_and_the_watcher_goes_on(
        nv: ModuleType) -> None:
    failed: list[Exception] = []
    watcher = XidWatcher(Nvml(module=nv), failed=failed.append)
    watcher.wait(0.05)
    nv.machine.gpus[0].errors["nvmlEventSetWait_v2"] = nv.NVML_ERROR_UNKNOWN
    started = time.monotonic()
    for _ in range(3):
        assert watcher.wait(0.1) == []
    assert time.monotonic() - started >= 0.25  # a failing wait does not spin
    assert len(failed) == 3 and watcher.failures == 3
    assert "Unknown Error" in str(failed[0])
    del nv.machine.gpus[0].errors["nvmlEventSetWait_v2"]
    watcher.wait(0.05)
    nv.inject_xid(0, 48)
    assert [e.xid for e in waited(watcher)] == [48]
    assert len(nv.event_sets) == 1  # each failure's set was freed


def test_whatever_the_binding_raises_is_counted_never_raised(
        nv: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    failed: list[Exception] = []
    watcher = XidWatcher(Nvml(module=nv), failed=failed.append)
    watcher.wait(0.05)

    def broken(event_set: Any, timeout_ms: int) -> Any:
        raise RuntimeError("a binding bug")

    monkeypatch.setattr(nv, "nvmlEventSetWait_v2", broken)
    assert watcher.wait(0.05) == []
    assert [str(e) for e in failed] == ["a binding bug"]
    monkeypatch.undo()
    watcher.wait(0.05)
    nv.inject_xid(2, 94)
    assert [e.xid for e in waited(watcher)] == [94]


def test_a_lost_gpu_is_left_out_and_watched_again_once_it_answers(nv: ModuleType) -> None:
    failed: list[Exception] = []
    watcher = XidWatcher(Nvml(module=nv), failed=failed.append, lost_retry_s=0.1)
    watcher.wait(0.05)
    nv.machine.gpus[0].lost = True
    watcher.wait(0.05)  # the wait finds it lost: the set again, without it
    assert watcher.watched == {1, 2}
    assert watcher.problem is not None and "GPU 0" in watcher.problem
    nv.inject_xid(2, 13)  # the others are heard meanwhile
    assert [e.index for e in waited(watcher)] == [2]
    nv.machine.gpus[0].lost = False  # reset, back on the bus
    wait_until(lambda: watcher.wait(0.05) == [] and watcher.watched == {0, 1, 2},
               timeout_s=5)
    now: str | None = watcher.problem  # (read again: it changed)
    assert now is None
    nv.inject_xid(0, 48)
    assert [(e.index, e.xid) for e in waited(watcher)] == [(0, 48)]
    assert failed == []  # a GPU that is lost is its state, not a failure of the watcher
    assert len(nv.event_sets) == 1


def test_a_gpu_added_is_registered_at_the_next_look(nv: ModuleType) -> None:
    watcher = XidWatcher(Nvml(module=nv), recheck_s=0.1)
    watcher.wait(0.05)
    nv.machine.gpus.append(nv.FakeGpu(uuid="GPU-3"))
    wait_until(lambda: watcher.wait(0.05) == [] and 3 in watcher.watched, timeout_s=5)
    nv.inject_xid(3, 79)
    assert [(e.index, e.uuid) for e in waited(watcher)] == [(3, "GPU-3")]


def test_without_nvml_or_its_event_api_the_wait_says_why_and_paces_itself(
        monkeypatch: pytest.MonkeyPatch) -> None:
    nv = load_fake_nvml(monkeypatch)
    nv.configure({"init_error": nv.NVML_ERROR_DRIVER_NOT_LOADED})
    watcher = XidWatcher(Nvml(module=nv))
    started = time.monotonic()
    assert watcher.wait(0.2) == []
    assert time.monotonic() - started >= 0.15
    assert watcher.problem == "NVML is not available: the NVIDIA kernel driver is not loaded"
    old = load_fake_nvml(monkeypatch)
    old.configure({"gpus": [{}], "missing_functions": ["nvmlEventSetCreate"]})
    watcher = XidWatcher(Nvml(module=old))
    assert watcher.wait(0.05) == []
    assert watcher.problem is not None and "event API is not available" in watcher.problem


def test_close_ends_a_paced_wait_at_once(nv: ModuleType) -> None:
    nv.configure({"init_error": nv.NVML_ERROR_LIBRARY_NOT_FOUND})
    watcher = XidWatcher(Nvml(module=nv))
    watcher.close()
    started = time.monotonic()
    assert watcher.wait(5) == []
    assert time.monotonic() - started < 0.5


# -- the ledger and the file placement reads -------------------------------------------


def test_a_storm_of_one_code_is_recorded_once_and_counted_whole() -> None:
    ledger = xid_ledger.XidLedger(record_again_s=10)
    noted = [ledger.note(XidEvent(0, "GPU-0", 13, 100.0 + i / 10)) for i in range(50)]
    assert [n.record for n in noted].count(True) == 1
    assert noted[-1].count == 50
    assert ledger.note(XidEvent(0, "GPU-0", 13, 111.0)).record  # after 10 s: again
    gpu = ledger.status().of(0, "GPU-0")
    assert gpu is not None and (gpu.last, gpu.count, gpu.fatal) == (13, 51, None)


def test_a_driver_inventing_codes_gets_bounded_events_and_series_and_fatal_still_holds(
) -> None:
    ledger = xid_ledger.XidLedger(record_again_s=10)
    noted = [ledger.note(XidEvent(0, "GPU-0", 1000 + i, 100.0 + i / 100)) for i in range(500)]
    assert sum(n.record for n in noted) == xid_ledger.MAX_CODES + 1  # 32 codes, "other" once
    fatal = ledger.note(XidEvent(0, "GPU-0", 79, 106.0))  # past the cap: still fatal
    gpu = ledger.status().of(0, "GPU-0")
    assert gpu is not None and len(gpu.counts) == xid_ledger.MAX_CODES + 1
    assert dict(gpu.counts)[xid_ledger.OTHER] == 500 - xid_ledger.MAX_CODES + 1
    assert fatal.newly_fatal and gpu.fatal is not None and gpu.fatal.xid == 79


def test_a_fatal_xid_file_from_an_earlier_boot_counts_for_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "proc/sys/kernel/random").mkdir(parents=True)
    boot = root / "proc/sys/kernel/random/boot_id"
    boot.write_text("boot-1\n")
    fatal = xid_ledger.Fatal(0, "GPU-0", 79, 100.0)
    xid_ledger.save(tmp_path, [fatal], root=root)
    assert xid_ledger.load(tmp_path, root=root) == {"GPU-0": fatal}
    boot.write_text("boot-2\n")
    assert xid_ledger.load(tmp_path, root=root) == {}
    xid_ledger.save(tmp_path, [], root=root)
    assert not (tmp_path / xid_ledger.FILE_NAME).exists()


def test_every_placement_leaves_out_a_gpu_the_agent_holds_a_fatal_xid_against(
        nv: ModuleType, tmp_path: Path) -> None:
    """`clusterctl gpu place` and the Python API place without the agent: they read its
    file (this boot's)."""
    state, run = tmp_path / "state", tmp_path / "run"
    nvml = Nvml(module=nv)
    xid_ledger.save(state, [xid_ledger.Fatal(0, "GPU-0", 95, time.time())])
    with pytest.raises(placement.NoFit) as refused:
        placement.place(state, run, nvml.sample, "llm", 1024, 512, gpu_index=0, now=1)
    assert "fatal XID 95" in refused.value.message
    assert "nvidia-smi -r -i 0" in (refused.value.fix or "")
    placed = placement.place(state, run, nvml.sample, "llm", 1024, 512, now=1)
    assert placed.room.index != 0


# -- the agent -------------------------------------------------------------------------


def recorded(n: Node) -> list[dict[str, Any]]:
    return EventLog(n.state, "node-1").read()


def api_token(n: Node) -> dict[str, str]:
    n.api_token.write_text("t0ken\n")
    n.api_token.chmod(0o600)
    return {"Authorization": "Bearer t0ken", "Content-Type": "application/json"}


def allocate(n: Node, name: str, gpu: int | None = None) -> tuple[int, Any]:
    body = {"allocation_id": name, "required_mb": 1024, **({} if gpu is None else
                                                           {"gpu_id": gpu})}
    return n.request("POST", "/api/gpu/memory/allocate", json.dumps(body).encode(),
                     api_token(n))


def metric(text: str, name: str, gpu: int, extra: str = "") -> str | None:
    return next((line.split()[-1] for line in text.splitlines()
                 if line.startswith(name + "{") and f'gpu="{gpu}"' in line and extra in line),
                None)


def test_an_xid_reaches_the_control_plane_once_with_its_meaning_metrics_and_heartbeat(
        node: Callable[..., Node], nv: ModuleType) -> None:
    with running() as plane:
        n = node(plane.url)
        n.start()
        wait_until(registered(nv, 0, 1, 2))
        wait_until(lambda: metric(n.get("/metrics")[1], "DCGM_FI_DEV_XID_ERRORS", 1)
                   == "0.0")  # watched (at the next sample), none yet
        nv.inject_xid(1, 13)
        wait_until(lambda: any(e["event_type"] == "gpu_xid" for e in plane.events))
        wait_until(lambda: any(g["xid"]["count"] for h in plane.heartbeats for g in h["gpus"]))
        time.sleep(1.5)  # more passes: nothing sent twice
        _, text = n.get("/metrics")
        status, health = n.get("/healthz")
    [event] = [e for e in plane.events if e["event_type"] == "gpu_xid"]
    assert (event["gpu"], event["uuid"], event["xid"], event["fatal"]) == (1, "GPU-1", 13, False)
    assert "illegal instruction" in event["meaning"] and "application" in event["action"]
    assert event["reason"].startswith("XID 13 on GPU 1")
    beat = next(h for h in plane.heartbeats if h["gpus"][1]["xid"]["count"])
    assert beat["gpus"][1]["xid"] == {"last": 13, "count": 1}
    assert beat["gpus"][0]["xid"] == {"last": None, "count": 0}
    assert metric(text, "DCGM_FI_DEV_XID_ERRORS", 1) == "13.0"
    assert metric(text, "clusterctl_gpu_xid_errors_total", 1, 'xid="13"') == "1.0"
    assert status == 200 and health["status"] == "healthy"  # an application fault
    assert allocate(n, "llm", gpu=1)[0] == 200


def test_a_fatal_xid_makes_healthz_503_and_keeps_placement_off_that_gpu_until_it_recovers(
        node: Callable[..., Node], nv: ModuleType) -> None:
    n = node()
    agent = n.start()
    wait_until(registered(nv, 0, 1, 2))
    nv.inject_xid(0, 79)
    wait_until(lambda: n.get("/healthz")[0] == 503)
    _, health = n.get("/healthz")
    assert health["status"] == "unhealthy"
    wait_until(lambda: metric(n.get("/metrics")[1], "clusterctl_gpu_xid_unrecovered", 0,
                              'xid="79"') == "1.0")  # the alert rule's series, while held
    assert metric(n.get("/metrics")[1], "clusterctl_gpu_xid_unrecovered", 1) is None
    [problem] = health["problems"]
    assert "GPU 0 had fatal XID 79" in problem and "fallen off the bus" in problem
    status, refused = allocate(n, "pinned", gpu=0)
    assert status == 409
    assert "fatal XID 79" in refused["error"] and "reboot the node" in refused["error"]
    status, placed = allocate(n, "anywhere")
    assert status == 200 and placed["data"]["gpu_id"] in (1, 2)  # the others still placed
    events = [e for e in recorded(n) if e["event_type"] == "gpu_xid"]
    assert [(e["xid"], e["fatal"]) for e in events] == [(79, True)]
    # it recovers: lost (reset), then answering again
    nv.machine.gpus[0].lost = True
    wait_until(lambda: agent.snapshot().gpu_view(0).sample.lost)  # type: ignore[union-attr]
    nv.machine.gpus[0].lost = False
    wait_until(lambda: n.get("/healthz")[0] == 200)
    wait_until(lambda: metric(n.get("/metrics")[1], "clusterctl_gpu_xid_unrecovered", 0)
               is None)
    assert allocate(n, "pinned", gpu=0)[0] == 200
    assert any(e["event_type"] == "gpu_xid_recovered" and e["xid"] == 79
               for e in recorded(n))
    assert not (n.state / xid_ledger.FILE_NAME).exists()


def test_an_application_fault_changes_neither_health_nor_placement(
        node: Callable[..., Node], nv: ModuleType) -> None:
    n = node()
    n.start()
    wait_until(registered(nv, 0))
    for code in (13, 31, 43, 45):
        nv.inject_xid(0, code)
    wait_until(lambda: len([e for e in recorded(n) if e["event_type"] == "gpu_xid"]) == 4)
    assert n.get("/healthz")[0] == 200
    assert allocate(n, "llm", gpu=0)[0] == 200


def test_a_restart_keeps_a_fatal_xid_within_the_boot(node: Callable[..., Node],
                                                     nv: ModuleType) -> None:
    """systemd restarts a crashed agent: a crash loop must not forget a GPU fault."""
    n = node()
    n.start()
    wait_until(registered(nv, 2))
    nv.inject_xid(2, 119)
    wait_until(lambda: n.get("/healthz")[0] == 503)
    wait_until((n.state / xid_ledger.FILE_NAME).exists)  # for placements without the agent
    n.stop()
    n.start()  # its first GPU step is done
    for _ in range(3):  # and stays so, step after step
        status, health = n.get("/healthz")
        assert status == 503, health
        assert any("GPU 2 had fatal XID 119" in p for p in health["problems"])
        time.sleep(0.3)
    status, refused = allocate(n, "pinned", gpu=2)
    assert status == 409 and "fatal XID 119" in refused["error"]
    assert "clusterctl gpu clear-xid --gpu 2" in refused["error"]
    status, placed = allocate(n, "anywhere")
    assert status == 200 and placed["data"]["gpu_id"] in (0, 1)
    assert list(xid_ledger.load(n.state)) == ["GPU-2"]


def clear_xid(n: Node, *args: str) -> subprocess.CompletedProcess[str]:
    """`clusterctl gpu clear-xid ARGS` as an operator runs it, on the same three GPUs."""
    scenario = n.tmp / "cli-gpus.json"
    scenario.write_text(json.dumps({"gpus": [{**H100, "uuid": f"GPU-{i}"} for i in range(3)]}))
    env = {k: v for k, v in os.environ.items() if k not in ("CLUSTERCTL_CONFIG", "SUDO_USER")}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(FAKE_NVML_DIR),
                                                      env.get("PYTHONPATH", "")) if p),
               FAKE_NVML_SCENARIO=str(scenario))
    return subprocess.run([sys.executable, "-m", "clusterctl", "gpu", "clear-xid", *args,
                           "--config", str(n.conf)], capture_output=True, text=True, env=env,
                          timeout=60, check=False)


def test_an_operator_clears_a_fatal_xid_and_the_running_agent_follows_within_a_step(
        node: Callable[..., Node], nv: ModuleType) -> None:
    n = node()
    agent = n.make()  # driven step by step, no threads
    agent.gpu_step(time.monotonic())
    agent.xid_step(0.05)  # registers
    nv.inject_xid(0, 79)
    assert [e.xid for e in agent.xid_step(1)] == [79]
    assert list(agent.snapshot().xids.unrecovered()) == ["GPU-0"]
    done = clear_xid(n, "--gpu", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("cleared fatal XID 79 on GPU 0 (GPU-0)")
    assert xid_ledger.load(n.state) == {}  # placements without the agent: at once
    assert list(agent.snapshot().xids.unrecovered()) == ["GPU-0"]  # the agent: at its step
    agent.gpu_step(time.monotonic())
    assert agent.snapshot().xids.unrecovered() == {}
    assert agent.place("llm", 1024, 0).room.index == 0
    [event] = [e for e in recorded(n) if e["event_type"] == "gpu_xid_cleared"]
    assert (event["gpu"], event["uuid"], event["xid"]) == (0, "GPU-0", 79)
    assert event["by"] == getpass.getuser() and event["by"] in event["reason"]
    assert not (n.state / xid_ledger.FILE_NAME).exists()  # the agent followed: nothing held
    agent.gpu_step(time.monotonic())  # and a fatal XID after the clear is held again
    nv.inject_xid(0, 48)
    agent.xid_step(1)
    assert list(agent.snapshot().xids.unrecovered()) == ["GPU-0"]
    assert list(xid_ledger.load(n.state)) == ["GPU-0"]


def test_a_clear_leaves_a_fatal_xid_that_came_after_it() -> None:
    ledger = xid_ledger.XidLedger()
    ledger.note(XidEvent(0, "GPU-0", 79, 100.0))
    held = ledger.unrecovered()["GPU-0"]
    ledger.note(XidEvent(0, "GPU-0", 48, 120.0))  # not yet in the file the operator read
    assert ledger.clear([xid_ledger.Cleared(held, 150.0, "ops")]) != []
    ledger.note(XidEvent(0, "GPU-0", 95, 200.0))
    assert ledger.clear([xid_ledger.Cleared(held, 150.0, "ops")]) == []
    assert ledger.unrecovered()["GPU-0"].xid == 95


def test_clear_xid_refuses_in_one_line_and_changes_nothing_it_was_not_asked_to(
        node: Callable[..., Node]) -> None:
    n = node()
    xid_ledger.save(n.state, [xid_ledger.Fatal(0, "GPU-0", 79, time.time()),
                              xid_ledger.Fatal(2, "GPU-2", 48, time.time())])
    path = n.state / xid_ledger.FILE_NAME
    before = path.read_bytes()
    for args, code, said in (
            ((), 2, "clusterctl: 2 GPUs have an unrecovered fatal XID: GPU 0 (XID 79), GPU 2 "
                    "(XID 48); say which with --gpu N, or clear them all with --all"),
            (("--gpu", "7"), 2, "clusterctl: --gpu 7: this node has GPUs 0-2"),
            (("--gpu", "0", "--all"), 2, "clusterctl: --gpu N and --all: give one of them")):
        done = clear_xid(n, *args)
        assert (done.returncode, done.stderr.splitlines(), done.stdout) == (code, [said], "")
    done = clear_xid(n, "--gpu", "1")
    assert (done.returncode, done.stdout) == (0, "GPU 1 has no unrecovered fatal XID: "
                                                 "nothing to clear\n")
    assert path.read_bytes() == before
    assert not [e for e in recorded(n) if e["event_type"] == "gpu_xid_cleared"]
    done = clear_xid(n, "--all")
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 2
    assert xid_ledger.load(n.state) == {}
    assert [(e["gpu"], e["xid"]) for e in recorded(n)
            if e["event_type"] == "gpu_xid_cleared"] == [(0, 79), (2, 48)]
    done = clear_xid(n)
    assert (done.returncode, done.stdout) == (0, "no GPU has an unrecovered fatal XID: "
                                                 "nothing to clear\n")


def test_a_fatal_xid_file_from_another_boot_is_ignored_at_start(
        node: Callable[..., Node], nv: ModuleType) -> None:
    n = node()
    statefile.write(xid_ledger.SPEC, n.state, {"boot_id": "another-boot", "gpus": [
        {"index": 1, "uuid": "GPU-1", "xid": 79, "at": time.time() - 3600}]})
    n.start()
    assert n.get("/healthz")[0] == 200
    assert allocate(n, "pinned", gpu=1)[0] == 200
    wait_until(lambda: not (n.state / xid_ledger.FILE_NAME).exists())


def test_a_damaged_fatal_xid_file_is_set_aside_saying_what_may_be_forgotten(
        node: Callable[..., Node], nv: ModuleType, caplog: pytest.LogCaptureFixture) -> None:
    n = node()
    n.state.mkdir(parents=True)
    (n.state / xid_ledger.FILE_NAME).write_text('{"version": 1, "gpus": [{"ind')
    caplog.set_level(logging.WARNING, "clusterctl")
    n.start()
    assert n.get("/healthz")[0] == 200
    assert list(n.state.glob(xid_ledger.FILE_NAME + ".corrupt-*"))
    assert any(e["event_type"] == "state_file_set_aside" for e in recorded(n))
    assert any("fatal XIDs it held may have been forgotten" in r.getMessage()
               for r in caplog.records)


def test_the_xid_thread_does_not_delay_stopping(node: Callable[..., Node], nv: ModuleType
                                                ) -> None:
    n = node()
    agent = n.start()
    wait_until(registered(nv, 0, 1, 2))
    thread = agent.loops["xid"]
    started = time.monotonic()
    n.stop()
    took = time.monotonic() - started
    assert not thread.is_alive()
    assert took < 2.5, f"stop took {took:.2f} s"  # the API's own shutdown is most of it
    assert nv.event_sets == []  # freed before NVML was shut down


def test_nvml_failing_in_the_xid_thread_is_counted_and_the_thread_lives(
        node: Callable[..., Node], nv: ModuleType) -> None:
    n = node()
    agent = n.start()
    wait_until(registered(nv, 0))
    nv.machine.gpus[0].errors["nvmlEventSetWait_v2"] = nv.NVML_ERROR_UNKNOWN
    wait_until(lambda: agent.loop_errors["xid"] >= 2)
    assert 'clusterctl_loop_errors_total{loop="xid"}' in n.get("/metrics")[1]
    del nv.machine.gpus[0].errors["nvmlEventSetWait_v2"]
    wait_until(registered(nv, 0))
    nv.inject_xid(0, 48)
    wait_until(lambda: n.get("/healthz")[0] == 503)
    assert agent.loops["xid"].is_alive()
    assert agent.problems() == []


def test_a_real_agent_process_hears_xids_from_the_fake_driver_file(tmp_path: Path) -> None:
    scenario = tmp_path / "gpus.json"
    scenario.write_text(json.dumps({"gpus": [{**H100, "uuid": f"GPU-{i}"} for i in range(2)]}))
    xids = tmp_path / "xids"
    xids.write_text("")
    port = free_port()
    conf = tmp_path / "clusterctl.toml"
    conf.write_text(agent_config(tmp_path, "", port=port))
    env = {k: v for k, v in os.environ.items()
           if k not in ("CLUSTERCTL_CONFIG", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(FAKE_NVML_DIR),
                                                      env.get("PYTHONPATH", "")) if p),
               FAKE_NVML_SCENARIO=str(scenario), FAKE_NVML_XID_FILE=str(xids))
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "clusterctl", "agent", "run",
                                 "--config", str(conf), "-v"], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(lambda: "watching XID errors on GPU 0, 1" in log.read_text(), 30)
        with xids.open("a") as feed:
            feed.write("1 48\n")
        events = tmp_path / "state" / "events.jsonl"
        wait_until(lambda: events.exists() and '"gpu_xid"' in events.read_text())
        with pytest.raises(urllib.error.HTTPError) as unhealthy:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert unhealthy.value.code == 503
    finally:
        stop_process(proc)
    [event] = [json.loads(line) for line in events.read_text().splitlines()
               if '"gpu_xid"' in line]
    assert (event["gpu"], event["xid"], event["fatal"]) == (1, 48, True)
    assert "double-bit ECC" in event["meaning"]
    assert proc.returncode == 0


def test_the_agent_snapshot_carries_xids_for_every_reader(
        node: Callable[..., Node], nv: ModuleType) -> None:
    n = node()
    agent = n.start()
    wait_until(registered(nv, 0, 1, 2))
    nv.inject_xid(2, 74)
    wait_until(lambda: agent.snapshot().xids.unrecovered() != {})
    snap = agent.snapshot()
    assert snap.xids.watched == {0, 1, 2}
    assert list(snap.xids.unrecovered()) == ["GPU-2"]
    assert snap.gpu_metrics["gpus"][2]["xid"] == {"last": 74, "count": 1}


# -- attacks: a broken driver, a full disk, a damaged file (issue 18's review) -----------


def test_a_full_disk_holds_the_fatal_xid_and_says_so_once_until_the_file_is_written(
        node: Callable[..., Node], nv: ModuleType, caplog: pytest.LogCaptureFixture) -> None:
    """gpu-xid.json cannot be written (its state dir full): the agent holds the XID all the
    same, counts every failed write and says it once; it never says "works again" while
    the file still cannot be written, whatever the XID thread's waits do meanwhile."""
    n = node()
    with tmpfs(n.state, 512 * 1024):
        agent = n.make()  # driven step by step
        agent.gpu_step(time.monotonic())
        agent.xid_step(0.05)  # registers
        filler = fill(n.state)
        caplog.set_level(logging.INFO, "clusterctl")
        nv.inject_xid(0, 79)
        assert [e.xid for e in agent.xid_step(1)] == [79]
        for _ in range(4):
            agent.gpu_step(time.monotonic())
            agent.xid_step(0.05)
        said = [r.getMessage() for r in caplog.records]
        assert [m for m in said if "XID" in m and m.endswith("works again")] == []
        assert len([m for m in said if "gpu-xid.json" in m and "No space left" in m]) == 1
        assert agent.loop_errors["xid_file"] >= 5  # each failed write counted
        assert list(agent.snapshot().xids.unrecovered()) == ["GPU-0"]  # /healthz: 503
        with pytest.raises(placement.NoFit):
            agent.place("llm", 1024, 0)
        filler.unlink()
        agent.gpu_step(time.monotonic())
        assert list(xid_ledger.load(n.state)) == ["GPU-0"]  # for placements without it
        said = [r.getMessage() for r in caplog.records]
        assert len([m for m in said if "XID" in m and m.endswith("works again")]) == 1


BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()


@pytest.mark.parametrize("entry", [
    '{"index": Infinity, "uuid": "GPU-0", "xid": 79, "at": 1700000000.0}',
    '{"index": 0, "uuid": "GPU-0", "xid": 1e400, "at": 1700000000.0}',
    '{"index": 0, "uuid": "GPU-0", "xid": 79, "at": NaN}',
    '{"index": 0, "uuid": "GPU-0", "xid": 79, "at": 1e300}',
])
def test_a_fatal_xid_file_with_numbers_no_xid_has_is_damaged_never_a_crash(
        node: Callable[..., Node], nv: ModuleType, entry: str) -> None:
    """Placement, clear-xid and the agent (/healthz) each take it as damaged: no
    traceback, no 500, no GPU held by a figure nothing wrote."""
    n = node()
    n.state.mkdir(parents=True)
    path = n.state / xid_ledger.FILE_NAME
    body = f'{{"version": 1, "boot_id": "{BOOT_ID}", "gpus": [{entry}]}}'
    path.write_text(body)
    placed = placement.place(n.state, n.tmp / "run", Nvml(module=nv).sample, "llm", 1024, 512,
                             gpu_index=0, now=1)
    assert placed.room.index == 0
    done = clear_xid(n, "--gpu", "0")
    assert (done.returncode, done.stdout) == (0, "GPU 0 has no unrecovered fatal XID: "
                                                 "nothing to clear\n"), done.stderr
    assert "Traceback" not in done.stderr
    path.write_text(body)
    n.start()
    status, health = n.get("/healthz")
    assert status == 200, health
    assert not path.exists() and list(n.state.glob(xid_ledger.FILE_NAME + ".corrupt-*"))


def test_an_endless_burst_from_a_gpu_no_longer_there_ends_the_wait(
        nv: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver that hands event after event of a handle whose GPU is gone (NVML cannot
    name it): each is left out, and the wait still comes back after one burst's worth."""
    watcher = XidWatcher(Nvml(module=nv))
    watcher.wait(0.05)
    gone = nv.c_nvmlDevice_t(7)  # three GPUs: index 7 is no longer there
    calls: list[int] = []

    def storm(event_set: Any, timeout_ms: int) -> Any:
        calls.append(timeout_ms)
        if len(calls) > 20_000:  # a test's end to it: the driver's has none
            raise nv.NVMLError(nv.NVML_ERROR_TIMEOUT)
        return nv.c_nvmlEventData_t(gone, nv.nvmlEventTypeXidCriticalError, 79)

    monkeypatch.setattr(nv, "nvmlEventSetWait_v2", storm)
    assert watcher.wait(0.05) == []
    assert len(calls) <= MAX_EVENTS_PER_WAIT


@pytest.mark.parametrize("code", [0, 999, 2**63, 2**64 - 1])
def test_an_xid_code_no_table_has_is_said_counted_and_not_fatal(
        nv: ModuleType, code: int) -> None:
    watcher = XidWatcher(Nvml(module=nv))
    watcher.wait(0.05)
    nv.inject_xid(1, code)
    [event] = waited(watcher)
    ledger = xid_ledger.XidLedger()
    noted = ledger.note(event)
    assert (event.index, event.xid, noted.info.fatal, noted.record) == (1, code, False, True)
    assert xid.CATALOG in noted.info.action
    assert ledger.unrecovered() == {}


def test_a_wait_that_hangs_in_the_driver_does_not_hold_up_stopping(
        node: Callable[..., Node], nv: ModuleType) -> None:
    """NVML's own wait cannot be interrupted: a driver that holds it for seconds costs the
    stop its join (XID_WAIT_S + 1) and close's 2 s, far within systemd's 30 s."""
    n = node()
    agent = n.start()
    wait_until(registered(nv, 0, 1, 2))
    thread = agent.loops["xid"]
    nv.machine.gpus[0].delays_s["nvmlEventSetWait_v2"] = [5.0, 0.0]  # the next wait
    time.sleep(0.8)  # the XID thread is in it
    started = time.monotonic()
    n.stop()
    took = time.monotonic() - started
    assert took < 6, f"stop took {took:.2f} s"
    thread.join(10)  # the hung wait comes back, frees its set and ends
    assert not thread.is_alive()
    assert nv.event_sets == []
