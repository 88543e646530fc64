"""Real swap on loop-mounted ext4, XFS and btrfs made by the tests (root only).

Each test runs the real `clusterctl swap` commands (or the executor) against
a filesystem of its own; ``loop_mount`` swaps off and unmounts even when a
test fails. Sizes are small (64M files) so the suite stays quick.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from clusterctl import config as cfg
from clusterctl.errors import HostError
from clusterctl.system import swapfiles
from clusterctl.units import MIB
from tests.cgroups import memory_cgroup, run_in
from tests.loopfs import active_swaps_under, loop_mount, require_loop, swapoff_under
from tests.terminal import run_with_terminal_stderr

pytestmark = pytest.mark.integration


@dataclass
class Node:
    """A loop filesystem with a swap dir and a config pointing at it."""

    mount: Path
    swap_dir: Path
    state: Path
    conf: Path

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "clusterctl", "swap", *args,
                                 "--config", str(self.conf)],
                                capture_output=True, text=True, timeout=120, check=False)
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result

    def status(self) -> dict:  # type: ignore[type-arg]
        return json.loads(self.cli("status", "--json", check=True).stdout)

    def events(self) -> list[dict]:  # type: ignore[type-arg]
        path = self.state / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] \
            if path.exists() else []

    def config(self) -> cfg.Config:
        return cfg.load(self.conf).config


def make_node(workdir: Path, mount: Path, *, extra: str = "", swap_dir: Path | None = None
              ) -> Node:
    swap_dir = swap_dir or mount / "swap"
    state = workdir / "state"
    conf = workdir / "clusterctl.toml"
    conf.write_text(
        f'[swap]\ndir = "{swap_dir}"\nmin_size = "128M"\nmax_size = "512M"\n'
        f'increment = "64M"\n{extra}\n'
        f'[paths]\nstate_dir = "{state}"\nrun_dir = "{workdir / "run"}"\n')
    return Node(mount, swap_dir, state, conf)


@pytest.fixture(params=["ext4", "xfs", "btrfs"])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Node]:
    with loop_mount(tmp_path, request.param, size_mib=1024) as mount:
        yield make_node(tmp_path, mount)


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[Node]:
    with loop_mount(tmp_path, "ext4", size_mib=1024) as mount:
        yield make_node(tmp_path, mount)


# -- the life cycle on each filesystem -------------------------------------------------


def test_auto_expand_status_shrink_clean(node: Node) -> None:
    node.cli("auto", check=True)  # creates min_size: two 64M files
    status = node.status()
    assert [f["path"] for f in status["files"]] == [str(node.swap_dir / "swap-0001"),
                                                   str(node.swap_dir / "swap-0002")]
    assert all(f["active"] and f["size"] == 64 * MIB for f in status["files"])
    assert status["total"] == 128 * MIB
    areas = [line.split() for line in Path("/proc/swaps").read_text().splitlines()[1:]]
    assert status["node_swap"]["total"] == sum(int(a[2]) * 1024 for a in areas)  # all of it
    assert status["node_swap"]["free"] == sum((int(a[2]) - int(a[3])) * 1024 for a in areas)
    assert status["free_threshold_percent"] == 15
    assert "; grow under 15% free, or sooner when the agent sees it running out\n" in \
        node.cli("status", check=True).stdout
    priorities = [f["priority"] for f in status["files"]]
    assert priorities == sorted(priorities, reverse=True) and max(priorities) < 0
    assert active_swaps_under(node.swap_dir) == [f["path"] for f in status["files"]]
    for f in status["files"]:
        st = os.lstat(f["path"])
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    assert stat.S_IMODE(node.swap_dir.stat().st_mode) == 0o700

    result = node.cli("expand", "--size", "128M", check=True)
    assert result.stdout.startswith("created swap-0003 (128M)")
    assert node.status()["total"] == 256 * MIB

    node.cli("shrink", check=True)  # the newest file
    assert [Path(f["path"]).name for f in node.status()["files"]] == ["swap-0001", "swap-0002"]

    node.cli("clean", check=True)
    assert node.status()["files"] == []
    assert active_swaps_under(node.swap_dir) == []
    assert list(node.swap_dir.iterdir()) == []
    types = [e["event_type"] for e in node.events()]
    assert types == ["swap_expanded"] * 3 + ["swap_shrunk"] * 3
    assert all(e["instance_id"] and e["id"] and e["timestamp"].endswith("Z")
               for e in node.events())


def test_btrfs_swap_files_are_nocow(tmp_path: Path) -> None:
    with loop_mount(tmp_path, "btrfs", size_mib=1024) as mount:
        n = make_node(tmp_path, mount)
        n.cli("expand", check=True)
        attrs = subprocess.run(["lsattr", str(n.swap_dir / "swap-0001")], capture_output=True,
                               text=True, check=True).stdout.split()[0]
        assert "C" in attrs  # NOCOW


def test_auto_twice_does_nothing_the_second_time(ext4: Node) -> None:
    ext4.cli("auto", check=True)
    result = ext4.cli("auto", check=True)
    assert result.stdout.startswith("nothing to do: memory")
    assert len(ext4.events()) == 2


def test_dry_run_changes_nothing(ext4: Node) -> None:
    result = ext4.cli("auto", "--dry-run", check=True)
    assert result.stdout.splitlines() == [
        "would create swap-0001 (64M): managed swap 0B is below min_size 128M",
        "would create swap-0002 (64M): managed swap 0B is below min_size 128M",
    ]
    assert not ext4.swap_dir.exists() or list(ext4.swap_dir.iterdir()) == []
    assert ext4.events() == []


# -- refusals ------------------------------------------------------------------------


def test_a_tmpfs_swap_dir_is_refused(tmp_path: Path) -> None:
    require_loop()
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(mount)], check=True)
    try:
        n = make_node(tmp_path, mount)
        result = n.cli("expand")
        assert result.returncode == 1
        assert "is on tmpfs: tmpfs lives in memory" in result.stderr
        assert "local ext4, XFS or btrfs" in result.stderr
        auto = n.cli("auto")
        assert auto.returncode == 1 and "swap cannot grow" in auto.stderr
        assert not n.swap_dir.exists() or list(n.swap_dir.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_symlinked_swap_dir_is_refused(tmp_path: Path) -> None:
    with loop_mount(tmp_path, "ext4") as mount:
        real = mount / "real"
        real.mkdir(mode=0o700)
        link = mount / "swap"
        link.symlink_to(real)
        n = make_node(tmp_path, mount, swap_dir=link)
        result = n.cli("expand")
        assert result.returncode == 1
        assert f"swap dir {link} is a symlink" in result.stderr
        assert list(real.iterdir()) == []


def test_a_world_writable_swap_dir_is_refused(tmp_path: Path) -> None:
    with loop_mount(tmp_path, "ext4") as mount:
        swap_dir = mount / "swap"
        swap_dir.mkdir()
        swap_dir.chmod(0o777)
        n = make_node(tmp_path, mount)
        result = n.cli("expand")
        assert result.returncode == 1
        assert "writable by group or others (mode 0777)" in result.stderr
        assert list(swap_dir.iterdir()) == []


def test_a_filesystem_too_small_for_the_floor_is_refused(tmp_path: Path) -> None:
    with loop_mount(tmp_path, "ext4", size_mib=320) as mount:
        n = make_node(tmp_path, mount)
        result = n.cli("expand", "--size", "256M")
        assert result.returncode == 1
        assert "not enough free space on" in result.stderr
        assert "128M must stay free" in result.stderr
        assert not n.swap_dir.exists() or list(n.swap_dir.iterdir()) == []
        assert active_swaps_under(mount) == []


# -- crashes, concurrency, the kernel saying no --------------------------------------


def test_a_crash_mid_create_is_cleaned_up_by_the_next_run(tmp_path: Path) -> None:
    with loop_mount(tmp_path, "ext4", size_mib=2048) as mount:
        n = make_node(tmp_path, mount, extra='allocation = "zeros"\nmax_size = "1G"')
        n.conf.write_text(n.conf.read_text().replace('max_size = "512M"\n', ""))
        proc = subprocess.Popen([sys.executable, "-m", "clusterctl", "swap", "expand", "--size",
                                 "768M", "--config", str(n.conf)])
        leftover = n.swap_dir / ".swap-0001.tmp"
        deadline = time.monotonic() + 30
        while not (leftover.exists() and leftover.stat().st_size > 0):
            assert time.monotonic() < deadline and proc.poll() is None, "create never started"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert leftover.exists()  # the crash left a half-made file...
        assert active_swaps_under(mount) == []  # ...that never became swap
        status = n.status()
        assert status["next_action"]["actions"][0] == {
            "action": "discard", "name": ".swap-0001.tmp", "size": leftover.stat().st_size,
            "used": 0, "reason": "an unfinished file left by an interrupted create"}
        n.cli("auto", check=True)
        assert sorted(p.name for p in n.swap_dir.iterdir()) == ["swap-0001", "swap-0002"]
        assert [e["event_type"] for e in n.events()] == [
            "swap_discarded", "swap_expanded", "swap_expanded"]


def test_a_crash_between_rename_and_swapon_is_recovered(ext4: Node) -> None:
    ext4.cli("expand", check=True)
    # what a crash leaves: a valid swap file under its final name, not active, not recorded
    dfd = swapfiles.open_dir(ext4.swap_dir, create=False)
    try:
        fd = os.open("swap-0002", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dfd)
        os.posix_fallocate(fd, 0, 64 * MIB)
        swapfiles.write_header(fd, 64 * MIB)
        os.close(fd)
    finally:
        os.close(dfd)
    ext4.cli("auto", check=True)
    assert active_swaps_under(ext4.swap_dir) == [str(ext4.swap_dir / "swap-0001"),
                                                 str(ext4.swap_dir / "swap-0002")]
    assert [e["event_type"] for e in ext4.events()][-2:] == ["swap_adopted", "swap_reactivated"]


def test_after_a_reboot_the_files_come_back(ext4: Node) -> None:
    ext4.cli("auto", check=True)
    for path in active_swaps_under(ext4.swap_dir):
        subprocess.run(["swapoff", path], check=True)
    ledger = ext4.state / "swap.json"
    data = json.loads(ledger.read_text())
    for entry in data["files"]:
        entry["boot_id"] = "a-previous-boot"
    ledger.write_text(json.dumps(data))
    ext4.cli("auto", check=True)
    assert len(active_swaps_under(ext4.swap_dir)) == 2
    assert [e["event_type"] for e in ext4.events()][-2:] == ["swap_reactivated"] * 2


def test_a_file_swapped_off_by_the_operator_is_noticed_and_left_off(ext4: Node) -> None:
    ext4.cli("auto", check=True)
    subprocess.run(["swapoff", str(ext4.swap_dir / "swap-0002")], check=True)
    result = ext4.cli("auto", check=True)
    assert (f"clusterctl: warning: {ext4.swap_dir}/swap-0002 was swapped off by someone else"
            in result.stderr)
    assert ext4.cli("auto", check=True).stderr == ""  # said once, not every tick
    files = {Path(f["path"]).name: f for f in ext4.status()["files"]}
    assert files["swap-0002"]["state"] == "off (swapped off by someone else)"
    assert files["swap-0003"]["active"]  # min_size is kept with a new file
    assert "swap_off_externally" in [e["event_type"] for e in ext4.events()]


def test_files_enabled_in_another_mount_namespace_are_still_known(ext4: Node) -> None:
    """A sandboxed unit enables swap through its own mounts, gone when it exits."""
    ext4.cli("auto", check=True)
    names = ("swap-0001", "swap-0002")
    for name in names:
        subprocess.run(["swapoff", str(ext4.swap_dir / name)], check=True)
    ext4.state.joinpath("swap.json").unlink()  # as on first contact: nothing recorded
    inner = ext4.mount / "inner"
    inner.mkdir()
    script = (f"mount --bind {ext4.swap_dir} {inner} && "
              + " && ".join(f"swapon {inner}/{n}" for n in names))
    subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                   check=True)
    listed = [line.split()[0] for line in Path("/proc/swaps").read_text().splitlines()[1:]]
    assert "/swap-0001" in listed  # the kernel's name for it, relative to a dead mount
    files = {Path(f["path"]).name: f for f in ext4.status()["files"]}
    assert [files[n]["state"] for n in names] == ["active", "active"]
    assert ext4.status()["other_swap"] == []
    result = ext4.cli("auto", check=True)
    assert "created" not in result.stdout and result.stderr == "", result.stdout
    assert sorted(Path(f["path"]).name for f in ext4.status()["files"]) == list(names)
    ext4.cli("clean", check=True)  # swapoff by our path finds the area by its file
    assert "/swap-0001" not in Path("/proc/swaps").read_text()


def test_two_concurrent_expands_both_land(ext4: Node) -> None:
    procs = [subprocess.Popen([sys.executable, "-m", "clusterctl", "swap", "expand",
                               "--config", str(ext4.conf)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sorted(Path(f["path"]).name for f in ext4.status()["files"]) == [
        "swap-0001", "swap-0002"]
    ledger = json.loads((ext4.state / "swap.json").read_text())
    assert sorted(f["name"] for f in ledger["files"]) == ["swap-0001", "swap-0002"]


def test_a_held_lock_makes_the_second_command_say_busy(ext4: Node) -> None:
    lock = ext4.state.parent / "run" / "swap.lock"
    lock.parent.mkdir(parents=True)
    with lock.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        started = time.monotonic()
        result = ext4.cli("expand", "--wait", "0.5")
        waited = time.monotonic() - started
    assert result.returncode == 1
    assert result.stderr == (f"clusterctl: busy: another clusterctl swap command "
                             f"(pid {os.getpid()}) holds {lock}; try again when it has "
                             "finished\n")
    assert waited >= 0.5
    assert not ext4.swap_dir.exists() or list(ext4.swap_dir.iterdir()) == []


def leave_holes(fd: int, offset: int, length: int) -> None:
    """A filesystem whose fallocate leaves what swapon refuses (as f2fs did)."""
    os.ftruncate(fd, offset + length)


def test_kernel_refusing_a_fallocated_file_falls_back_to_zeros(ext4: Node) -> None:
    ext4.swap_dir.mkdir(mode=0o700)
    dfd = swapfiles.open_dir(ext4.swap_dir, create=False)
    try:
        method = swapfiles.create(dfd, ext4.swap_dir, "swap-0001", 64 * MIB,
                                  allocate=leave_holes)
        assert method == "zeros"
        assert active_swaps_under(ext4.swap_dir) == [str(ext4.swap_dir / "swap-0001")]
        with pytest.raises(HostError, match="EINVAL"):
            swapfiles.create(dfd, ext4.swap_dir, "swap-0002", 64 * MIB, method="fallocate",
                             allocate=leave_holes)
        assert sorted(p.name for p in ext4.swap_dir.iterdir()) == ["swap-0001"]
    finally:
        os.close(dfd)


def test_files_that_are_not_clusterctl_s_survive_clean(ext4: Node) -> None:
    ext4.cli("auto", check=True)
    mine = ext4.swap_dir / "operator-notes.txt"
    mine.write_text("keep me")
    result = ext4.cli("clean", check=True)
    assert "removed swap-0002" in result.stdout
    assert [p.name for p in ext4.swap_dir.iterdir()] == ["operator-notes.txt"]
    assert ext4.status()["foreign_files"] == ["operator-notes.txt"]


def test_a_full_disk_mid_create_is_a_failed_event_and_leaves_nothing(tmp_path: Path) -> None:
    """Facts said there was room; the filesystem filled up before the file was made."""
    from dataclasses import replace

    from clusterctl.swap import executor as swap
    from clusterctl.swap.policy import plan_expand

    with loop_mount(tmp_path, "ext4", size_mib=320) as mount:
        n = make_node(tmp_path, mount)
        config = n.config()
        facts = swap.read_facts(config)
        stale = replace(facts, fs=replace(facts.fs, available_bytes=64 * 2**30,
                                          total_bytes=128 * 2**30))
        plan = plan_expand(stale, config.swap, time.time(), 512 * MIB)
        with pytest.raises(HostError, match="no space left for a 512M swap file"):
            swap.execute(plan, facts, config)
        assert list(n.swap_dir.iterdir()) == []
        (event,) = n.events()
        assert event["event_type"] == "swap_failed"
        assert event["action"] == "create" and event["size_bytes"] == 512 * MIB
        assert active_swaps_under(mount) == []


def test_a_slow_zero_fill_logs_progress_under_systemd(tmp_path: Path) -> None:
    with loop_mount(tmp_path, "ext4", size_mib=1024) as mount:
        n = make_node(tmp_path, mount, extra='allocation = "zeros"')
        journal = tmp_path / "journal"
        with journal.open("w") as handle:
            st = os.fstat(handle.fileno())
            env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
            subprocess.run([sys.executable, "-m", "clusterctl", "swap", "expand", "--size",
                            "256M", "--config", str(n.conf)], stderr=handle,
                           stdout=subprocess.DEVNULL, env=env, check=True, timeout=120)
        lines = journal.read_text().splitlines()
        path = n.swap_dir / "swap-0001"
        assert f"<6>create {path} (256M): requested by `swap expand`" in lines
        for percent in (0, 25, 50, 75, 100):
            assert any(line.startswith(f"<6>create {path} (256M): {percent}% (")
                       for line in lines), (percent, lines)


def test_a_slow_zero_fill_shows_a_progress_bar_at_a_terminal(tmp_path: Path) -> None:
    with loop_mount(tmp_path, "ext4", size_mib=1024) as mount:
        n = make_node(tmp_path, mount, extra='allocation = "zeros"')
        code, terminal, stdout = run_with_terminal_stderr(
            [sys.executable, "-m", "clusterctl", "swap", "expand", "--size", "256M",
             "--config", str(n.conf)], os.environ)
        assert code == 0
        assert b"create " in terminal and b"MiB" in terminal  # the bar, on stderr
        assert stdout.startswith("created swap-0001 (256M)")


@contextlib.contextmanager
def pages_in_swap(limit_mib: int, allocate_mib: int) -> Iterator[Callable[[int], None]]:
    """A process in a memory cgroup of its own, pushed into swap; yields a limit setter."""
    with memory_cgroup("test") as (group, set_limit):
        set_limit(limit_mib)
        program = (f"import time\nb = bytearray({allocate_mib} * 2**20)\n"
                   "for i in range(0, len(b), 4096): b[i] = 1\n"
                   "print('ready', flush=True)\ntime.sleep(120)\n")
        proc = run_in(group, program, stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            yield set_limit
        finally:
            proc.kill()
            proc.wait()


def test_swapoff_of_a_file_in_use_takes_the_pages_back_with_progress(tmp_path: Path) -> None:
    with loop_mount(tmp_path, "ext4", size_mib=1024) as mount:
        n = make_node(tmp_path, mount)
        n.cli("expand", "--size", "384M", check=True)
        if [p for p in Path("/proc/swaps").read_text().splitlines()[1:]
                if not p.startswith(str(n.swap_dir))]:
            pytest.skip("other swap is active here; the pages could land there")
        with pages_in_swap(limit_mib=64, allocate_mib=200) as set_limit:
            (f,) = n.status()["files"]
            assert f["used"] > 100 * MIB  # the process's pages are in our file
            set_limit(1024)  # let the cgroup take them back into RAM
            journal = tmp_path / "journal"
            with journal.open("w") as handle:
                st = os.fstat(handle.fileno())
                env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
                subprocess.run([sys.executable, "-m", "clusterctl", "swap", "clean",
                                "--config", str(n.conf)], stderr=handle, check=True,
                               stdout=subprocess.DEVNULL, env=env, timeout=120)
            lines = journal.read_text().splitlines()
            assert any(line.startswith(f"<6>swapoff {f['path']} (") and "100%" in line
                       for line in lines), lines
            assert active_swaps_under(mount) == []
            (event,) = [e for e in n.events() if e["event_type"] == "swap_shrunk"]
            assert event["used_bytes"] > 100 * MIB


def test_a_multi_device_btrfs_is_refused_with_the_btrfs_rules(tmp_path: Path) -> None:
    require_loop("btrfs")
    images = [tmp_path / "a.img", tmp_path / "b.img"]
    devices: list[str] = []
    mount = tmp_path / "mnt"
    mount.mkdir()
    mounted = False
    try:
        for image in images:
            with image.open("wb") as handle:
                handle.truncate(512 * MIB)
            devices.append(subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                                          capture_output=True, text=True).stdout.strip())
        subprocess.run(["mkfs.btrfs", "-q", "-f", "-d", "raid0", "-m", "raid1", *devices],
                       check=True, capture_output=True)
        subprocess.run(["mount", devices[0], str(mount)], check=True)
        mounted = True
        n = make_node(tmp_path, mount)
        result = n.cli("expand")
        assert result.returncode == 1
        assert "refused" in result.stderr and "on btrfs (EINVAL)" in result.stderr
        assert "single-device filesystem" in result.stderr
        assert list(n.swap_dir.iterdir()) == []
        assert n.events()[-1]["event_type"] == "swap_failed"
    finally:
        swapoff_under(mount)
        if mounted:
            subprocess.run(["umount", str(mount)], check=False)
        for device in devices:
            subprocess.run(["losetup", "-d", device], check=False)
