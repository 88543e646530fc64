"""What the control plane shows of the fleet beyond its state: the node summaries the
page and CLI read, the last day's history, the series in /metrics that the alert rules
and the dashboard use, and the Prometheus targets written from the node list."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.fleet import ADMIN, Clock, FleetServer, event, heartbeat, token_file

CLI = [sys.executable, "-m", "clusterctl"]
H100 = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-aa", "utilization": 40,
        "temperature": 51, "memory": {"total": 81559, "used": 4000, "free": 77559},
        "state": "normal", "lost": False}


def beat(srv: FleetServer, token: str, instance: str, body: dict[str, Any] | None = None,
         **kw: Any) -> None:
    """A heartbeat; ``body``: keys that replace the made-up ones (gpus as a list, say)."""
    status, answer = srv.request("POST", "/api/agent/status",
                                 {**heartbeat(instance, **kw), **(body or {})}, token=token)
    assert status == 200, answer


def listed(srv: FleetServer) -> dict[str, Any]:
    status, answer = srv.admin("GET", "/api/instances")
    assert status == 200, answer
    return dict(answer)


def scrape(srv: FleetServer) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """/metrics as Prometheus parses it: family -> [(sample name, labels, value)]."""
    status, text = srv.request("GET", "/metrics", token=ADMIN)
    assert status == 200, text
    return {f.name: [(s.name, s.labels, s.value) for s in f.samples]
            for f in text_string_to_metric_families(text)}


def value(metrics: dict[str, Any], family: str, **labels: str) -> float | None:
    found = [v for _, have, v in metrics.get(family, [])
             if all(have.get(k) == w for k, w in labels.items())]
    assert len(found) <= 1, found
    return found[0] if found else None


def test_the_node_list_carries_what_the_page_shows(server: FleetServer,
                                                   clock: Clock) -> None:
    token = server.enrol("gpu-01")
    beat(server, token, "gpu-01", {"idle_since": "2027-01-15T07:50:00Z",
         "gpus": [H100, {**H100, "index": 1, "utilization": None, "state": "critical"}],
            "swap": {"used_bytes": 2 << 30, "total_bytes": 16 << 30},
            "memory": {"used_percent": 71.5},
            "schedule": {"wake_at": "2027-01-16T08:00:00Z", "sleep_at": None}})
    clock.advance(42)
    answer = listed(server)
    node = answer["instances"][0]
    assert answer["now"].endswith("Z")
    assert node["last_seen_age_s"] == 42.0
    assert node["address"] == "127.0.0.1"
    assert node["idle_since"] == "2027-01-15T07:50:00Z"
    assert node["swap"] == {"used_bytes": 2 << 30, "total_bytes": 16 << 30}
    assert node["memory_used_percent"] == 71.5
    assert node["schedule"]["wake_at"] == "2027-01-16T08:00:00Z"
    assert node["hibernate"]["pause_after_minutes"] == 3
    assert node["gpu_list"] == [
        {"index": 0, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-aa", "utilization": 40,
         "temperature": 51, "memory_used_mib": 4000, "memory_total_mib": 81559,
         "state": "normal", "lost": False},
        {"index": 1, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-aa", "utilization": None,
         "temperature": 51, "memory_used_mib": 4000, "memory_total_mib": 81559,
         "state": "critical", "lost": False}]
    status, one = server.admin("GET", "/api/instances/gpu-01/status")
    assert status == 200 and one["gpu_list"] == node["gpu_list"]


def test_node_numbers_of_the_wrong_shape_are_shown_as_unknown(server: FleetServer) -> None:
    token = server.enrol("gpu-01")
    hostile = {"index": "0", "name": "x\x1b[31m", "utilization": True, "temperature": [1],
               "memory": "lots", "state": "<b>melting</b>", "lost": "yes"}
    beat(server, token, "gpu-01", {"gpus": [hostile, "not a gpu", 7],
                                   "swap": [1, 2], "memory": None, "idle_since": 5})
    node = listed(server)["instances"][0]
    assert node["gpu_list"] == [{"index": None, "name": None, "uuid": None,
                                 "utilization": None, "temperature": None,
                                 "memory_used_mib": None, "memory_total_mib": None,
                                 "state": None, "lost": False}]
    assert node["swap"] is None and node["memory_used_percent"] is None
    assert node["idle_since"] is None


def test_the_history_keeps_the_fleets_utilization_and_time_asleep(tmp_path: Path) -> None:
    clock = Clock(start=1_800_000_000.0)  # a multiple of 300: steps start on the clock
    with FleetServer(tmp_path, f"sqlite:///{tmp_path}/f.db", clock=clock) as srv:
        a, b = srv.enrol("a"), srv.enrol("b")
        beat(srv, a, "a", gpu_utilization=40.0)
        beat(srv, b, "b", gpu_utilization=60.0, status="hibernating")
        clock.advance(15)  # the liveness loop sampled at the start: the next is due
        srv.tick()
        status, history = srv.admin("GET", "/api/fleet/history")
        assert status == 200 and history["step_s"] == 300
        [point] = history["points"]
        assert point["gpu_utilization"] == 50.0 and point["nodes"] == 2
        assert point["nodes_hibernated"] == 0 and point["hibernated_hours"] == 0
        # b goes silent after saying it hibernates: asleep from 3 intervals + 5 s on
        for _ in range(39):  # 600 s in the liveness loop's samples; a keeps heartbeating
            clock.advance(15)
            beat(srv, a, "a", gpu_utilization=20.0)
            srv.tick()
        points = srv.admin("GET", "/api/fleet/history")[1]["points"]
        assert [p["t"] for p in points] == ["2027-01-15T08:00:00Z", "2027-01-15T08:05:00Z",
                                            "2027-01-15T08:10:00Z"]
        assert points[-1]["nodes_hibernated"] == 1
        asleep_h = sum(p["hibernated_hours"] for p in points)
        assert 480 / 3600 <= asleep_h <= 525 / 3600  # asleep from about 95 s on
        assert points[-1]["gpu_utilization"] == 20.0  # a sleeping node is not averaged
        clock.advance(25 * 3600)
        srv.tick()
        points = srv.admin("GET", "/api/fleet/history")[1]["points"]
        assert len(points) == 1  # a day later: only the new step
        assert srv.request("GET", "/api/fleet/history")[0] == 401


def test_metrics_show_each_node_and_what_went_wrong(server: FleetServer,
                                                    clock: Clock) -> None:
    token = server.enrol("gpu-01", hostname="gpu-01.lab")
    beat(server, token, "gpu-01")
    clock.advance(42)
    batch = [event("gpu-01", "e1", "hibernate_failed"), event("gpu-01", "e2", "idle_detected"),
             event("gpu-01", "e3", "hibernate_failed")]
    for _ in range(2):  # the second time they are duplicates: counted once
        status, _ = server.request("POST", "/api/agent/events", batch, token=token)
        assert status == 200
    m = scrape(server)
    labels = {"instance_id": "gpu-01", "hostname": "gpu-01"}
    assert value(m, "clusterctl_fleet_node_state", **labels, state="running") == 1
    assert value(m, "clusterctl_fleet_node_heartbeat_age_seconds", **labels) == 42
    assert value(m, "clusterctl_fleet_node_heartbeat_interval_seconds", **labels) == 30
    assert value(m, "clusterctl_fleet_node_events", **labels,
                 event_type="hibernate_failed") == 2
    assert value(m, "clusterctl_fleet_node_events", event_type="idle_detected") is None
    assert value(m, "clusterctl_fleet_events_received", event_type="hibernate_failed") == 2
    assert value(m, "clusterctl_fleet_events_received", event_type="idle_detected") == 1
    assert value(m, "clusterctl_fleet_events_stored") == 3
    counts = [s for s in m["clusterctl_fleet_database_seconds"]
              if s[0] == "clusterctl_fleet_database_seconds_count"]
    assert {s[1]["operation"] for s in counts} >= {"enrol", "add_events"}
    buckets = [v for name, labels_, v in m["clusterctl_fleet_database_seconds"]
               if name.endswith("_bucket") and labels_["operation"] == "add_events"]
    assert buckets == sorted(buckets) and buckets[-1] == 2  # cumulative, +Inf = count
    clock.advance(3 * 30 + 6)
    server.tick()
    m = scrape(server)
    assert value(m, "clusterctl_fleet_node_state", **labels, state="lost") == 1
    assert value(m, "clusterctl_fleet_node_state", **labels, state="running") is None


def test_event_types_in_metrics_are_bounded(server: FleetServer) -> None:
    token = server.enrol("gpu-01")
    batch = [event("gpu-01", f"e{i}", f"made_up_{i}") for i in range(150)]
    assert server.request("POST", "/api/agent/events", batch, token=token)[0] == 200
    m = scrape(server)
    types = {labels["event_type"]: v for _, labels, v in m["clusterctl_fleet_events_received"]}
    assert len(types) == 101 and types["other"] == 50


def test_metrics_count_wakes_by_result(tmp_path: Path, clock: Clock) -> None:
    program = tmp_path / "wake"
    program.write_text(f"#!/bin/sh\n[ -e {tmp_path}/broken ] && exit 3\nexit 0\n")
    program.chmod(0o755)
    with FleetServer(tmp_path, f"sqlite:///{tmp_path}/f.db", clock=clock, wake="command",
                     wake_command=(str(program),), resume_timeout_s=60.0) as srv:
        token = srv.enrol("n1")
        beat(srv, token, "n1", status="hibernating")
        clock.advance(3 * 30 + 6)
        srv.tick()
        assert srv.admin("POST", "/api/instances/n1/wake")[0] == 202
        beat(srv, token, "n1", boot_id="b2")  # back: woke
        beat(srv, token, "n1", status="hibernating")
        clock.advance(3 * 30 + 6)
        srv.tick()
        (tmp_path / "broken").touch()
        assert srv.admin("POST", "/api/instances/n1/wake")[0] == 502
        (tmp_path / "broken").unlink()
        assert srv.admin("POST", "/api/instances/n1/wake")[0] == 202
        clock.advance(61)
        srv.tick()  # no heartbeat within the resume timeout
        m = scrape(srv)
    wakes = {labels["result"]: v for _, labels, v in m["clusterctl_fleet_wakes"]
             if labels["method"] == "command"}
    assert wakes == {"sent": 2, "woke": 1, "failed": 1, "timed_out": 1}
    assert value(m, "clusterctl_fleet_node_events", instance_id="n1",
                 event_type="wake_failed") == 2
    assert value(m, "clusterctl_fleet_node_state", instance_id="n1",
                 state="wake_failed") == 1


# -- targets ------------------------------------------------------------------------

def _targets(tmp: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    conf = tmp / "targets.toml"
    conf.write_text(f'[fleet]\nadmin_token_file = "{token_file(tmp / "admin2", ADMIN)}"\n'
                    f'[paths]\nstate_dir = "{tmp / "state"}"\n')
    return subprocess.run([*CLI, "fleet", "targets", "--server", url, "--config", str(conf),
                           *args], capture_output=True, text=True, timeout=60, check=False)


def test_targets_list_the_nodes_that_should_answer_a_scrape(server: FleetServer,
                                                            clock: Clock,
                                                            tmp_path: Path) -> None:
    tokens = {n: server.enrol(n) for n in ("up", "asleep", "gone", "evil")}
    beat(server, tokens["up"], "up")
    beat(server, tokens["evil"], "evil", hostname="x:1/metrics?")
    beat(server, tokens["asleep"], "asleep", status="hibernating")
    clock.advance(3 * 30 + 6)
    beat(server, tokens["up"], "up")
    beat(server, tokens["evil"], "evil", hostname="x:1/metrics?")
    server.tick()  # asleep: hibernated; gone: lost
    done = _targets(tmp_path, server.url)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [
        {"targets": ["evil:9408"], "labels": {"instance_id": "evil", "hostname": "evil"}},
        {"targets": ["gone:9408"], "labels": {"instance_id": "gone", "hostname": "gone"}},
        {"targets": ["up:9408"], "labels": {"instance_id": "up", "hostname": "up"}}]
    out = tmp_path / "sd" / "nodes.json"
    out.parent.mkdir()
    done = _targets(tmp_path, server.url, "--output", str(out), "--use", "address",
                    "--port", "9100")
    assert done.returncode == 0, done.stderr
    groups = json.loads(out.read_text())
    assert {g["targets"][0] for g in groups} == {"127.0.0.1:9100"}
    assert len(groups) == 2 and "left out gone" in done.stderr  # lost before any address
    assert out.stat().st_mode & 0o777 == 0o644


def test_targets_never_replace_a_file_that_is_not_a_targets_file(server: FleetServer,
                                                                  tmp_path: Path) -> None:
    mine = tmp_path / "prometheus.yml"
    mine.write_text("global:\n  scrape_interval: 15s\n")
    done = _targets(tmp_path, server.url, "--output", str(mine))
    assert done.returncode != 0 and "is not a targets file" in done.stderr
    assert mine.read_text() == "global:\n  scrape_interval: 15s\n"
    for bad in (("--use", "dns"), ("--port", "70000")):
        done = _targets(tmp_path, server.url, *bad)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    done = _targets(tmp_path, server.url, "--output", str(tmp_path / "no" / "dir.json"))
    assert done.returncode != 0 and "is not a directory" in done.stderr
