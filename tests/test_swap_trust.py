"""The swap dir is trusted all the way from /, and the kernel swaps on the file checked.

Real swap files on loop filesystems made by the tests (root only); ``loop_mount``
swaps off whatever a test enabled under its mount and unmounts, even when a test
fails. A race is made deterministic with a callback the code already takes (the
progress of a zero-fill), or by calling the lower-level function with an open
descriptor: what the kernel enables must be the file that was checked.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from clusterctl.errors import HostError
from clusterctl.swap import executor as swap
from clusterctl.swap.policy import plan_clean, plan_expand
from clusterctl.system import swapfiles
from clusterctl.units import MIB
from tests.loopfs import active_swaps_under, loop_mount
from tests.test_swap_real import Node, make_node

pytestmark = pytest.mark.integration

NOBODY = 65534
LIBC = ctypes.CDLL(None, use_errno=True)
SIZE = 64 * MIB


def swap_file(directory: Path, name: str, *, mode: int = 0o600) -> Path:
    """A valid, inactive swap file made by the test."""
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.posix_fallocate(fd, 0, SIZE)
        swapfiles.write_header(fd, SIZE)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


@contextlib.contextmanager
def held(path: Path) -> Iterator[int]:
    """A descriptor of the file; swapped off by it on the way out, whatever its name by then."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)
    try:
        yield fd
    finally:
        LIBC.swapoff(f"/proc/self/fd/{fd}".encode())  # EINVAL when it is off already
        os.close(fd)


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Path]:
    with loop_mount(tmp_path, "ext4", size_mib=512) as mnt:
        yield mnt


def under(tmp_path: Path, mount: Path, parent: str = "shared", **extra: str) -> Node:
    lines = "".join(f'{k} = "{v}"\n' for k, v in extra.items())
    (mount / parent).mkdir()
    return make_node(tmp_path, mount, swap_dir=mount / parent / "swap", extra=lines)


# -- every directory above the swap dir ----------------------------------------------


@pytest.mark.parametrize(("spoil", "problem"), [
    (lambda d: os.chown(d, NOBODY, NOBODY), f"owned by uid {NOBODY}, not root"),
    (lambda d: d.chmod(0o775), "writable by group or others (mode 0775)"),
], ids=["owned-by-nobody", "group-writable"])
def test_a_swap_dir_under_an_untrusted_parent_is_refused_and_nothing_is_made(
        tmp_path: Path, mount: Path, spoil: Callable[[Path], None], problem: str) -> None:
    """The config was loaded (and validated) before the parent changed, as the agent holds it."""
    node = under(tmp_path, mount)
    config = node.config()
    parent = node.swap_dir.parent
    spoil(parent)
    operations: tuple[swap.Operation, ...] = ("expand", "auto")
    for operation in operations:
        with pytest.raises(HostError) as caught:
            swap.run(config, operation)
        assert (f"swap dir {node.swap_dir} is under {parent}, which is {problem}"
                in caught.value.message)
        assert caught.value.fix == (f"chown root {parent} && chmod go-w {parent}, "
                                    "or set [swap] dir elsewhere")
    assert list(parent.iterdir()) == []  # not even the swap dir
    assert active_swaps_under(mount) == []
    assert [e["event_type"] for e in node.events()] == ["swap_growth_blocked"]  # said, once
    facts, plan = swap.status(config)  # still readable: it reports, it does not fail
    assert facts.listing.problem == f"under {parent}, which is {problem}"
    assert plan.actions == ()


def test_a_parent_that_turns_untrusted_after_planning_is_refused_when_acting(
        tmp_path: Path, mount: Path) -> None:
    node = under(tmp_path, mount)
    config = node.config()
    facts = swap.read_facts(config)  # all trusted now
    plan = plan_expand(facts, config.swap, time.time(), SIZE)
    assert [a.kind for a in plan.actions] == ["create"]
    os.chown(node.swap_dir.parent, NOBODY, NOBODY)
    with pytest.raises(HostError) as caught:
        swap.execute(plan, facts, config)
    assert caught.value.one_line() == (
        f"swap dir {node.swap_dir} is under {node.swap_dir.parent}, which is owned by uid "
        f"{NOBODY}, not root; refusing it; chown root {node.swap_dir.parent} && chmod go-w "
        f"{node.swap_dir.parent}, or set [swap] dir elsewhere")
    assert list(node.swap_dir.parent.iterdir()) == []
    assert active_swaps_under(mount) == []


