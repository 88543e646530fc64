"""The unit files: systemd-analyze verify, exposure scores that may only go down, and the
drop-ins clusterctl writes for a swap dir outside /var/lib/clusterctl."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from clusterctl.system.systemd import (
    AGENT_UNIT,
    SWAP_UNIT,
    swap_dir_unreachable,
    sync_swap_dir_dropins,
)
from tests.conftest import REPO

UNITS = sorted(p for p in (REPO / "units").iterdir() if p.suffix in (".service", ".timer"))
# `systemd-analyze security --offline=yes` exposure, recorded when the unit was written.
RECORDED_EXPOSURE = {"clusterctl-swap.service": 1.3, "clusterctl-optimize.service": 1.8,
                     "clusterctl-agent.service": 2.4,
                     "clusterctl-dask-worker.service": 1.5}
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
    assert list(tmp_path.iterdir()) == []


@needs_analyze
@pytest.mark.integration
def test_systemd_analyze_verify_passes_with_the_swap_dir_dropins(tmp_path: Path) -> None:
    root = _installed(tmp_path)
    sync_swap_dir_dropins(Path("/srv/swap 100%"), root=root)
    units = root / "etc/systemd/system"
    result = in_namespace(f"SYSTEMD_UNIT_PATH={units}: systemd-analyze verify "
                          + " ".join(str(units / u) for u in (SWAP_UNIT, AGENT_UNIT)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
