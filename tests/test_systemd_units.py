"""The unit files: systemd-analyze verify, exposure scores that may only go down, and the
drop-ins clusterctl writes for a swap dir outside /var/lib/clusterctl and for watched cgroups
outside the agent's default slices."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

import pytest
from typer.testing import CliRunner

from clusterctl.cli import app
from clusterctl.config import SwapConfig
from clusterctl.system import systemd
from clusterctl.system.systemd import (
    AGENT_UNIT,
    SWAP_UNIT,
    _service_settings,
    swap_dir_unreachable,
    sync_dropins,
    sync_swap_dir_dropins,
    unit_dropins,
    watch_cgroups_dropin,
)
from tests.conftest import REPO

UNITS = sorted(p for p in (REPO / "units").iterdir() if p.suffix in (".service", ".timer"))
# `systemd-analyze security --offline=yes` exposure, recorded when the unit was written.
RECORDED_EXPOSURE = {"clusterctl-swap.service": 1.3, "clusterctl-optimize.service": 1.8,
                     "clusterctl-agent.service": 2.4,
                     "clusterctl-dask-worker.service": 1.5,
                     "clusterctl-fleet.service": 1.4}
MEASURED_EXPOSURE: dict[str, float] = {}  # printed at the end of the run (conftest)

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")


def in_namespace(command: str) -> subprocess.CompletedProcess[str]:
    """Run with a stand-in /usr/local/bin/clusterctl (verify checks ExecStart exists)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a private mount namespace")
    script = ("mount -t tmpfs tmpfs /usr/local/bin && printf '#!/bin/sh\\n' > "
              "/usr/local/bin/clusterctl && chmod +x /usr/local/bin/clusterctl && " + command)
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           script], capture_output=True, text=True, timeout=120, check=False)


def test_every_unit_has_the_comment_that_says_what_it_is_and_how_to_turn_it_off() -> None:
    assert UNITS
    for unit in UNITS:
        head = unit.read_text().split("[Unit]")[0]
        assert head.startswith(f"# {unit.name}: "), unit.name
        assert "disable --now" in head, unit.name