def test_a_symlink_above_the_swap_dir_is_refused(tmp_path: Path, mount: Path) -> None:
    real = mount / "real"
    real.mkdir()
    (mount / "link").symlink_to(real)
    node = make_node(tmp_path, mount, swap_dir=mount / "link" / "swap")
    with pytest.raises(HostError) as caught:
        swap.run(node.config(), "expand")
    assert caught.value.one_line() == (
        f"cannot expand: swap dir {node.swap_dir} is under {mount / 'link'}, which is a "
        "symlink; set [swap] dir to its real path, with no symlink in it")
    assert list(real.iterdir()) == []
    assert active_swaps_under(mount) == []


def test_a_sticky_world_writable_parent_like_tmp_is_accepted(tmp_path: Path,
                                                             mount: Path) -> None:
    node = under(tmp_path, mount)
    node.swap_dir.parent.chmod(0o1777)
    config = node.config()
    swap.run(config, "expand")
    assert active_swaps_under(mount) == [str(node.swap_dir / "swap-0001")]
    swap.run(config, "clean")
    assert active_swaps_under(mount) == []


# -- the kernel acts on the file that was checked ------------------------------------


def test_a_parent_swapped_for_a_symlink_mid_create_does_not_redirect_swapon(
        tmp_path: Path, mount: Path) -> None:
    """Between the checks and swapon, mount/a becomes a symlink to a decoy swap file's dir."""
    node = under(tmp_path, mount, parent="a", allocation="zeros")
    decoy_dir = mount / "decoy" / "swap"
    decoy_dir.mkdir(parents=True, mode=0o700)
    decoy = swap_file(decoy_dir, "swap-0001")
    moved = mount / "a-real"

    def progress(_label: str, _total: int) -> Callable[[int, int], None]:
        def tick(_done: int, _of: int) -> None:
            if not moved.exists():
                (mount / "a").rename(moved)
                (mount / "a").symlink_to(mount / "decoy")
        return tick

    swap.run(node.config(), "expand", progress=progress)
    assert active_swaps_under(mount) == [str(moved / "swap" / "swap-0001")]  # not the decoy
    assert decoy.exists()


def test_swapon_enables_the_checked_file_even_if_its_name_is_taken_over(
        tmp_path: Path, mount: Path) -> None:
    swap_dir = mount / "swap"
    swap_dir.mkdir(mode=0o700)
    checked = swap_file(swap_dir, "swap-0001")
    substitute = swap_file(mount, "substitute")
    dfd = swapfiles.open_dir(swap_dir, create=False)
    try:
        fd = swapfiles.open_swap_file(dfd, swap_dir, "swap-0001", SIZE)
        try:
            checked.rename(swap_dir / "checked")  # the checked file, under another name
            substitute.rename(checked)  # and another file where it was
            with held(swap_dir / "checked"):
                swapfiles.swapon(fd, str(checked))
                assert active_swaps_under(mount) == [str(swap_dir / "checked")]
        finally:
            os.close(fd)
    finally:
        os.close(dfd)
    assert active_swaps_under(mount) == []


