"""install.sh into a staging root: fresh, again (idempotent), uninstall, purge."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from clusterctl.agent.control import read_token
from tests.conftest import REPO

pytestmark = pytest.mark.integration

INSTALL = REPO / "install.sh"
DEFAULT_CONF = (REPO / "etc/clusterctl.toml").read_text()


def install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CLUSTERCTL_CONFIG", "VIRTUAL_ENV")}
    result = subprocess.run([str(INSTALL), "--root", str(root), *args], capture_output=True,
                            text=True, timeout=600, env=env, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its mtime and size (links not followed)."""
    out = {}
    for path in root.rglob("*"):
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_mtime_ns, st.st_size)
    return out


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.skip("install.sh may install build packages with apt; run as root")
    root = tmp_path_factory.mktemp("stage")
    result = install(root)  # with the closing check
    assert "running clusterctl check quick" in result.stdout
    assert ": tier " in result.stdout
    return root


def test_fresh_install_lays_out_the_tree(staged: Path) -> None:
    binary = staged / "opt/clusterctl/venv/bin/clusterctl"
    assert binary.exists()
    link = staged / "usr/local/bin/clusterctl"
    assert str(link.readlink()) == "/opt/clusterctl/venv/bin/clusterctl"  # the final path
    assert (staged / "etc/clusterctl/clusterctl.toml").read_text() == DEFAULT_CONF
    assert not (staged / "etc/clusterctl/clusterctl.toml.dist").exists()
    assert (staged / "var/lib/clusterctl").is_dir()
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             check=True)
    assert version.stdout.startswith("clusterctl ")


def test_second_run_changes_nothing(staged: Path) -> None:
    before = snapshot(staged)
    result = install(staged, "--no-check")
    assert "installing" not in result.stdout
    assert "unchanged /opt/clusterctl/venv" in result.stdout
    assert snapshot(staged) == before


def test_an_edited_config_is_kept_and_the_new_default_goes_beside_it(staged: Path) -> None:
    conf = staged / "etc/clusterctl/clusterctl.toml"
    edited = DEFAULT_CONF.replace('max_size = "16G"', 'max_size = "64G"  # big node')
    conf.write_text(edited)
    result = install(staged, "--no-check")
    assert "kept your /etc/clusterctl/clusterctl.toml" in result.stdout
    assert conf.read_text() == edited
    assert (staged / "etc/clusterctl/clusterctl.toml.dist").read_text() == DEFAULT_CONF
    before = snapshot(staged)
    install(staged, "--no-check")
    assert snapshot(staged) == before  # .dist is not rewritten either


DROPINS = tuple(f"etc/systemd/system/{unit}.d/swap-dir.conf"
                for unit in ("clusterctl-swap.service", "clusterctl-agent.service"))
# for a watched cgroup outside the agent's default slices
WATCH_DROPIN = "etc/systemd/system/clusterctl-agent.service.d/watch-cgroups.conf"


def test_an_existing_config_with_a_swap_dir_elsewhere_gets_the_units_dropins(
        staged: Path) -> None:
    """Under ProtectSystem=strict the swap units write only /var/lib/clusterctl: install.sh
    on a config whose swap dir is elsewhere gives them ReadWritePaths= for it, and takes
    that away once the dir is back; --uninstall removes them with the units."""
    conf = staged / "etc/clusterctl/clusterctl.toml"
    kept = conf.read_text()
    conf.write_text(kept.replace('dir = "/var/lib/clusterctl/swap"', 'dir = "/srv/swap"'))
    try:
        result = install(staged, "--no-check")
        for dropin in DROPINS:
            assert f"install.sh: wrote /{dropin}" in result.stdout
            text = (staged / dropin).read_text()
            assert "ReadWritePaths=-/srv/swap\n" in text
            assert "RequiresMountsFor=/srv/swap\n" in text
        before = snapshot(staged)
        install(staged, "--no-check")
        assert snapshot(staged) == before  # idempotent
    finally:
        conf.write_text(kept)
    result = install(staged, "--no-check")
    for dropin in DROPINS:
        assert f"install.sh: removed /{dropin}" in result.stdout
        assert not (staged / dropin).parent.exists()


