"""`clusterctl gpu ...` as an operator runs it, against the fake NVML (this machine has no GPU).

The fake is put first on PYTHONPATH as `pynvml`, with a JSON scenario: the NVML boundary
only. Two processes placing at once go through the real lock and ledger.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import A100, FAKE_NVML_DIR, H100, write_scenario

GIB = 2**30


@pytest.fixture
def node(tmp_path: Path) -> Path:
    conf = tmp_path / "clusterctl.toml"
    conf.write_text(f'[paths]\nstate_dir = "{tmp_path / "state"}"\nrun_dir = "{tmp_path / "run"}"\n'
                    '[ollama]\nurl = "http://127.0.0.1:9"\n')
    return conf


def gpus(tmp_path: Path, *cards: dict[str, Any]) -> dict[str, str]:
    scenario = write_scenario(tmp_path / "scenario.json",
                              {"driver_version": "580.95.05", "gpus": list(cards)})
    return {"PYTHONPATH": f"{FAKE_NVML_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "FAKE_NVML_SCENARIO": str(scenario)}


def cli(conf: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != "CLUSTERCTL_CONFIG"} | env
    return subprocess.run([sys.executable, "-m", "clusterctl", "gpu", *args, "--config",
                           str(conf)], capture_output=True, text=True, env=full, timeout=60,
                          check=False)


CARD0 = {**H100, "uuid": "GPU-0", "pci_bus_id": "00000000:19:00.0", "memory_used": 10 * GIB,
         "utilization_gpu": 70, "temperature": 66}
CARD1 = {**A100, "uuid": "GPU-1", "pci_bus_id": "00000000:9A:00.0", "memory_used": 20 * GIB,
         "utilization_gpu": 5, "temperature": 48,
         "processes": [{"pid": 777, "name": "ollama", "used_memory": 20 * GIB}]}


def test_status_json_is_the_api_shape_with_nulls_not_zeros(node: Path,
                                                                      tmp_path: Path) -> None:
    env = gpus(tmp_path, CARD0, {**CARD1, "fan_percent": None, "lost": False})
    data = json.loads(cli(node, env, "status", "--json").stdout)
    assert data["driver_version"] == "580.95.05"
    first, second = data["gpus"]
    assert {"id", "name", "uuid", "utilization", "memory", "temperature", "power_usage",
            "clock_speeds"} <= set(first)
    assert first["id"] == "gpu-0" and first["uuid"] == "GPU-0"
    assert isinstance(total := H100["memory_total"], int)
    assert first["memory"] == {"total": total // 2**20, "used": 10240,
                               "free": (total - 10 * GIB) // 2**20}
    assert first["clock_speeds"] == {"graphics": 1980, "sm": 1980, "memory": 2619}
    assert (first["temperature"], first["power_usage"], first["fan"]) == (66, 70.0, None)
    assert (first["state"], first["speed_multiplier"]) == ("normal", 0.8)
    assert second["processes"] == [{"pid": 777, "name": "ollama", "used_memory": 20480}]
    text = cli(node, env, "status").stdout
    assert "gpu 1: pid 777 ollama 20480 MiB" in text


def test_a_lost_gpu_is_reported_and_the_other_still_is(node: Path, tmp_path: Path) -> None:
    env = gpus(tmp_path, {**CARD0, "lost": True}, CARD1)
    data = json.loads(cli(node, env, "status", "--json").stdout)
    assert [g["lost"] for g in data["gpus"]] == [True, False]
    assert data["gpus"][0]["temperature"] is None
    assert data["gpus"][1]["temperature"] == 48
    health = cli(node, env, "health")
    assert health.returncode == 1
    assert "GPU 0 is lost" in health.stdout


def test_placement_picks_the_least_busy_gpu_that_fits(node: Path, tmp_path: Path) -> None:
    env = gpus(tmp_path, CARD0, CARD1)
    first = cli(node, env, "place", "llama-70b", "--vram", "40000", "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["gpu"] == 1  # 5 % busy beats 70 %
    again = json.loads(cli(node, env, "place", "llama-70b", "--vram", "40000",
                           "--json").stdout)
    assert again["gpu"] == 1 and again["already_placed"]
    # GPU 1: 81920 - 20480 used - 40000 handed out (not yet visible) - 512 = 20928 left
    second = json.loads(cli(node, env, "place", "mistral", "--vram", "30000", "--json").stdout)
    assert second["gpu"] == 0  # no longer fits on GPU 1
    pinned = cli(node, env, "place", "embed", "--vram", "30000", "--gpu", "1")
    assert pinned.returncode == 1
    assert pinned.stderr == ("clusterctl: no GPU has 30000 MiB for embed: GPU 1 has 20928 MiB "
                             "to give (free 61440 - 40000 handed out, not yet in use - 512 "
                             "kept back); release an allocation (clusterctl gpu allocations), "
                             "or ask for less\n")
    listing = json.loads(cli(node, env, "allocations", "--json").stdout)
    assert [(a["name"], a["gpu"]) for a in listing["allocations"]] == [
        ("llama-70b", 1), ("mistral", 0)]
    assert cli(node, env, "release", "llama-70b").stdout == (
        "released llama-70b: 40000 MiB on GPU 1\n")
    assert cli(node, env, "release", "llama-70b").stdout == "llama-70b was not placed\n"
    assert cli(node, env, "place", "embed", "--vram", "30000", "--gpu", "1").returncode == 0


def test_loaded_models_are_not_counted_twice(node: Path, tmp_path: Path) -> None:
    env = gpus(tmp_path, CARD1)
    assert cli(node, env, "place", "qwen", "--vram", "30000").returncode == 0
    # the model loads: NVML now sees 30000 MiB more in use on that GPU
    env = gpus(tmp_path, {**CARD1, "memory_used": 20 * GIB + 30000 * 2**20})
    rooms = json.loads(cli(node, env, "allocations", "--json").stdout)["gpus"]
    assert rooms[0]["pending_mib"] == 0
    assert rooms[0]["available_mib"] == 81920 - 20480 - 30000 - 512


def test_two_processes_placing_at_once_never_oversubscribe(node: Path, tmp_path: Path) -> None:
    """Two `gpu place` for 50000 MiB each on one GPU with 81920 MiB free, lined up at the
    NVML boundary: each waits at its memory read until the other has read too (or for
    6 s: the one holding the lock keeps the other from arriving). Exactly one is placed,
    the other refused with what the GPU has left, and the ledger holds one allocation."""
    barrier = tmp_path / "barrier"
    scenario = write_scenario(tmp_path / "scenario.json", {
        "gpus": [{**CARD1, "memory_used": 0}],
        "barrier": {"at": "nvmlDeviceGetMemoryInfo", "dir": str(barrier), "parties": 2,
                    "timeout_s": 6}})
    env = {"PYTHONPATH": f"{FAKE_NVML_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "FAKE_NVML_SCENARIO": str(scenario)}
    full = {k: v for k, v in os.environ.items() if k != "CLUSTERCTL_CONFIG"} | env
    procs = [subprocess.Popen([sys.executable, "-m", "clusterctl", "gpu", "place", f"job-{i}",
                               "--vram", "50000", "--config", str(node)], env=full,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = [(p.wait(timeout=60), p.stderr.read() if p.stderr else "") for p in procs]
    assert len(list(barrier.iterdir())) == 2  # both read the GPU's memory
    assert sorted(code for code, _ in results) == [0, 1], results
    refused = next(err for code, err in results if code == 1)
    assert refused.startswith("clusterctl: no GPU has 50000 MiB for job-"), refused
    assert "(free 81920 - 50000 handed out, not yet in use" in refused  # the other's
    ledger = json.loads((tmp_path / "state/gpu-allocations.json").read_text())
    assert [a["vram_mib"] for a in ledger["allocations"]] == [50000]


def test_throttle_plan_changes_nothing_and_says_what_it_would_do(node: Path,
                                                                 tmp_path: Path) -> None:
    hot = {**CARD0, "temperature": 87}
    env = gpus(tmp_path, hot, {**CARD1, "temperature": 93})
    data = json.loads(cli(node, env, "throttle", "plan", "--json").stdout)
    assert data["enabled"] is False
    moves = [(p["gpu"], p["state"], p["move"], p["limit_w"]) for p in data["plan"]]
    assert moves == [(0, "throttled", "lower", 630.0), (1, "critical", "floor", 350.0)]
    text = cli(node, env, "throttle", "plan").stdout
    assert "throttling is off: nothing would be applied" in text
    assert not (tmp_path / "state/originals.json").exists()
    assert cli(node, env, "throttle", "status").stdout.startswith("throttling off")


def test_no_driver_is_one_clear_line(node: Path, tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path / "s.json", {"init_error": 12})
    env = {"PYTHONPATH": str(FAKE_NVML_DIR), "FAKE_NVML_SCENARIO": str(scenario)}
    assert cli(node, env, "status").stdout == (
        "no GPU: no NVIDIA driver: libnvidia-ml.so.1 was not found; install the NVIDIA driver "
        "if this node has an NVIDIA GPU\n")
    placed = cli(node, env, "place", "x", "--vram", "10")
    assert placed.returncode == 1
    assert placed.stderr.startswith("clusterctl: no GPU to place x on: no NVIDIA driver")


def test_watch_keeps_the_history_that_trend_reads(node: Path, tmp_path: Path) -> None:
    env = gpus(tmp_path, {**CARD0, "temperature": [60, 63, 66, 69]})
    watched = cli(node, env, "watch", "--count", "4", "--interval", "0.2")
    assert watched.returncode == 0, watched.stderr
    assert "H100" in watched.stdout and watched.stderr == ""
    assert not (tmp_path / "state/events.jsonl").exists()  # a viewer records nothing
    trend = json.loads(cli(node, env, "trend", "--json").stdout)
    assert (trend["min_temp"], trend["max_temp"], trend["samples"]) == (60, 69, 4)
    assert trend["trend"] == "rising"
    fresh = cli(node, env, "trend", "--gpu", "0", "--sample", "1")
    assert fresh.stdout.startswith("GPU 0: 63 C now")  # a new process: the timeline anew
    assert "2 samples" in fresh.stdout
    nothing = cli(node, gpus(tmp_path, CARD1), "trend", "--gpu", "0")
    assert "no samples of GPU 0" in nothing.stdout  # GPU-1 was never watched


def test_throttle_reset_gives_back_what_it_can_and_fails_for_a_gpu_that_refuses(
        node: Path, tmp_path: Path) -> None:
    """Two GPUs lowered by clusterctl; GPU 0 refuses its limit now (no permission): GPU 1
    still gets its original back, GPU 0 keeps its record, and the command says so and
    exits 1 so that a script notices."""
    from clusterctl.gpu import power
    from clusterctl.gpu.throttle import Throttled

    state = tmp_path / "state"
    power.save(state, {"GPU-0": Throttled("GPU-0", 700.0, 630.0, 1.0),
                       "GPU-1": Throttled("GPU-1", 400.0, 360.0, 1.0)})
    calls = tmp_path / "calls.log"
    env = gpus(tmp_path, {**CARD0, "errors": {"nvmlDeviceSetPowerManagementLimit": 4}}, CARD1)
    done = cli(node, env | {"FAKE_NVML_CALLS_LOG": str(calls)}, "throttle", "reset")
    assert done.returncode == 1, done.stderr
    assert ("GPU 0: no permission to set its power limit; run as root; its original 700 W "
            "kept on record") in done.stdout
    assert "GPU 1: power limit back to 400 W" in done.stdout
    assert calls.read_text() == "GPU-1 400000\n"
    assert set(power.load(state)) == {"GPU-0"}
    assert "1 GPU power limit(s) not given back" in done.stderr