def test_swapoff_takes_off_the_managed_file_not_what_its_path_leads_to_later(
        tmp_path: Path, mount: Path) -> None:
    """Between the checks and swapoff, mount/a becomes a symlink to another active area."""
    node = under(tmp_path, mount, parent="a")
    config = node.config()
    swap.run(config, "expand")
    ours = node.swap_dir / "swap-0001"
    other_dir = mount / "other" / "swap"
    other_dir.mkdir(parents=True, mode=0o700)
    other = swap_file(other_dir, "swap-0001")
    moved = mount / "a-real"
    with held(ours), held(other) as other_fd:
        assert LIBC.swapon(f"/proc/self/fd/{other_fd}".encode(), 0) == 0  # the operator's
        facts = swap.read_facts(config)
        plan = plan_clean(facts, config.swap, time.time())
        plan = dataclasses.replace(plan, actions=tuple(
            dataclasses.replace(a, used_bytes=1) for a in plan.actions))
        assert [a.kind for a in plan.actions] == ["remove"]

        def progress(_label: str, _total: int) -> Callable[[int, int], None]:
            (mount / "a").rename(moved)  # before swapoff: the progress bar is made first
            (mount / "a").symlink_to(mount / "other")
            return lambda _done, _of: None

        swap.execute(plan, facts, config, progress=progress)
        assert active_swaps_under(mount) == [str(other)]  # the other area is untouched
        assert list((moved / "swap").iterdir()) == []  # and then removed


# -- the file itself -----------------------------------------------------------------


def test_a_swap_file_of_another_user_is_not_swapped_on(tmp_path: Path, mount: Path) -> None:
    node = make_node(tmp_path, mount)
    node.swap_dir.mkdir(mode=0o700)
    planted = swap_file(node.swap_dir, "swap-0001")
    os.chown(planted, NOBODY, NOBODY)
    result = node.cli("auto")
    assert result.returncode == 1
    assert (f"{planted} is owned by uid {NOBODY}, not root; refusing to swap on it"
            in result.stderr)
    assert active_swaps_under(mount) == []


def _fifo(d: Path) -> None:
    os.mkfifo(d / "swap-0001", 0o600)


def _symlink(d: Path) -> None:
    swap_file(d, "target")
    (d / "swap-0001").symlink_to(d / "target")


def _open_to_others(d: Path) -> None:
    swap_file(d, "swap-0001", mode=0o644)


def _no_header(d: Path) -> None:
    (d / "swap-0001").write_bytes(bytes(SIZE))
    (d / "swap-0001").chmod(0o600)


def _short(d: Path) -> None:
    swap_file(d, "swap-0001")
    os.truncate(d / "swap-0001", SIZE // 2)


@pytest.mark.parametrize(("plant", "problem"), [
    (_fifo, "is not a regular file"),
    (_symlink, "to swap on it: a symlink"),
    (_open_to_others, "is open to group or others (mode 0644)"),
    (_no_header, "is without a swap header"),
    (_short, "is 32M, shorter than the 64M recorded"),
], ids=["fifo", "symlink", "mode-0644", "no-header", "short"])
def test_a_file_unfit_for_swap_is_refused_before_swapon(
        tmp_path: Path, plant: Callable[[Path], None], problem: str) -> None:
    swap_dir = tmp_path / "swap"
    swap_dir.mkdir(mode=0o700)
    plant(swap_dir)
    before = sorted((p.name, stat.S_IFMT(p.lstat().st_mode)) for p in swap_dir.iterdir())
    dfd = swapfiles.open_dir(swap_dir, create=False)
    try:
        with pytest.raises(HostError) as caught:
            swapfiles.activate(dfd, swap_dir, "swap-0001", SIZE)
    finally:
        os.close(dfd)
    assert f"{swap_dir / 'swap-0001'} {problem}" in caught.value.message
    assert active_swaps_under(swap_dir) == []
    assert sorted((p.name, stat.S_IFMT(p.lstat().st_mode)) for p in swap_dir.iterdir()) == before


def test_a_fifo_in_place_of_a_swap_file_never_hangs_the_in_use_probe(tmp_path: Path) -> None:
    """`swap status` asks the kernel whether each listed file is an active swap area; a
    FIFO planted under that name must give "cannot tell", not a hang."""
    import threading

    from clusterctl.host.swapdir import swap_in_use

    fifo = tmp_path / "swap-0001"
    os.mkfifo(fifo)
    answers: list[bool | None] = []
    probe = threading.Thread(target=lambda: answers.append(swap_in_use(str(fifo))), daemon=True)
    probe.start()
    probe.join(3)
    hung = probe.is_alive()
    if hung:  # let the old code's blocked open go
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        probe.join(3)
    assert not hung
    assert answers == [None]