FLEET_TOKENS = ("etc/clusterctl/fleet-join-token", "etc/clusterctl/fleet-admin-token")


def test_fleet_makes_its_tokens_once_and_never_replaces_them(staged: Path) -> None:
    """The fleet unit is copied by every install; --fleet adds the control plane's tokens,
    root-only, each 32 random bytes (43 urlsafe characters) that the agent's token reader
    accepts; a later install keeps them, an operator's own included."""
    assert (staged / "etc/systemd/system/clusterctl-fleet.service").read_text() == (
        REPO / "units/clusterctl-fleet.service").read_text()
    tokens = [staged / t for t in FLEET_TOKENS]
    assert not any(t.exists() for t in tokens)  # not without --fleet
    result = install(staged, "--fleet", "--no-check")
    values = []
    for token in tokens:
        assert f"install.sh: created /{token.relative_to(staged)} (mode 0600)" in result.stdout
        st = token.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 0)
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}\n", token.read_text()), token.read_text()
        assert read_token(token) == token.read_text().strip()
        values.append(token.read_text())
    assert values[0] != values[1]
    manifest = (staged / "var/lib/clusterctl/install.manifest").read_text().splitlines()
    assert [f"token /{t}" for t in FLEET_TOKENS] == [x for x in manifest if x.startswith("token")]
    before = snapshot(staged)
    result = install(staged, "--fleet", "--no-check")
    assert "install.sh: kept /etc/clusterctl/fleet-join-token" in result.stdout
    assert snapshot(staged) == before
    tokens[1].write_text("the-operators-own\n")
    install(staged, "--fleet", "--no-check")
    install(staged, "--no-check")
    assert [t.read_text() for t in tokens] == [values[0], "the-operators-own\n"]


def test_help_tells_what_fleet_does() -> None:
    result = subprocess.run([str(INSTALL), "--help"], capture_output=True, text=True,
                            check=True)
    assert "--fleet" in result.stdout
    assert "/etc/clusterctl/fleet-join-token" in result.stdout
    assert result.stdout.rstrip().endswith("/var/lib/clusterctl/install.manifest.")


def test_uninstall_keeps_config_and_state_then_purge_leaves_nothing(staged: Path) -> None:
    conf = staged / "etc/clusterctl/clusterctl.toml"
    conf.write_text(conf.read_text().replace('dir = "/var/lib/clusterctl/swap"',
                                             'dir = "/srv/swap"').replace(
        'watch_cgroups = ["system.slice",', 'watch_cgroups = ["kubepods.slice", "system.slice",'))
    result = install(staged, "--no-check")
    assert f"install.sh: wrote /{WATCH_DROPIN}" in result.stdout
    assert "ReadWritePaths=-/sys/fs/cgroup/kubepods.slice " in (staged / WATCH_DROPIN).read_text()
    assert all((staged / dropin).exists() for dropin in DROPINS)
    result = install(staged, "--uninstall")
    assert "removed /opt/clusterctl" in result.stdout
    for dropin in (*DROPINS, WATCH_DROPIN):  # with the units they let write the swap dir
        assert f"removed /{dropin}" in result.stdout
        assert not (staged / dropin).parent.exists()
    assert not (staged / "opt/clusterctl").exists()
    assert not (staged / "usr/local/bin/clusterctl").is_symlink()
    assert (staged / "etc/clusterctl/clusterctl.toml").exists()
    assert (staged / "var/lib/clusterctl").is_dir()
    assert all((staged / t).exists() for t in FLEET_TOKENS)  # the agents hold the join token
    result = install(staged, "--purge")
    for token in FLEET_TOKENS:
        assert f"install.sh: removed /{token}\n" in result.stdout
    assert list(staged.iterdir()) == []


