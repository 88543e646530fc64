"""A process that grows past its memory cgroup's limit survives on swap the agent grows.

A hog (tests/hog.py) in a memory cgroup limited to 256 MiB grows at 50 MiB/s towards
1 GiB; the node has `[swap] min_size` (256M) of swap, on a loop ext4 of the test's own.
Without the agent it fills that swap and is OOM-killed; with `clusterctl agent run`
(running as its unit, so it owns the swap policy as under systemd, with the hog's cgroup
in `[swap] watch_cgroups`) swap grows in time and the hog reaches its target. Root, loop
devices and a memory cgroup controller; about 40 s.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.hog import (
    MIB,
    HogGroup,
    HogResult,
    HogUnavailable,
    clusterctl,
    free_port,
    hog_cgroup,
    knows_key,
    node_config,
    read_events,
    run_hog,
    running_agent,
    swap_events,
    swaps_under,
)
from tests.loopfs import loop_mount, swapoff_under

pytestmark = pytest.mark.integration

RATE_MIB_S = 50
TARGET_MIB = 1024
INCREMENT = 256 * MIB
WHY_GROWN = re.compile(r"free|exhaust|predict|pressure", re.IGNORECASE)


@pytest.fixture
def group() -> Iterator[HogGroup]:
    try:
        with hog_cgroup("hog-test") as made:
            yield made
    except HogUnavailable as err:
        pytest.skip(str(err))


@pytest.fixture
def mount(tmp_path: Path, group: HogGroup) -> Iterator[Path]:
    with loop_mount(tmp_path, "ext4", size_mib=4096) as mounted:
        yield mounted


def min_size_swap(tmp_path: Path, mount: Path, watch: list[str] | None = None) -> Path:
    """The node's config, and min_size of swap made as the timer makes it at boot."""
    conf = node_config(tmp_path, mount / "swap", port=free_port(), min_size="256M",
                       increment="256M", max_size="2G", watch_cgroups=watch)
    made = clusterctl("swap", "auto", "--config", str(conf))
    assert made.returncode == 0, made.stdout + made.stderr
    assert list(swaps_under(mount / "swap").values()) == [256 * MIB]
    return conf


def story(result: HogResult, events: Sequence[dict[str, Any]] = (), log: str = "") -> str:
    """What happened, for a failure message: figures, the swap timeline each 0.5 s,
    the agent's swap events and log."""
    lines = [f"{k}: {v}" for k, v in result.row().items() if k != "output"]
    lines.append("t_s  node_swap_MiB  managed_MiB  foreign_MiB  hog_ram_MiB  hog_swap_MiB  "
                 "psi_full10_cg")
    shown = -1.0
    for s in result.timeline:
        if s.t_s - shown >= 0.5:
            shown = s.t_s
            lines.append(f"{s.t_s:5.1f} {s.swap_used_bytes // MIB:6} {s.managed_bytes // MIB:6} "
                         f"{s.foreign_bytes // MIB:6} "
                         f"{(s.hog_ram_bytes or 0) // MIB:6} {(s.hog_swap_bytes or 0) // MIB:6} "
                         f"{s.psi_full_avg10_cgroup}")
    lines += [f"event: {e.get('event_type')}: {e.get('reason')}" for e in events]
    lines += ["agent log:", log[-4000:], "hog output:", result.output]
    return "\n".join(lines)


def test_without_the_agent_the_hog_fills_min_size_swap_and_is_oom_killed(
        tmp_path: Path, group: HogGroup, mount: Path) -> None:
    """The control: the failure the agent is there to prevent happens on this node."""
    conf = min_size_swap(tmp_path, mount)
    try:
        result = run_hog(group, mount / "swap", rate_mib_s=RATE_MIB_S, target_mib=TARGET_MIB,
                         workdir=tmp_path)
    finally:
        clusterctl("swap", "clean", "--config", str(conf))
        swapoff_under(mount)
    if result.survived and result.peak_foreign_swap_bytes:
        pytest.skip(f"{result.peak_foreign_swap_bytes // MIB} MiB of swap not the test's was "
                    "active on this node meanwhile (another test's?): the hog swapped there")
    assert result.oom_killed and not result.survived, story(result)
    assert result.reached_mib < TARGET_MIB
    assert result.new_files == () and result.peak_managed_bytes == 256 * MIB, story(result)
    # it died with the swap it had full: the limit plus min_size, not earlier
    assert result.peak_swap_used_bytes > 200 * MIB, story(result)


def test_with_the_agent_the_hog_reaches_its_target_on_swap_grown_in_time(
        tmp_path: Path, group: HogGroup, mount: Path) -> None:
    """The same hog beside the real agent: swap grows before it runs out, each growth
    saying why (swap running out, or pressure), and not past the peak."""
    watch = [group.name] if knows_key("swap", "watch_cgroups", '["x"]') else None
    conf = min_size_swap(tmp_path, mount, watch)
    before = len(read_events(tmp_path / "state"))
    log = ""
    events: list[dict[str, Any]] = []
    try:
        with running_agent(conf, tmp_path) as agent:
            result = run_hog(group, mount / "swap", rate_mib_s=RATE_MIB_S,
                             target_mib=TARGET_MIB, workdir=tmp_path)
            events = swap_events(agent.events()[before:])
            log = agent.log_text()
    finally:
        clusterctl("swap", "clean", "--config", str(conf))
        swapoff_under(mount)
    told = story(result, events, log)
    assert result.survived and not result.oom_killed, told
    assert result.reached_mib == TARGET_MIB
    if result.peak_foreign_swap_bytes:
        pytest.skip(f"{result.peak_foreign_swap_bytes // MIB} MiB of swap not the test's was "
                    "active on this node meanwhile (another test's?): it survived, but how "
                    "much the agent grew proves nothing")
    grown = [e for e in events if e["event_type"] == "swap_expanded"]
    assert grown, told
    assert all(WHY_GROWN.search(e["reason"]) for e in grown), told
    assert len(result.new_files) == len(grown)
    # swap grew for the peak, not past it: what the hog's swap needed, in whole files,
    # and one increment more at most
    assert result.peak_hog_swap_bytes is not None
    needed = -(-result.peak_hog_swap_bytes // INCREMENT) * INCREMENT
    assert result.peak_managed_bytes <= needed + INCREMENT, told
