"""The real installed console script, run as an operator would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import A100, FAKE_NVML_DIR, HOSTS, write_scenario
from tests.hosttree import HostTree
from tests.terminal import run_with_terminal_stderr

pytestmark = pytest.mark.integration

CLUSTERCTL = Path(sys.executable).parent / "clusterctl"


def run(*args: str, env: dict[str, str] | None = None, **kw: object
        ) -> subprocess.CompletedProcess[str]:
    if not CLUSTERCTL.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("CLUSTERCTL_CONFIG", "JOURNAL_STREAM")}
    full_env.update(env or {})
    return subprocess.run([str(CLUSTERCTL), *args], capture_output=True, text=True,
                          env=full_env, timeout=60, check=False, **kw)  # type: ignore[call-overload]


def test_version_and_help() -> None:
    assert run("--version").stdout.startswith("clusterctl ")
    result = run("--help")
    assert result.returncode == 0 and "check" in result.stdout


def test_check_on_this_machine(conf: Path) -> None:
    """The real host, the real pynvml: whatever this machine is, a report comes back."""
    result = run("check", "quick", "--json", "--config", str(conf))
    data = json.loads(result.stdout)
    assert result.returncode == (0 if data["ready"] else 1)
    assert data["cpu"]["logical_cores"] == os.cpu_count()
    assert data["cpu"]["usage_percent"] is not None  # sampled for real
    assert data["memory"]["total_bytes"] > 0
    if not data["gpus"]:
        assert data["gpu_reason"]
    assert result.stderr == ""


def test_check_with_the_fake_nvml_on_the_python_path(tmp_path: Path, conf: Path) -> None:
    scenario = write_scenario(tmp_path / "gpus.json", {"gpus": [A100, A100]})
    env = {"PYTHONPATH": str(FAKE_NVML_DIR), "FAKE_NVML_SCENARIO": str(scenario)}
    result = run("check", "--json", "--root", str(HOSTS / "ci-vm"), "--config", str(conf),
                 env=env)
    data = json.loads(result.stdout)
    assert [g["name"] for g in data["gpus"]] == ["NVIDIA A100-SXM4-80GB"] * 2


def test_bad_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[swap]\nmax_size = 16G\n")
    result = run("check", env={"CLUSTERCTL_CONFIG": str(bad)})
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"clusterctl: {bad}:2: TOML syntax error")


def test_under_systemd_logs_carry_priorities(tmp_path: Path, conf: Path) -> None:
    """stderr is the journal stream: lines get <N> prefixes journald turns into levels."""
    scenario = write_scenario(tmp_path / "none.json", {"init_error": 9})
    stderr = tmp_path / "journal"
    with stderr.open("w") as handle:
        st = os.fstat(handle.fileno())
        env = {"PYTHONPATH": str(FAKE_NVML_DIR), "FAKE_NVML_SCENARIO": str(scenario),
               "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        if not CLUSTERCTL.exists():
            pytest.skip("console script not installed")
        subprocess.run([str(CLUSTERCTL), "check", "--json", "-vv", "--root",
                        str(HOSTS / "ci-vm"), "--config", str(conf)],
                       stdout=subprocess.DEVNULL, stderr=handle, env={**os.environ, **env},
                       timeout=60, check=False)
    lines = stderr.read_text().splitlines()
    assert "<7>NVML unavailable: the NVIDIA kernel driver is not loaded" in lines
    assert all(line.startswith("<") for line in lines)


def test_check_full_at_a_terminal_shows_progress_and_cleans_up(tmp_path: Path) -> None:
    """stderr on a real pseudo-terminal: the progress bar path, end to end."""
    if not CLUSTERCTL.exists():
        pytest.skip("console script not installed")
    root = (HostTree(tmp_path / "host").system().sample("laptop")
            .disk("nvme0n1", "259:0", rotational=0, partitions={"nvme0n1p2": "259:2"})
            .mount("/", "ext4", "259:2", "/dev/nvme0n1p2")).root
    swap_dir = root / "var/lib/clusterctl/swap"
    swap_dir.mkdir(parents=True)
    conf = tmp_path / "c.toml"
    conf.write_text('[ollama]\nurl = "http://127.0.0.1:9"\n')
    scenario = write_scenario(tmp_path / "none.json", {"init_error": 12})
    env = {**os.environ, "PYTHONPATH": str(FAKE_NVML_DIR), "FAKE_NVML_SCENARIO": str(scenario)}
    code, terminal, stdout = run_with_terminal_stderr(
        [str(CLUSTERCTL), "check", "full", "--root", str(root), "--config", str(conf)], env)
    assert code == 0, terminal.decode(errors="replace")
    assert b"write test" in terminal  # the progress bar was drawn on the terminal
    assert "Write test" in stdout  # and the result is in the report
    assert list(swap_dir.iterdir()) == []
