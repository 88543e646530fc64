"""`check` recommends what `optimize` would write: one planner, for every setting both show.

An operator reads `clusterctl check` and then `clusterctl optimize plan`; on the same node
they must name the same settings with the same values (and the same reasons), whatever the
hardware: a 2-core VM with 23.5 GiB, a laptop without a GPU running Ollama on the CPU, an
old 4-core box below its tier's memory figure, GPU servers with one or two H100s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from typer.testing import CliRunner

from clusterctl.cli import app
from clusterctl.cli.optimize_cmd import plan_dict
from clusterctl.config import Config, OllamaConfig
from clusterctl.host import Nvml
from clusterctl.optimize.executor import plan_now
from tests.conftest import H100, HOSTS
from tests.hosttree import HostTree, gpu_server, laptop, old_kernel

CONFIG = Config(ollama=OllamaConfig(url="http://127.0.0.1:9"))
CLUSTERCTL = Path(sys.executable).parent / "clusterctl"


def with_ollama(tree: HostTree) -> HostTree:
    return tree.file("usr/local/bin/ollama", "")


def with_dask(tree: HostTree) -> HostTree:
    site = tree.root / "usr/lib/python3/dist-packages"
    for dist in ("dask-2024.8.0.dist-info", "distributed-2024.8.0.dist-info"):
        (site / dist).mkdir(parents=True, exist_ok=True)
    return tree


def copied(name: str) -> Callable[[Path], HostTree]:
    def make(root: Path) -> HostTree:
        shutil.copytree(HOSTS / name, root, symlinks=True)
        return HostTree(root)
    return make


# name: (tree, GPUs that NVML reports, Ollama installed, Dask installed)
SHAPES: dict[str, tuple[Callable[[Path], HostTree], int, bool, bool]] = {
    # the node of the report: 2 cores, 23.5 GiB, HDD, no GPU; check said 1.5GB, optimize 10GB
    "2-core VM with Dask": (copied("ci-vm"), 0, False, True),
    "2-core VM with Dask and Ollama on the CPU": (copied("ci-vm"), 0, True, True),
    "8-thread laptop, Ollama on the CPU": (laptop, 0, True, True),
    "4-core box below its tier's memory figure": (old_kernel, 0, False, True),
    "16-core VM with one H100": (copied("h100-vm"), 1, True, True),
    "64-core server with two H100s, Ollama only": (gpu_server, 2, True, False),
}


def values(entries: Any) -> dict[str, str]:
    """{key: value} of a list of settings as `optimize plan --json` prints them."""
    assert isinstance(entries, list), f"not a list of the planner's settings: {entries}"
    return {entry["key"]: entry["value"] for entry in entries}


@pytest.mark.parametrize("shape", SHAPES)
def test_check_recommends_what_optimize_would_write(
        shape: str, tmp_path: Path, fake_nvml: ModuleType) -> None:
    build, gpus, ollama, dask = SHAPES[shape]
    tree = build(tmp_path / "host")
    if ollama:
        with_ollama(tree)
    if dask:
        with_dask(tree)
    if gpus:
        fake_nvml.configure({"gpus": [{**H100, "uuid": f"GPU-{i}"} for i in range(gpus)]})
    else:
        fake_nvml.configure({"init_error": 12})  # no driver
    conf = tmp_path / "clusterctl.toml"
    conf.write_text('[ollama]\nurl = "http://127.0.0.1:9"\n')

    result = CliRunner().invoke(app, ["check", "--json", "--root", str(tree.root),
                                      "--config", str(conf)])
    assert result.exit_code in (0, 1), result.output  # 1: below the minimum, still a report
    checked = json.loads(result.stdout)
    with Nvml() as nvml:
        planned = plan_dict(*plan_now(CONFIG, root=tree.root, nvml=nvml))

    assert checked["tier"] == planned["tier"]
    assert values(checked["recommendations"]) == values(planned["settings"])
    assert checked["recommendations"] == planned["settings"]  # with the reasons and floors
    assert checked["recommendations_skipped"] == planned["skipped"]
    if dask:
        assert "DASK_MEMORY_LIMIT" in values(checked["recommendations"])


def run(*args: str) -> subprocess.CompletedProcess[str]:
    if not CLUSTERCTL.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    env = {k: v for k, v in os.environ.items() if k not in ("CLUSTERCTL_CONFIG",
                                                            "JOURNAL_STREAM")}
    return subprocess.run([str(CLUSTERCTL), *args], capture_output=True, text=True, env=env,
                          timeout=60, check=False)


@pytest.mark.integration
def test_on_this_machine_check_and_optimize_plan_print_the_same_settings(conf: Path) -> None:
    """The real console script on the real host (read only): both commands, one plan."""
    check = run("check", "--json", "--config", str(conf))
    assert check.returncode in (0, 1), check.stderr
    plan = run("optimize", "plan", "--json", "--config", str(conf))
    assert plan.returncode == 0, plan.stderr
    checked, planned = json.loads(check.stdout), json.loads(plan.stdout)
    assert checked["tier"] == planned["tier"]
    assert values(checked["recommendations"]) == values(planned["settings"])
    assert checked["recommendations"] == planned["settings"]
    assert checked["recommendations_skipped"] == planned["skipped"]


def test_a_file_optimize_cannot_read_costs_the_recommendations_not_the_check(
        tmp_path: Path, fake_nvml: ModuleType) -> None:
    """`optimize plan` refuses a node where one of its files is unreadable; `check` says so
    as a finding and still reports everything else."""
    fake_nvml.configure({"init_error": 12})
    tree = with_dask(copied("ci-vm")(tmp_path / "host"))
    (tree.root / "etc/clusterctl/dask-worker.env").mkdir(parents=True)  # not a readable file
    conf = tmp_path / "clusterctl.toml"
    conf.write_text('[ollama]\nurl = "http://127.0.0.1:9"\n')
    result = CliRunner().invoke(app, ["check", "--json", "--root", str(tree.root),
                                      "--config", str(conf)])
    assert result.exit_code == 0, result.output
    checked = json.loads(result.stdout)
    assert checked["recommendations"] == []
    finding = next(f for f in checked["findings"] if f["code"] == "optimize.unreadable")
    assert finding["severity"] == "warn"
    assert "/etc/clusterctl/dask-worker.env" in finding["message"]
    assert checked["tier"] == "basic" and checked["cpu"]["logical_cores"] == 2
