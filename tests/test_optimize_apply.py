"""optimize apply / verify / revert on a whole (fake) filesystem: what is written, what not.

pyfakefs gives the node its real paths (/etc/sysctl.d, /etc/systemd/system, /proc/sys,
/var/lib/clusterctl); the laptop host tree supplies /proc and /sys. systemd is not
running in it, so restarts are reported as left to the operator; the restarts
themselves are tested under a real systemd (test_systemd_install.py).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
from pyfakefs.fake_file import FakeFile
from pyfakefs.fake_filesystem import FakeFilesystem

from clusterctl import config as cfg
from clusterctl.errors import HostError
from clusterctl.optimize import executor as optimize
from clusterctl.optimize.plan import DASK_ENV_FILE, DASK_YAML_FILE, OLLAMA_DROPIN, SYSCTL_FILE
from tests.hosttree import SAMPLES, laptop

ROOT = Path("/")
STATE = Path("/var/lib/clusterctl/originals.json")  # the saved originals, "optimize" section


def saved_originals() -> dict[str, Any]:
    """The "optimize" section of the saved originals."""
    section: dict[str, Any] = json.loads(STATE.read_text())["optimize"]
    return section


@pytest.fixture
def node(fs: FakeFilesystem) -> cfg.Config:
    fs.add_real_directory(SAMPLES)
    tree = laptop(ROOT)
    (ROOT / "run/systemd/system").rmdir()  # systemd is not PID 1 here
    tree.file("proc/sys/vm/swappiness", "60\n").file("proc/sys/vm/vfs_cache_pressure", "100\n")
    tree.file("usr/local/bin/ollama", "")
    Path("/usr/local/bin/ollama").chmod(0o755)
    (ROOT / "usr/lib/python3/dist-packages/dask-2024.8.0.dist-info").mkdir(parents=True)
    (ROOT / "usr/lib/python3/dist-packages/distributed-2024.8.0.dist-info").mkdir()
    tree.file("etc/sysctl.d/10-console-messages.conf", "kernel.printk = 4 4 1 7\n")
    return cfg.Config(ollama=cfg.OllamaConfig(url="http://127.0.0.1:9"))


def mtimes() -> dict[str, int]:
    paths = (SYSCTL_FILE, DASK_ENV_FILE, DASK_YAML_FILE, OLLAMA_DROPIN, str(STATE))
    return {p: Path(p).stat().st_mtime_ns for p in paths if Path(p).exists()}


def test_apply_writes_every_file_sets_sysctls_and_saves_originals_first(node: cfg.Config
                                                                         ) -> None:
    result = optimize.apply(node)
    assert sorted(result.written) == sorted([SYSCTL_FILE, OLLAMA_DROPIN, DASK_ENV_FILE,
                                             DASK_YAML_FILE])
    assert result.set_live == {"vm.swappiness": "10", "vm.vfs_cache_pressure": "50"}  # NVMe
    assert Path("/proc/sys/vm/swappiness").read_text() == "10\n"
    assert Path(SYSCTL_FILE).read_text().endswith("vm.swappiness = 10\n"
                                                  "vm.vfs_cache_pressure = 50\n")
    assert "[Service]\nEnvironment=\"OLLAMA_MAX_LOADED_MODELS=" in Path(OLLAMA_DROPIN).read_text()
    assert result.notes == ("systemd is not running here: restart clusterctl-dask-worker.service"
                            " yourself to use the new settings",
                            "systemd is not running here: restart ollama.service yourself to "
                            "use the new settings")
    saved = saved_originals()
    assert saved["originals"]["sysctl"] == {"vm.swappiness": "60", "vm.vfs_cache_pressure": "100"}
    assert saved["originals"]["files"] == dict.fromkeys(result.written)
    assert "/etc/systemd/system/ollama.service.d" in saved["originals"]["dirs"]
    assert "/etc/dask" in saved["originals"]["dirs"]
    assert oct(STATE.stat().st_mode & 0o777) == "0o600"
    events = Path("/var/lib/clusterctl/events.jsonl").read_text().splitlines()
    assert json.loads(events[-1])["event_type"] == "optimize_applied"


def test_a_second_apply_writes_nothing(node: cfg.Config) -> None:
    optimize.apply(node)
    before = mtimes()
    events = Path("/var/lib/clusterctl/events.jsonl").read_text()
    result = optimize.apply(node)
    assert (result.written, result.set_live, result.restarted) == ((), {}, ())
    assert mtimes() == before
    assert Path("/var/lib/clusterctl/events.jsonl").read_text() == events


def test_dry_run_changes_nothing(node: cfg.Config) -> None:
    result = optimize.apply(node, dry_run=True)
    assert SYSCTL_FILE in result.written
    assert result.set_live["vm.swappiness"] == "10"
    assert not Path(SYSCTL_FILE).exists() and not STATE.exists()
    assert Path("/proc/sys/vm/swappiness").read_text() == "60\n"


def test_revert_puts_everything_back(node: cfg.Config) -> None:
    Path("/etc/dask").mkdir()
    Path(DASK_YAML_FILE).write_text("# the operator's own\n")  # a file we replace, then restore
    optimize.apply(node)
    result = optimize.revert(node)
    assert result.restored_sysctl == {"vm.swappiness": "60", "vm.vfs_cache_pressure": "100"}
    assert Path("/proc/sys/vm/swappiness").read_text() == "60\n"
    assert Path(DASK_YAML_FILE).read_text() == "# the operator's own\n"
    assert result.restored_files == (DASK_YAML_FILE,)
    for path in (SYSCTL_FILE, OLLAMA_DROPIN, DASK_ENV_FILE):
        assert not Path(path).exists()
    assert not Path("/etc/systemd/system/ollama.service.d").exists()  # the dir it made
    assert Path("/etc/dask").is_dir()  # not its own
    assert Path("/etc/sysctl.d/10-console-messages.conf").exists()
    assert not STATE.exists()
    assert optimize.revert(node).restored_sysctl == {}  # nothing left to do


def refusing_sysctl(fs: FakeFilesystem, key: str, accepted: str) -> None:
    """/proc/sys/KEY as the kernel keeps it: a write of any value but ``accepted`` fails
    with EINVAL and leaves the value as it was (``sysctl -w`` of a value out of range)."""

    def write(file: FakeFile) -> None:
        if file.contents not in ("", accepted):  # "": the truncate of opening it
            file.set_initial_contents(accepted)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    path = "/proc/sys/" + key.replace(".", "/")
    fs.remove(path)
    fs.create_file(path, contents=accepted, side_effect=write)


def tree(*tops: str) -> dict[str, str | None]:
    """Every directory (None) and file (its text) under ``tops``."""
    out: dict[str, str | None] = {}
    for top in map(Path, tops):
        for path in (top, *sorted(top.rglob("*"))):
            out[str(path)] = None if path.is_dir() else path.read_text()
    return out


def test_a_failure_half_way_keeps_the_originals_and_revert_undoes_the_part_applied(
        node: cfg.Config, fs: FakeFilesystem) -> None:
    Path("/etc/dask").mkdir()
    Path(DASK_YAML_FILE).write_text("# the operator's own\n")  # a file apply replaces
    # the files are written, then vm.swappiness is set, then the kernel refuses the last one
    refusing_sysctl(fs, "vm.vfs_cache_pressure", "100\n")
    before = tree("/etc", "/proc/sys")
    with pytest.raises(HostError) as err:
        optimize.apply(node)
    assert err.value.message == ("optimize apply stopped half-way: cannot set "
                                 "vm.vfs_cache_pressure = 50: Invalid argument")
    assert "`clusterctl optimize revert` to undo the part applied" in (err.value.fix or "")
    # the part applied: every file written and one sysctl set
    assert Path("/proc/sys/vm/swappiness").read_text() == "10\n"
    assert Path(DASK_YAML_FILE).read_text() != "# the operator's own\n"
    assert Path(SYSCTL_FILE).exists() and Path(OLLAMA_DROPIN).exists()
    saved = saved_originals()  # the originals are on disk
    assert saved["originals"]["sysctl"] == {"vm.swappiness": "60", "vm.vfs_cache_pressure": "100"}
    assert saved["originals"]["files"][DASK_YAML_FILE] == "# the operator's own\n"
    assert saved["originals"]["files"][SYSCTL_FILE] is None
    result = optimize.revert(node)
    assert result.restored_sysctl == {"vm.swappiness": "60", "vm.vfs_cache_pressure": "100"}
    assert Path("/proc/sys/vm/swappiness").read_text() == "60\n"
    assert Path(DASK_YAML_FILE).read_text() == "# the operator's own\n"
    assert tree("/etc", "/proc/sys") == before  # everything as it was before apply
    assert not STATE.exists()


def test_revert_puts_back_what_an_older_clusterctl_saved_in_optimize_json(
        node: cfg.Config) -> None:
    """Applied by a clusterctl that kept the originals in optimize.json: this one moves them
    into originals.json and its revert puts everything back."""
    Path("/etc/dask").mkdir()
    Path(DASK_YAML_FILE).write_text("# the operator's own\n")
    before = tree("/etc", "/proc/sys")
    optimize.apply(node)
    old = STATE.with_name("optimize.json")  # as the older clusterctl left it
    old.write_text(json.dumps({"version": 1, **saved_originals()}, indent=2) + "\n")
    STATE.unlink()
    result = optimize.revert(node)
    assert result.restored_sysctl == {"vm.swappiness": "60", "vm.vfs_cache_pressure": "100"}
    assert tree("/etc", "/proc/sys") == before  # everything as it was before apply
    assert not STATE.exists() and not old.exists()  # nothing left to revert


def test_a_second_apply_never_takes_its_own_values_for_originals(node: cfg.Config) -> None:
    optimize.apply(node)
    Path("/proc/sys/vm/swappiness").write_text("33\n")  # drifted; apply puts 10 back
    assert optimize.apply(node).set_live == {"vm.swappiness": "10"}
    assert saved_originals()["originals"]["sysctl"]["vm.swappiness"] == "60"
    optimize.revert(node)
    assert Path("/proc/sys/vm/swappiness").read_text() == "60\n"


def test_a_second_apply_keeps_the_first_original_of_a_file(node: cfg.Config) -> None:
    Path("/etc/dask").mkdir()
    Path(DASK_YAML_FILE).write_text("# the operator's own\n")
    optimize.apply(node)
    Path(DASK_YAML_FILE).write_text("# edited since\n")  # drifted; apply writes it again
    assert optimize.apply(node).written == (DASK_YAML_FILE,)
    optimize.revert(node)
    assert Path(DASK_YAML_FILE).read_text() == "# the operator's own\n"


def test_verify_reports_drift(node: cfg.Config) -> None:
    assert optimize.verify(node) == ()
    optimize.apply(node)
    assert optimize.verify(node) == ()
    Path("/proc/sys/vm/swappiness").write_text("60\n")  # someone ran sysctl -w
    Path(OLLAMA_DROPIN).write_text("[Service]\n")
    drift = {d.what: d for d in optimize.verify(node)}
    assert drift["vm.swappiness"].applied == "10" and drift["vm.swappiness"].now == "60"
    assert drift[OLLAMA_DROPIN].now == "edited since"


def test_a_later_sysctl_file_is_reported_and_not_fought(node: cfg.Config) -> None:
    Path("/etc/sysctl.d/99-local.conf").write_text("# mine\nvm.swappiness=5\n")
    _, plan = optimize.plan_now(node)
    assert [(o.key, o.path, o.value) for o in plan.overridden] == [
        ("vm.swappiness", "/etc/sysctl.d/99-local.conf", "5")]
    result = optimize.apply(node)
    assert "vm.swappiness" not in result.set_live
    assert Path("/proc/sys/vm/swappiness").read_text() == "60\n"
    assert "vm.swappiness" not in Path(SYSCTL_FILE).read_text()


def test_a_broken_state_file_stops_apply_with_a_fix(node: cfg.Config) -> None:
    STATE.parent.mkdir(parents=True, exist_ok=True)
    STATE.write_text("{not json")
    with pytest.raises(HostError) as err:
        optimize.apply(node)
    assert str(STATE) in err.value.message
    assert "restore originals.json from a backup" in (err.value.fix or "")
    assert not Path(SYSCTL_FILE).exists()
