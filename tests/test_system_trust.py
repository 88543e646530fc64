"""The host-changing layer under attack: a hibernate command that leaves children behind
or is not a program, a file write into a directory with planted links, and install.sh
run with a umask that would leave what it installs writable by everyone."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusterctl import system
from clusterctl.errors import HostError
from clusterctl.system.sleep import run_command
from tests.conftest import REPO


def alive(pid: int) -> bool:
    """``pid`` runs (exists and is not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def live_in_group(group: int) -> list[int]:
    """Processes of process group ``group`` that are not zombies (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp ...
        if int(fields[2]) == group and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def kill_left(pids: Path) -> None:
    """End what the test started and a broken run_command left running, by pid."""
    if not pids.exists():
        return
    numbers = [int(x) for x in pids.read_text().split()]
    for pid in {*numbers[1:], *live_in_group(numbers[0])}:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_timed_out_command_takes_everything_it_started_with_it(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = (f"echo $$ > {pids}; sleep 300 >/dev/null 2>&1 & echo $! >> {pids}; "
              f"sleep 300 >/dev/null 2>&1 & echo $! >> {pids}; wait")
    started = time.monotonic()
    try:
        with pytest.raises(HostError, match=r"sh did not finish in 0.5 s \(killed\)"):
            run_command(("sh", "-c", script), 0.5)
        took = time.monotonic() - started
        leader, *children = (int(x) for x in pids.read_text().split())
        time.sleep(0.2)  # init reaps the orphans
        assert [pid for pid in children if alive(pid)] == []
        assert live_in_group(leader) == []
        assert took < 5
    finally:  # what a broken run_command leaves behind, ended by its pid
        kill_left(pids)


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = (f"echo $$ > {pids}; (trap '' TERM; exec sleep 300 >/dev/null 2>&1) & "
              f"echo $! >> {pids}; wait")
    try:
        with pytest.raises(HostError, match="killed"):
            run_command(("sh", "-c", script), 0.5)
        time.sleep(0.2)
        leader, stubborn = (int(x) for x in pids.read_text().split())
        assert not alive(stubborn)
        assert live_in_group(leader) == []
    finally:
        kill_left(pids)


def test_a_command_that_is_not_a_program_is_a_clear_error(tmp_path: Path) -> None:
    script = tmp_path / "snapshot"
    script.write_text("echo no shebang line\n")
    script.chmod(0o755)
    with pytest.raises(HostError) as caught:
        run_command((str(script),), 5)
    assert caught.value.one_line() == (f"cannot run {script}: Exec format error; "
                                       "fix [hibernate] command")


# What a chatty command's output may cost the agent: run_command in a process of its own,
# its peak RSS (VmHWM, KiB) before and after, and what it returned or raised.
_CHATTY = """
import sys
from pathlib import Path
from clusterctl.errors import HostError
from clusterctl.system.sleep import run_command
def hwm_kib():
    line = next(x for x in Path("/proc/self/status").read_text().splitlines()
                if x.startswith("VmHWM:"))
    return int(line.split()[1])
before = hwm_kib()
try:
    said = run_command(("sh", "-c", sys.argv[1]), 60)
except HostError as err:
    said = err.one_line()
print(before, hwm_kib(), said)
"""


@pytest.mark.parametrize(("script", "said"), [
    ("yes | head -c 500000000; echo the last line", "the last line"),
    ("yes | head -c 500000000; echo failed here >&2; exit 3", "sh exited 3: failed here"),
])
def test_a_chatty_command_runs_in_bounded_memory(script: str, said: str) -> None:
    """~500 MB of output: the agent's peak memory grows by a few MiB at most (it was the
    whole output, twice), and the last line is still what is reported."""
    done = subprocess.run([sys.executable, "-c", _CHATTY, script], capture_output=True,
                          text=True, timeout=120, check=True)
    before_kib, after_kib, got = done.stdout.split(maxsplit=2)
    assert got.strip() == said
    assert int(after_kib) - int(before_kib) < 32 * 1024, done.stdout


def test_an_atomic_write_never_follows_a_planted_link(tmp_path: Path) -> None:
    secret = tmp_path / "shadow"
    secret.write_text("root-only\n")
    secret.chmod(0o600)
    shared = tmp_path / "dir"
    shared.mkdir()
    target = shared / "out.prom"
    target.symlink_to(secret)  # the target itself is a link to the secret
    for guess in (".out.prom.tmp", "out.prom.tmp", f"out.prom.{os.getpid()}"):
        (shared / guess).symlink_to(secret)
    system.atomic_write_text(target, "metrics\n", mode=0o644, keep_owner=False)
    assert secret.read_text() == "root-only\n" and (secret.stat().st_mode & 0o777) == 0o600
    assert not target.is_symlink() and target.read_text() == "metrics\n"
    assert (target.stat().st_mode & 0o777) == 0o644  # not the link target's mode


@pytest.mark.integration
def test_install_sh_ignores_a_permissive_caller_umask(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("install.sh may install build packages with apt; run as root")
    root = tmp_path / "stage"
    env = {k: v for k, v in os.environ.items() if k not in ("CLUSTERCTL_CONFIG", "VIRTUAL_ENV")}
    result = subprocess.run(["sh", "-c", 'umask 000 && exec "$0" --root "$1" --no-check',
                             str(REPO / "install.sh"), str(root)], capture_output=True,
                            text=True, timeout=600, env=env, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    writable = [f"{path.relative_to(root)} {stat.S_IMODE(path.lstat().st_mode):04o}"
                for path in root.rglob("*")
                if not path.is_symlink() and path.lstat().st_mode & 0o022]
    assert writable == []
    assert (root / "var/lib/clusterctl/install.manifest").stat().st_mode & 0o777 == 0o644