@needs_analyze
@pytest.mark.integration
def test_systemd_analyze_verify_passes() -> None:
    result = in_namespace("systemd-analyze verify " + " ".join(str(u) for u in UNITS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""


@needs_analyze
@pytest.mark.integration
@pytest.mark.parametrize("unit", [u for u in UNITS if u.suffix == ".service"],
                         ids=lambda u: u.name)
def test_exposure_does_not_rise(unit: Path) -> None:
    result = in_namespace(f"systemd-analyze security --offline=yes {unit}")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    score = float(match.group(1))
    MEASURED_EXPOSURE[unit.name] = score
    assert score <= (3.0 if unit.name == "clusterctl-agent.service" else 4.0)  # the goals
    assert score <= RECORDED_EXPOSURE[unit.name], (
        f"{unit.name} exposure rose to {score}; harden it or record the new figure with a reason")


def _installed(tmp_path: Path) -> Path:
    """A tree with the units where install.sh puts them."""
    root = tmp_path / "root"
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(unit, units / unit.name)
    return root


def test_a_swap_dir_outside_var_lib_gets_dropins_that_let_both_swap_units_write_it(
        tmp_path: Path) -> None:
    root = _installed(tmp_path)
    elsewhere = Path("/srv/swap 100%")  # a blank and a specifier character, quoted
    assert swap_dir_unreachable(elsewhere, root=root) == (SWAP_UNIT, AGENT_UNIT)
    synced = sync_swap_dir_dropins(elsewhere, root=root)
    paths = [f"/etc/systemd/system/{u}.d/swap-dir.conf" for u in (SWAP_UNIT, AGENT_UNIT)]
    assert [(c.action, c.path) for c in synced.changes] == [("write", p) for p in paths]
    text = (root / paths[0].lstrip("/")).read_text()
    assert 'ReadWritePaths="-/srv/swap 100%%"\n' in text
    assert 'RequiresMountsFor="/srv/swap 100%%"\n' in text
    assert swap_dir_unreachable(elsewhere, root=root) == ()
    assert swap_dir_unreachable(Path("/srv/other"), root=root) == (SWAP_UNIT, AGENT_UNIT)
    assert sync_swap_dir_dropins(elsewhere, root=root).changes == ()  # written once
    # back under /var/lib/clusterctl: removed, with their directories
    synced = sync_swap_dir_dropins(Path("/var/lib/clusterctl/swap"), root=root)
    assert [(c.action, c.path) for c in synced.changes] == [("remove", p) for p in paths]
    assert sorted(p.name for p in (root / "etc/systemd/system").iterdir()) == sorted(
        u.name for u in UNITS)


def test_an_operators_own_read_write_paths_dropin_counts_and_stays(tmp_path: Path) -> None:
    root = _installed(tmp_path)
    own = root / f"etc/systemd/system/{SWAP_UNIT}.d/override.conf"
    own.parent.mkdir()
    own.write_text("[Service]\nReadWritePaths=/srv\n")
    assert swap_dir_unreachable(Path("/srv/swap"), root=root) == (AGENT_UNIT,)
    sync_swap_dir_dropins(Path("/srv/swap"), root=root)
    sync_swap_dir_dropins(Path("/var/lib/clusterctl/swap"), root=root)
    assert own.read_text() == "[Service]\nReadWritePaths=/srv\n"
    assert sorted(p.name for p in own.parent.iterdir()) == ["override.conf"]


def test_no_dropin_is_written_where_the_units_are_not_installed(tmp_path: Path) -> None:
    assert sync_swap_dir_dropins(Path("/srv/swap"), root=tmp_path).changes == ()
    assert sync_dropins(unit_dropins(Path("/srv/swap"), ("kubepods.slice",)),
                        root=tmp_path).changes == ()
    assert list(tmp_path.iterdir()) == []


VAR_LIB_SWAP = Path("/var/lib/clusterctl/swap")
CGROUP_TOPS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/memory")
WATCH_DROPIN = f"/etc/systemd/system/{AGENT_UNIT}.d/watch-cgroups.conf"


def agent_writable(root: Path) -> list[str]:
    """The agent unit's ReadWritePaths=, its drop-ins' included, as systemd reads them."""
    settings = _service_settings(AGENT_UNIT, root)
    assert settings is not None
    return settings[1]


def test_the_default_watched_cgroups_need_no_dropin(tmp_path: Path) -> None:
    """The shipped unit makes the default slices writable at every layout's place, so
    the default config (and groups under those slices) writes nothing."""
    root = _installed(tmp_path)
    writable = agent_writable(root)
    for group in SwapConfig().watch_cgroups:
        assert all(f"{top}/{group}" in writable for top in CGROUP_TOPS), group
    watched = (*SwapConfig().watch_cgroups, "system.slice/db.service")
    assert sync_dropins(unit_dropins(VAR_LIB_SWAP, watched), root=root).changes == ()
    assert sorted(p.name for p in (root / "etc/systemd/system").iterdir()) == sorted(
        u.name for u in UNITS)


def test_a_watched_cgroup_outside_the_default_slices_gets_the_agents_dropin(
        tmp_path: Path) -> None:
    root = _installed(tmp_path)
    watched = ("system.slice", "kubepods.slice/burstable", "kubepods.slice", "job 100%.slice")
    assert not any(w.endswith("/kubepods.slice") for w in agent_writable(root))
    synced = sync_dropins(unit_dropins(VAR_LIB_SWAP, watched), root=root)
    assert [(c.action, c.path) for c in synced.changes] == [("write", WATCH_DROPIN)]
    text = (root / WATCH_DROPIN.lstrip("/")).read_text()
    assert text.startswith("# Written by clusterctl")
    # kubepods.slice covers its burstable group; a blank and a specifier are quoted
    assert text.endswith(
        "[Service]\n"
        "ReadWritePaths=-/sys/fs/cgroup/kubepods.slice -/sys/fs/cgroup/unified/kubepods.slice"
        " -/sys/fs/cgroup/memory/kubepods.slice\n"
        'ReadWritePaths="-/sys/fs/cgroup/job 100%%.slice" '
        '"-/sys/fs/cgroup/unified/job 100%%.slice" "-/sys/fs/cgroup/memory/job 100%%.slice"\n')
    writable = agent_writable(root)  # the unit's own lines still count
    for group in ("system.slice", "kubepods.slice", "job 100%.slice"):
        assert all(f"{top}/{group}" in writable for top in CGROUP_TOPS), group
    assert sync_dropins(unit_dropins(VAR_LIB_SWAP, watched), root=root).changes == ()
    # dry run: what would change, nothing written
    dry = sync_dropins(unit_dropins(VAR_LIB_SWAP, ("kubepods.slice",)), root=root,
                       dry_run=True)
    assert [(c.action, c.path) for c in dry.changes] == [("write", WATCH_DROPIN)]
    assert "job 100%%.slice" in (root / WATCH_DROPIN.lstrip("/")).read_text()
    # back to groups under the defaults: removed with its directory
    synced = sync_dropins(unit_dropins(VAR_LIB_SWAP, ("user.slice",)), root=root)
    assert [(c.action, c.path) for c in synced.changes] == [("remove", WATCH_DROPIN)]
    assert not (root / WATCH_DROPIN.lstrip("/")).parent.exists()


def test_a_v1_hierarchy_name_is_never_made_writable_whole() -> None:
    """On a v1 layout /sys/fs/cgroup/devices is the devices hierarchy (the agent's
    DeviceAllow=), not a group: a watched "devices" group gets its other places only."""
    text = watch_cgroups_dropin(("devices",))
    assert text is not None
    assert text.endswith(
        "ReadWritePaths=-/sys/fs/cgroup/unified/devices -/sys/fs/cgroup/memory/devices\n")
    assert watch_cgroups_dropin(("machine.slice/vm.scope",)) is None


def test_both_dropins_go_together_and_each_is_removed_on_its_own(tmp_path: Path) -> None:
    root = _installed(tmp_path)
    synced = sync_dropins(unit_dropins(Path("/srv/swap"), ("kubepods.slice",)), root=root)
    swap_paths = [f"/etc/systemd/system/{u}.d/swap-dir.conf" for u in (SWAP_UNIT, AGENT_UNIT)]
    assert [c.path for c in synced.changes] == [*swap_paths, WATCH_DROPIN]
    assert swap_dir_unreachable(Path("/srv/swap"), root=root) == ()
    synced = sync_dropins(unit_dropins(Path("/srv/swap"), ()), root=root)
    assert [(c.action, c.path) for c in synced.changes] == [("remove", WATCH_DROPIN)]
    assert swap_dir_unreachable(Path("/srv/swap"), root=root) == ()  # swap-dir.conf kept
    assert sorted(p.name for p in (root / WATCH_DROPIN.lstrip("/")).parent.iterdir()) == [
        "swap-dir.conf"]


def test_config_dropins_and_config_set_keep_the_watch_cgroups_dropin_in_step(
        tmp_path: Path) -> None:
    root = _installed(tmp_path)
    conf = tmp_path / "clusterctl.toml"
    conf.write_text('[swap]\nwatch_cgroups = ["system.slice", "kubepods.slice"]\n')
    dropins = ["config", "dropins", "--root", str(root), "--config", str(conf)]
    result = CliRunner().invoke(app, [*dropins, "--dry-run"])
    assert (result.exit_code, result.stdout) == (0, f"would write {WATCH_DROPIN}\n")
    assert not (root / WATCH_DROPIN.lstrip("/")).exists()
    result = CliRunner().invoke(app, [*dropins, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dropins"] == [{"action": "write", "path": WATCH_DROPIN}]
    assert "/sys/fs/cgroup/unified/kubepods.slice" in agent_writable(root)
    result = CliRunner().invoke(app, dropins)
    assert (result.exit_code, result.stdout) == (0, "")  # in step already
    # `config set` on the units' config (it syncs the host's "/": redirected to root)
    real_sync = systemd.sync_dropins

    def in_root(dropins: Sequence[systemd.Dropin], *, root: Path, dry_run: bool = False
                ) -> systemd.DropinSync:
        assert root == Path("/")
        return real_sync(dropins, root=tmp_path / "root", dry_run=dry_run)

    set_cmd = ["config", "set", "swap.watch_cgroups", "system.slice,user.slice",
               "--config", str(conf)]
    with mock.patch.object(systemd, "UNITS_CONFIG", conf), \
            mock.patch.object(systemd, "sync_dropins", in_root):
        result = CliRunner().invoke(app, [*set_cmd, "--dry-run"])
        assert result.stdout.endswith(f"would remove {WATCH_DROPIN}\n"), result.output
        assert (root / WATCH_DROPIN.lstrip("/")).exists()
        result = CliRunner().invoke(app, set_cmd)
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith(f"removed {WATCH_DROPIN}\n")
    assert not (root / WATCH_DROPIN.lstrip("/")).exists()


@needs_analyze
@pytest.mark.integration
def test_systemd_analyze_verify_passes_with_the_swap_dir_dropins(tmp_path: Path) -> None:
    root = _installed(tmp_path)
    synced = sync_dropins(unit_dropins(Path("/srv/swap 100%"),
                                       ("kubepods.slice", "job 100%.slice")), root=root)
    assert len(synced.changes) == 3  # swap-dir.conf twice, the agent's watch-cgroups.conf
    units = root / "etc/systemd/system"
    result = in_namespace(f"SYSTEMD_UNIT_PATH={units}: systemd-analyze verify "
                          + " ".join(str(units / u) for u in (SWAP_UNIT, AGENT_UNIT)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
