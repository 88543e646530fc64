"""The disposable systemd itself: it boots, it is private, and it always dies."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.systemd_sandbox import Sandbox, SandboxError, unavailable

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    reason = unavailable()
    if reason:
        pytest.skip(f"no systemd sandbox here: {reason}")
    with Sandbox(tmp_path_factory.mktemp("sandbox")) as booted:
        print(f"sandbox booted in {booted.boot_s:.2f} s")
        yield booted


def test_systemd_is_pid_1_inside_and_the_system_is_running(sandbox: Sandbox) -> None:
    assert sandbox.run(["cat", "/proc/1/comm"]).stdout == "systemd\n"
    assert sandbox.run(["systemctl", "is-system-running"]).stdout == "running\n"
    assert sandbox.run(["systemd-detect-virt", "--container"]).stdout == "container-other\n"
    assert sandbox.run(["hostname"]).stdout == "clusterctl-sandbox\n"
    assert os.uname().nodename != "clusterctl-sandbox"


def test_nothing_written_inside_reaches_the_host(sandbox: Sandbox, tmp_path: Path) -> None:
    marker = tmp_path / "host-file"  # under the host's /tmp, which systemd-tmpfiles cleans
    marker.write_text("still here")
    sandbox.run("echo x > /etc/clusterctl-sandbox-probe && mkdir -p /opt/probe /var/lib/probe"
                " && touch /usr/local/bin/probe /root/probe")
    for path in ("/etc/clusterctl-sandbox-probe", "/opt/probe", "/var/lib/probe",
                 "/usr/local/bin/probe", "/root/probe"):
        assert not Path(path).exists(), path
    sandbox.run(["systemd-tmpfiles", "--clean", "--remove"])
    assert marker.read_text() == "still here"
    assert sandbox.run(["ls", "-A", "/tmp"]).stdout == ""


def test_the_hosts_enabled_services_stay_on_the_host(sandbox: Sandbox) -> None:
    units = sandbox.run(["systemctl", "list-units", "--plain", "--no-legend", "--state=active",
                         "--type=service,timer"]).stdout
    names = {line.split()[0] for line in units.splitlines()}
    assert not {n for n in names if n.startswith(("getty", "postgres", "apt-", "cron"))}
    assert sandbox.run(["systemctl", "is-enabled", "systemd-sysctl.service"],
                       check=False).stdout.strip() == "masked"
    assert sandbox.run(["systemctl", "list-units", "--no-legend", "--type=swap"]).stdout == ""


def test_a_failed_command_inside_says_what_and_why(sandbox: Sandbox) -> None:
    with pytest.raises(SandboxError, match=r"'ls /nonexistent' exited 2:\n.*No such file"):
        sandbox.run(["ls", "/nonexistent"])


def test_pid_1_is_killed_even_when_the_block_raises(tmp_path: Path) -> None:
    if unavailable():
        pytest.skip(f"no systemd sandbox here: {unavailable()}")
    box = Sandbox(tmp_path / "box")
    pid = None
    with pytest.raises(RuntimeError, match="a failing test"), box:
        pid = box.pid
        assert pid is not None and Path(f"/proc/{pid}").exists()
        raise RuntimeError("a failing test")
    assert pid is not None and not Path(f"/proc/{pid}").exists()
    assert box.pid is None


def test_the_command_line_tool_runs_a_command_inside(tmp_path: Path) -> None:
    if unavailable():
        pytest.skip(f"no systemd sandbox here: {unavailable()}")
    script = Path(__file__).parent.parent / "scripts" / "systemd_sandbox.py"
    result = subprocess.run([str(script), "--workdir", str(tmp_path / "w"), "run", "--",
                             "systemctl", "is-system-running"], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "running\n"
    assert "systemd-sandbox: booted in " in result.stderr