def test_bad_option_is_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run([str(INSTALL), "--frobnicate"], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 2
    assert result.stderr == "install.sh: unknown option --frobnicate (see --help)\n"


OVERLAID = ("/etc", "/opt", "/usr/local", "/var/lib")


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_real_root_install_and_purge_in_a_private_mount_namespace(tmp_path: Path) -> None:
    """install.sh without --root, as on a node; overlays keep it off this machine."""
    if os.geteuid() != 0:
        pytest.skip("needs root for mount namespaces")
    mounts = "\n".join(
        f"mkdir -p {tmp_path}{d}/upper {tmp_path}{d}/work && mount -t overlay overlay "
        f"-o lowerdir={d},upperdir={tmp_path}{d}/upper,workdir={tmp_path}{d}/work {d}"
        for d in OVERLAID)
    script = f"""set -eu
{mounts}
{INSTALL} --no-check
test -L /usr/local/bin/clusterctl
/usr/local/bin/clusterctl --version
cmp {REPO}/etc/clusterctl.toml /etc/clusterctl/clusterctl.toml
{INSTALL} --no-check | grep -q 'unchanged /opt/clusterctl/venv'
{INSTALL} --purge
for p in /opt/clusterctl /usr/local/bin/clusterctl /etc/clusterctl /var/lib/clusterctl; do
  if [ -e "$p" ] || [ -L "$p" ]; then echo "left behind: $p"; exit 1; fi
done
echo PURGED
"""
    env = {k: v for k, v in os.environ.items() if k not in ("CLUSTERCTL_CONFIG", "VIRTUAL_ENV")}
    before = _as_they_are(INSTALLED_PATHS)  # a real install here (README order) stays as is
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c",
                             script], capture_output=True, text=True, timeout=600, env=env,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PURGED" in result.stdout
    assert _as_they_are(INSTALLED_PATHS) == before  # nothing reached this machine


INSTALLED_PATHS = ("/opt/clusterctl", "/usr/local/bin/clusterctl", "/etc/clusterctl",
                   "/var/lib/clusterctl")


def _as_they_are(paths: tuple[str, ...]) -> dict[str, tuple[int, int] | None]:
    """Each path's inode and change time, or None where there is nothing. The state dir's
    change time is left out: a real install's running agent writes its state there."""
    out: dict[str, tuple[int, int] | None] = {}
    for name in paths:
        try:
            st = os.lstat(name)
        except FileNotFoundError:
            out[name] = None
        else:
            out[name] = (st.st_ino, 0 if name == "/var/lib/clusterctl" else st.st_ctime_ns)
    return out


def test_a_stale_build_dir_in_the_sources_is_not_what_gets_installed(tmp_path: Path) -> None:
    """A copy of the sources that kept older mtimes, beside a build/ from an earlier build:
    the venv gets the sources, not the older build (setuptools goes by mtimes)."""
    if os.geteuid() != 0:
        pytest.skip("install.sh may install build packages with apt; run as root")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("install.sh", "pyproject.toml", "README.md", "agent", "etc", "units"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, src / name)  # copy2/copytree keep the mtimes
    stale = src / "build/lib/clusterctl/__init__.py"
    stale.parent.mkdir(parents=True)
    stale.write_text('__version__ = "0.0.0-stale"\n')  # newer than every source file
    root = tmp_path / "root"
    env = {k: v for k, v in os.environ.items() if k not in ("CLUSTERCTL_CONFIG", "VIRTUAL_ENV")}
    result = subprocess.run([str(src / "install.sh"), "--root", str(root), "--no-check"],
                            capture_output=True, text=True, timeout=600, env=env, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    installed = next(root.glob("opt/clusterctl/venv/lib/python3*/site-packages/clusterctl"))
    assert (installed / "__init__.py").read_text() == (
        REPO / "agent/clusterctl/__init__.py").read_text()
