from __future__ import annotations

import os
from pathlib import Path

import pytest

from clusterctl.host import storage
from clusterctl.units import GIB
from tests.conftest import HOSTS
from tests.hosttree import gpu_server, laptop, old_kernel
from tests.loopfs import loop_mount

LOOPFS = HOSTS / "ci-vm-loopfs"


def fake_statvfs(total_gib: float, avail_gib: float):  # type: ignore[no-untyped-def]
    block = 4096
    blocks = int(total_gib * GIB / block)
    avail = int(avail_gib * GIB / block)
    result = os.statvfs_result((block, block, blocks, avail + 100, avail, 0, 0, 0, 0, 255))
    return lambda path: result


def test_mountinfo_fields_and_escapes() -> None:
    text = (
        "36 35 98:0 /mnt1 /mnt/my\\040disk rw,noatime master:1 - ext3 /dev/root rw\n"
        "37 1 0:40 / /tmp rw,nosuid - tmpfs tmpfs rw,size=1024k\n"
    )
    first, second = storage.parse_mountinfo(text)
    assert (first.major, first.minor, first.mountpoint, first.fstype, first.source) == (
        98, 0, "/mnt/my disk", "ext3", "/dev/root")
    assert (second.fstype, second.mountpoint) == ("tmpfs", "/tmp")


def test_longest_mountpoint_wins_and_later_mounts_cover_earlier() -> None:
    mounts = storage.parse_mountinfo(
        "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "2 1 8:2 / /var rw - ext4 /dev/sda2 rw\n"
        "3 1 8:3 / /var rw - xfs /dev/sda3 rw\n"
        "4 1 8:4 / /variable rw - ext4 /dev/sda4 rw\n"
    )
    assert storage.mount_of("/var/lib/clusterctl", mounts).source == "/dev/sda3"
    assert storage.mount_of("/variable/x", mounts).source == "/dev/sda4"
    assert storage.mount_of("/etc", mounts).source == "/dev/sda1"


def test_swap_dir_that_does_not_exist_yet_uses_its_nearest_ancestor() -> None:
    fs = storage.read_filesystem(HOSTS / "ci-vm", "/var/lib/clusterctl/swap")
    assert fs.existing_path == "/"
    assert (fs.mountpoint, fs.fstype, fs.device, fs.disks) == ("/", "ext4", "vda", ("vda",))
    assert fs.media == "hdd"  # the CI VM's virtio disk reports itself rotational


@pytest.mark.parametrize(
    ("path", "fstype", "device"),
    [("/mnt/cap-ext4/swap", "ext4", "loop0"), ("/mnt/cap-xfs/swap", "xfs", "loop2"),
     ("/mnt/cap-btrfs/swap", "btrfs", "loop1")],
)
def test_loop_mounts_are_followed_to_the_disk_under_their_image(path: str, fstype: str,
                                                                device: str) -> None:
    fs = storage.read_filesystem(LOOPFS, path)
    assert (fs.fstype, fs.device, fs.disks, fs.rotational) == (fstype, device, ("vda",), True)


def test_btrfs_anonymous_device_is_found_through_the_mount_source() -> None:
    mount = storage.mount_of("/mnt/cap-btrfs", storage.read_mounts(LOOPFS))
    assert mount is not None and mount.major == 0  # btrfs shows 0:N in mountinfo
    assert storage.block_device_name(LOOPFS, mount) == "loop1"


def test_laptop_nvme_partition_is_an_ssd(tmp_path: Path) -> None:
    root = laptop(tmp_path).root
    fs = storage.read_filesystem(root, "/var/lib/clusterctl/swap",
                                 statvfs=fake_statvfs(468, 210))
    assert (fs.device, fs.disks, fs.media) == ("nvme0n1p2", ("nvme0n1",), "ssd")
    assert fs.available_bytes == 210 * GIB
    assert fs.total_bytes == 468 * GIB


def test_tmpfs_has_no_block_device(tmp_path: Path) -> None:
    fs = storage.read_filesystem(laptop(tmp_path).root, "/tmp/swap")
    assert (fs.fstype, fs.device, fs.disks, fs.media) == ("tmpfs", None, (), None)


def test_md_raid_over_nvme_partitions(tmp_path: Path) -> None:
    fs = storage.read_filesystem(gpu_server(tmp_path).root, "/var/lib/clusterctl/swap")
    assert (fs.device, fs.disks, fs.media) == ("md0", ("nvme0n1", "nvme1n1"), "ssd")


def test_hdd_data_disk_on_the_gpu_server(tmp_path: Path) -> None:
    fs = storage.read_filesystem(gpu_server(tmp_path).root, "/data/swap")
    assert (fs.fstype, fs.device, fs.disks, fs.media) == ("xfs", "sda1", ("sda",), "hdd")


def test_lvm_root_on_an_old_server_is_followed_to_its_hdd(tmp_path: Path) -> None:
    fs = storage.read_filesystem(old_kernel(tmp_path).root, "/var/lib/clusterctl/swap")
    assert (fs.fstype, fs.device, fs.disks, fs.media) == ("xfs", "dm-0", ("sda",), "hdd")


def test_device_mapper_name_resolves_when_the_dev_number_is_unknown(tmp_path: Path) -> None:
    root = old_kernel(tmp_path).root
    mount = storage.Mount(99, 1, 0, 77, "/", "xfs", "/dev/mapper/centos-root", "rw")
    assert storage.block_device_name(root, mount) == "dm-0"


def test_mixed_ssd_and_hdd_under_one_device_counts_as_rotating(tmp_path: Path) -> None:
    tree = gpu_server(tmp_path)
    tree.virtual("md1", "9:1", slaves=["nvme0n1p1", "sda1"]).mount(
        "/mixed", "ext4", "9:1", "/dev/md1")
    fs = storage.read_filesystem(tree.root, "/mixed/swap")
    assert fs.disks == ("nvme0n1", "sda")
    assert fs.media == "hdd"


def test_block_devices_leave_out_virtual_ones() -> None:
    devices = storage.read_block_devices(HOSTS / "ci-vm-zram")
    assert [(d.name, d.media, d.removable) for d in devices] == [("vda", "hdd", False)]
    assert devices[0].size_bytes == 256 * GIB


def test_block_devices_of_the_gpu_server(tmp_path: Path) -> None:
    devices = storage.read_block_devices(gpu_server(tmp_path).root)
    assert [(d.name, d.media) for d in devices] == [
        ("nvme0n1", "ssd"), ("nvme1n1", "ssd"), ("sda", "hdd")]
    assert devices[2].model == "ST8000NM000A-2KE"


@pytest.mark.integration
def test_a_real_loop_mount_on_this_machine(tmp_path: Path) -> None:
    under_image = storage.read_filesystem(Path("/"), str(tmp_path))
    with loop_mount(tmp_path, "ext4") as mountpoint:
        fs = storage.read_filesystem(Path("/"), str(mountpoint / "swap"))
        assert fs.mountpoint == str(mountpoint)
        assert fs.fstype == "ext4"
        assert fs.device is not None and fs.device.startswith("loop")
        assert fs.disks == under_image.disks
        assert fs.rotational == under_image.rotational
        assert fs.total_bytes is not None and 250 * 2**20 < fs.total_bytes <= 320 * 2**20
