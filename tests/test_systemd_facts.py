"""A host fact the hardened swap unit cannot read is unknown, not a crash (real systemd).

The swap dir is a filesystem on a loop device whose backing image lives under /root.
``clusterctl-swap.service`` runs with ProtectHome=yes and without CAP_DAC_OVERRIDE, so
from inside the unit the image cannot even be stat'ed: whether the disk under the swap
dir rotates is unknown there. That is advice (it tunes swappiness); the swap step must
go on, and the disk type must read as unknown, saying why.

Everything happens inside a systemd sandbox: /root is an overlay there, so the image,
the loop device's filesystem and its mount are the sandbox's own. The loop device is
the kernel's (shared): it is swapped off, unmounted and detached before the sandbox
stops.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.systemd_sandbox import Sandbox, SandboxError, unavailable
from tests.loopfs import require_loop

pytestmark = pytest.mark.integration

SWAP_DIR = "/var/lib/clusterctl/swap"
INSTALL = "/srv/clusterctl/install.sh"
IMAGE = "/root/images/swap.img"
SWAP = "clusterctl-swap.service"
# the swap unit's own view of the host, for a command run by hand (systemd-run copies
# these from the unit file: what matters is the hidden /root and no DAC override)
AS_THE_UNIT = ("-p ProtectHome=yes -p CapabilityBoundingSet=CAP_SYS_ADMIN "
               "-p NoNewPrivileges=yes -p PrivateMounts=yes")


class Node:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.loop: str | None = None

    def run(self, script: str) -> str:
        return self.sandbox.run(script).stdout

    def attach(self) -> None:
        """An 8 GiB sparse ext4 image under /root, on a loop device, at the swap dir."""
        self.run(f"mkdir -p {Path(IMAGE).parent} {SWAP_DIR} && truncate -s 8G {IMAGE}")
        self.loop = self.run(f"losetup -f --show {IMAGE}").strip()
        self.run(f"mkfs.ext4 -q -F {self.loop} && mount {self.loop} {SWAP_DIR}")

    def detach(self) -> None:
        if self.loop is None:
            return
        self.sandbox.run(f"systemctl stop {SWAP.replace('.service', '.timer')} {SWAP}; "
                         f"for f in {SWAP_DIR}/*; do swapoff \"$f\" 2>/dev/null; done; "
                         f"umount {SWAP_DIR}", check=False)
        self.sandbox.run(f"losetup -d {self.loop}", check=False)
        self.loop = None


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    reason = unavailable()
    if reason:
        pytest.skip(f"no systemd sandbox here: {reason}")
    require_loop("ext4")
    if shutil.which("losetup") is None:
        pytest.skip("losetup (util-linux) is not installed")
    work = tmp_path_factory.mktemp("facts-node")
    with Sandbox(work / "sandbox") as sandbox:
        node = Node(sandbox)
        try:
            try:
                node.attach()
            except SandboxError as err:
                pytest.skip(f"no loop device inside the sandbox: {err}")
            node.run(f"{INSTALL} --no-check")
            yield node
        finally:
            node.detach()


@pytest.fixture
def sandbox(node: Node) -> Sandbox:
    """The node's sandbox, named so that a failing test's report carries its journal."""
    return node.sandbox


def test_the_layout_is_a_loop_device_backed_by_an_image_under_root(node: Node,
                                                                   sandbox: Sandbox) -> None:
    """What the other tests rely on: the kernel names the image under /root as the
    backing file of the swap dir's device, and the unit cannot reach it."""
    source = node.run(f"findmnt -n -o SOURCE --target {SWAP_DIR}").strip()
    assert source == node.loop
    name = Path(source).name
    assert node.run(f"cat /sys/block/{name}/loop/backing_file").strip() == IMAGE
    hidden = sandbox.run(f"systemd-run --wait --pipe --quiet {AS_THE_UNIT} stat {IMAGE}",
                         check=False)
    assert hidden.returncode != 0 and "Permission denied" in hidden.stdout + hidden.stderr


def test_the_swap_unit_succeeds_when_the_disk_type_cannot_be_read(node: Node,
                                                                  sandbox: Sandbox) -> None:
    # the timer's unit stands down while the agent runs the policy: stop the agent so
    # that the hardened unit itself runs `swap auto`, and prove that it did
    node.run("systemctl stop clusterctl-agent.service")
    before = int(node.run(f"systemctl show -P ExecMainStartTimestampMonotonic {SWAP}"))
    since = node.run("date +%s").strip()
    started = sandbox.run(f"systemctl start {SWAP}", check=False)  # oneshot: waits for it
    assert int(node.run(f"systemctl show -P ExecMainStartTimestampMonotonic {SWAP}")) > before
    log = node.run(f"journalctl --no-pager -o cat -u {SWAP} --since @{since}")
    assert started.returncode == 0, log
    assert node.run(f"systemctl show -P Result {SWAP}") == "success\n", log
    assert node.run(f"systemctl show -P ActiveState {SWAP}") in ("inactive\n", "active\n")
    assert "internal error" not in log
    # the step did its work: min_size of swap in the loop filesystem
    files = node.run(f"ls {SWAP_DIR}").split()
    assert [f for f in files if f.startswith("swap-")] == ["swap-0001", "swap-0002"], log
    status = json.loads(node.run("clusterctl swap status --json"))
    assert [(f["path"], f["state"]) for f in status["files"]] == [
        (f"{SWAP_DIR}/swap-0001", "active"), (f"{SWAP_DIR}/swap-0002", "active")]
    assert status["swap_dir"]["fstype"] == "ext4"


def test_check_under_the_units_view_reports_the_disk_type_unknown_and_why(
        node: Node, sandbox: Sandbox) -> None:
    out = sandbox.run(f"systemd-run --wait --pipe --quiet {AS_THE_UNIT} "
                      "/usr/local/bin/clusterctl check quick --json", check=False)
    report = json.loads(out.stdout)
    swap_dir = report["swap_dir"]
    assert (swap_dir["fstype"], swap_dir["device"]) == ("ext4", Path(node.loop or "").name)
    assert swap_dir["rotational"] is None and swap_dir["media"] is None
    assert IMAGE in swap_dir["unknown_reason"] and "Permission denied" in \
        swap_dir["unknown_reason"]
    found = {f["code"]: f for f in report["findings"]}
    assert found["swap.media_unknown"]["severity"] == "info"
    assert IMAGE in found["swap.media_unknown"]["message"]
    # root in a shell reads the image: nothing in the way, no finding (the sandbox's /root
    # is an overlay, which has no disk of its own to name, so the type stays open there)
    plain = json.loads(sandbox.run("clusterctl check quick --json", check=False).stdout)
    assert plain["swap_dir"]["unknown_reason"] is None
    assert "swap.media_unknown" not in {f["code"] for f in plain["findings"]}
