"""Host reads that meet a path they cannot read degrade; they never crash the action.

The conditions are real: a directory a process may not search is mode 0000 read by
root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (what ProtectHome= and the units'
CapabilityBoundingSet= make of /root), run in a child under ``setpriv``; a /proc entry
that is gone by the time it is read is a dangling link or a plain file where a process
directory belongs; a swap dir that changes while it is listed is changed by a second
thread. EIO is not made here: it needs a failing block device (a device-mapper error
target), too heavy for a unit test; the code treats it as it treats EACCES.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from clusterctl.errors import HostError
from clusterctl.host import psi, sessions, storage, swapdir, sysctl
from tests.conftest import REPO
from tests.hosttree import HostTree

SWAP_DIR = "/var/lib/clusterctl/swap"
IMAGE = "/root/images/swap.img"


def without_dac_override(code: str) -> object:
    """Run ``code`` (it prints one JSON value) as root without the capabilities that let
    root search any directory; what it printed, or the traceback's last line."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to drop CAP_DAC_OVERRIDE")
    result = subprocess.run(
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
         "--inh-caps=-dac_override,-dac_read_search", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=30, check=False,
        env={**os.environ, "PYTHONPATH": f"{REPO / 'agent'}:{REPO}"})
    if result.returncode != 0:
        return {"raised": (result.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(result.stdout)


def loop_node(root: Path) -> HostTree:
    """An SSD at /, and the swap dir on loop0, whose image is in /root (mode 0000)."""
    tree = (HostTree(root).system()
            .disk("vda", "252:0", rotational=0, partitions={"vda1": "252:1"})
            .virtual("loop0", "7:0", slaves=[], rotational=0)
            .file("sys/devices/virtual/block/loop0/loop/backing_file", f"{IMAGE}\n")
            .file(IMAGE.lstrip("/"), "")
            .mount("/", "ext4", "252:1", "/dev/vda1")
            .mount(SWAP_DIR, "ext4", "7:0", "/dev/loop0"))
    (root / "root").chmod(0)
    return tree


FILESYSTEM = """
import json, sys
from pathlib import Path
from clusterctl.host.storage import read_filesystem
fs = read_filesystem(Path(sys.argv[1]), sys.argv[2])
print(json.dumps({k: getattr(fs, k) for k in
                  ("fstype", "device", "disks", "media", "unknown_reason", "total_bytes")}))
"""


def read_filesystem_as_the_unit(root: Path, path: str) -> object:
    return without_dac_override(
        f"import sys; sys.argv[1:] = [{str(root)!r}, {path!r}]\n{FILESYSTEM}")


def test_a_loop_image_the_probe_cannot_reach_makes_the_disk_type_unknown_and_says_why(
        tmp_path: Path) -> None:
    loop_node(tmp_path)
    seen = read_filesystem_as_the_unit(tmp_path, SWAP_DIR)
    assert isinstance(seen, dict) and seen.pop("total_bytes"), seen  # its own room: known
    assert seen == {
        "fstype": "ext4", "device": "loop0", "disks": [], "media": None,
        "unknown_reason": f"cannot read {IMAGE}: Permission denied (the backing file of loop0)"}
    # root with every capability reaches the image: the SSD under it
    fs = storage.read_filesystem(tmp_path, SWAP_DIR)
    assert (fs.device, fs.disks, fs.media, fs.unknown_reason) == ("loop0", ("vda",), "ssd", None)


def test_a_swap_dir_under_a_directory_the_probe_cannot_search_is_unknown_not_a_crash(
        tmp_path: Path) -> None:
    loop_node(tmp_path)
    seen = read_filesystem_as_the_unit(tmp_path, "/root/swap")
    assert seen == {"fstype": None, "device": None, "disks": [], "media": None,
                    "total_bytes": None,
                    "unknown_reason": "cannot read /root/swap: Permission denied"}


def test_psi_that_is_there_but_unreadable_says_so_not_that_the_kernel_lacks_it(
        tmp_path: Path) -> None:
    HostTree(tmp_path).file("proc/pressure/memory",
                            "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    (tmp_path / "proc/pressure/memory").chmod(0)
    seen = without_dac_override(
        "import json; from pathlib import Path; from clusterctl.host.procfs import "
        f"read_pressure; p = read_pressure(Path({str(tmp_path)!r})); "
        "print(json.dumps([p.available, p.reason]))")
    assert seen == [False, "cannot read /proc/pressure/memory: Permission denied"]


def test_a_psi_trigger_that_cannot_be_opened_is_a_host_error_with_a_fix(tmp_path: Path) -> None:
    (tmp_path / "proc/pressure/memory").mkdir(parents=True)  # EISDIR where a file belongs
    trigger = psi.PressureTrigger(10, root=tmp_path)
    with pytest.raises(HostError) as err:
        trigger.arm()
    assert "Is a directory" in err.value.message and err.value.fix


def test_a_sysctl_that_is_there_but_unreadable_is_a_host_error_not_a_missing_key(
        tmp_path: Path) -> None:
    HostTree(tmp_path).file("proc/sys/vm/swappiness", "60\n")
    (tmp_path / "proc/sys/vm/swappiness").chmod(0)
    seen = without_dac_override(
        "import json; from pathlib import Path; from clusterctl.errors import HostError\n"
        "from clusterctl.host.sysctl import read_sysctl\n"
        f"try: print(json.dumps(read_sysctl(Path({str(tmp_path)!r}), 'vm.swappiness')))\n"
        "except HostError as e: print(json.dumps({'message': e.message, 'fix': e.fix}))")
    assert isinstance(seen, dict) and "raised" not in seen, seen
    assert seen["message"] == ("cannot read sysctl vm.swappiness (/proc/sys/vm/swappiness): "
                               "Permission denied")
    assert seen["fix"]
    # a key this kernel does not have is still None, and readable ones read
    assert sysctl.read_sysctl(tmp_path, "vm.no_such_key") is None
    (tmp_path / "proc/sys/vm/swappiness").chmod(0o644)
    assert sysctl.read_sysctl(tmp_path, "vm.swappiness") == "60"


def test_a_sysctl_path_that_is_a_directory_is_a_host_error(tmp_path: Path) -> None:
    (tmp_path / "proc/sys/vm/swappiness").mkdir(parents=True)
    with pytest.raises(HostError, match=r"cannot read sysctl vm\.swappiness"):
        sysctl.read_sysctl(tmp_path, "vm.swappiness")


def test_system_facts_under_hidden_directories_are_absent_not_a_crash(tmp_path: Path) -> None:
    HostTree(tmp_path).system().file("usr/bin/ollama", "")
    for hidden in ("sys/fs/cgroup", "usr/bin", "run/systemd"):
        (tmp_path / hidden).chmod(0)
    seen = without_dac_override(
        "import json; from pathlib import Path; from clusterctl.host import software\n"
        f"root = Path({str(tmp_path)!r}); s = software.read_system(root)\n"
        "print(json.dumps([s.hostname, s.cgroup, s.systemd_booted, "
        "software.find_binary(root, 'ollama'), software.read_dask(root).version]))")
    assert seen == ["host", None, False, None, None]


def process(tree: HostTree, pid: int, comm: str, cmdline: str) -> None:
    tree.file(f"proc/{pid}/comm", f"{comm}\n").file(f"proc/{pid}/cmdline", cmdline + "\0")


def test_processes_gone_between_listing_and_reading_are_skipped(tmp_path: Path) -> None:
    tree = HostTree(tmp_path)
    process(tree, 100, "sshd", "sshd: alice@pts/0")
    process(tree, 101, "ollama", "/usr/bin/ollama\0serve")
    (tmp_path / "proc/4242").symlink_to(tmp_path / "proc/gone")  # exited: ENOENT
    (tmp_path / "proc/4343").write_text("")  # a file where a directory was: ENOTDIR
    assert sessions.ssh_sessions(tmp_path) == 1
    assert sessions.running(("ollama", "dask"), tmp_path) == ("ollama",)


def test_a_proc_that_cannot_be_listed_counts_no_sessions_and_stops_the_process_check(
        tmp_path: Path) -> None:
    assert sessions.ssh_sessions(tmp_path) is None  # uncounted, not zero
    with pytest.raises(HostError) as err:
        sessions.running(("ollama",), tmp_path)
    assert f"cannot list {tmp_path}/proc" in err.value.message and err.value.fix


def test_swap_dir_files_removed_while_it_is_listed_are_left_out(tmp_path: Path) -> None:
    directory = tmp_path / "swap"
    directory.mkdir(mode=0o700)
    stop = threading.Event()

    def churn() -> None:  # another command creating and removing files meanwhile
        while not stop.is_set():
            for n in range(40):
                (directory / f"swap-{n:04d}").touch()
            for n in range(40):
                (directory / f"swap-{n:04d}").unlink()

    worker = threading.Thread(target=churn, daemon=True)
    worker.start()
    try:
        for _ in range(300):
            listing = swapdir.read_swap_dir(directory, page_size=4096)
            assert listing.exists and listing.problem is None
            assert all(e.managed_name for e in listing.entries)
    finally:
        stop.set()
        worker.join(timeout=10)
