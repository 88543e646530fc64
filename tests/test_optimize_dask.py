"""A real Dask worker, started the way clusterctl-dask-worker.service starts it, from the
env file and YAML optimize writes, reports the planned threads and memory limit to a
local scheduler and runs with the planned memory thresholds."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusterctl.config import Config, OptimizeConfig
from clusterctl.optimize.plan import DASK_ENV_FILE, DASK_YAML_FILE, parse_env, plan
from tests.conftest import REPO
from tests.fakes.control_plane import free_port
from tests.test_optimize_plan import facts

pytestmark = pytest.mark.integration
distributed = pytest.importorskip("distributed")
DASK = Path(sys.executable).parent / "dask"



def unit_command(env: dict[str, str], state_dir: Path) -> list[str]:
    """The unit's ExecStart with systemd's ${VAR} expansion, `dask` from this venv."""
    unit = (REPO / "units/clusterctl-dask-worker.service").read_text()
    line = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    values = {**env, "STATE_DIRECTORY": str(state_dir)}
    argv = [re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], word)
            for word in line.removeprefix("ExecStart=").split()]
    assert argv[:2] == ["/usr/bin/env", "dask"]
    return [str(DASK), *argv[2:]]


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in reversed(started):
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_worker_from_the_env_file_reports_the_planned_resources(
        tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    if not DASK.exists() or shutil.which("env") is None:
        pytest.skip("the dask command is not installed next to this Python")
    port = free_port()
    config = Config(optimize=OptimizeConfig(dask_scheduler=f"tcp://127.0.0.1:{port}",
                                            dask_target=0.55, dask_spill=0.65))
    # a 4-core, "16 GB" node: intermediate tier -> 4 workers, 1 thread each, 3GB
    the_plan = plan(facts(cores=4, memtotal_kib=16_310_000, vram_mib=(8188,)), config)
    files = {f.path: f.content for f in the_plan.files}
    env = parse_env(files[DASK_ENV_FILE])
    assert (env["DASK_NWORKERS"], env["DASK_NTHREADS"], env["DASK_MEMORY_LIMIT"]) == (
        "4", "1", "3GB")
    dask_dir = tmp_path / "etc-dask"
    dask_dir.mkdir()
    (dask_dir / "clusterctl.yaml").write_text(files[DASK_YAML_FILE])
    run_env = {**os.environ, "DASK_CONFIG": str(dask_dir)}  # stands for /etc/dask
    logs = tmp_path / "logs"
    logs.mkdir()
    processes.append(subprocess.Popen(
        [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", str(port),
         "--dashboard-address", ":0"], env=run_env,
        stdout=(logs / "scheduler.log").open("wb"), stderr=subprocess.STDOUT))
    state = tmp_path / "state"
    state.mkdir()
    processes.append(subprocess.Popen(
        unit_command(env, state), env=run_env,
        stdout=(logs / "worker.log").open("wb"), stderr=subprocess.STDOUT))
    client = distributed.Client(env["DASK_SCHEDULER_ADDRESS"], timeout=30)
    try:
        client.wait_for_workers(4, timeout=60)
        workers = client.scheduler_info()["workers"].values()
        assert sorted(w["nthreads"] for w in workers) == [1, 1, 1, 1]
        assert {w["memory_limit"] for w in workers} == {3 * 10**9}
        fractions = client.run(lambda: {k: distributed.worker.dask.config.get(
            f"distributed.worker.memory.{k}") for k in ("target", "spill", "pause",
                                                        "terminate")})
        assert set(map(str, fractions.values())) == {str({"target": 0.55, "spill": 0.65,
                                                          "pause": 0.8, "terminate": 0.95})}
        assert client.submit(sum, [1, 2, 3]).result(timeout=30) == 6
    finally:
        client.close()  # the fixture stops the worker and the scheduler
