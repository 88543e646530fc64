from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from clusterctl import config as cfg
from clusterctl.errors import ConfigError, HostError
from clusterctl.units import GIB
from tests.conftest import REPO

SHIPPED = REPO / "etc" / "clusterctl.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "clusterctl.toml"
    path.write_text(text)
    return path


def first_error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        cfg.load(path)
    return info.value


# -- defaults and sources ---------------------------------------------------


def test_shipped_default_file_is_exactly_the_built_in_defaults() -> None:
    loaded = cfg.load(SHIPPED)
    assert loaded.config == cfg.Config()


def test_shipped_default_file_has_every_spec_key_with_a_comment() -> None:
    text = SHIPPED.read_text()
    for section, keys in cfg.as_toml_dict(cfg.Config()).items():
        assert f"[{section}]" in text
        lines = text.splitlines()
        for key in keys:
            number = next(n for n, ln in enumerate(lines) if ln.startswith(f"{key} ="))
            while "=" in lines[number - 1] and not lines[number - 1].startswith("#"):
                number -= 1  # keys that share one comment
            assert lines[number - 1].startswith("#"), key


def test_defaults_are_the_documented_values() -> None:
    c = cfg.Config()
    assert (c.swap.min_size_bytes, c.swap.max_size_bytes, c.swap.increment_bytes) == (
        2 * GIB, 16 * GIB, 1 * GIB)
    assert (c.swap.memory_threshold_percent, c.swap.check_interval_s) == (80, 30)
    assert (c.gpu.temp_optimal_c, c.gpu.temp_normal_c, c.gpu.temp_throttle_c,
            c.gpu.temp_critical_c) == (65, 75, 85, 90)
    assert c.hibernate.enabled is False and c.hibernate.action == ("none",)
    assert c.gpu.throttle_enabled is False
    assert c.api.listen == "127.0.0.1:9408"


def test_missing_default_file_means_built_in_defaults() -> None:
    loaded = cfg.load(None, env={})
    assert loaded.source == "default"
    assert not loaded.file_exists
    assert loaded.config == cfg.Config()


def test_file_values_overlay_the_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, '[swap]\nmax_size = "32G"\n')
    loaded = cfg.load(path)
    assert loaded.config.swap.max_size_bytes == 32 * GIB
    assert loaded.config.swap.min_size_bytes == 2 * GIB  # untouched default


def test_flag_wins_over_environment_which_wins_over_default(tmp_path: Path) -> None:
    flag = write(tmp_path, "")
    env = {"CLUSTERCTL_CONFIG": str(tmp_path / "env.toml")}
    assert cfg.resolve_path(flag, env) == (flag, "--config")
    assert cfg.resolve_path(None, env) == (tmp_path / "env.toml", "CLUSTERCTL_CONFIG")
    assert cfg.resolve_path(None, {}) == (cfg.DEFAULT_PATH, "default")


def test_an_explicitly_named_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as info:
        cfg.load(None, env={"CLUSTERCTL_CONFIG": str(tmp_path / "nope.toml")})
    assert str(tmp_path / "nope.toml") in str(info.value)
    assert info.value.exit_code == 2


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        cfg.load(tmp_path)


# -- every class of bad input: one line with file, line, key and expectation --


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    err = first_error(tmp_path, '[swap]\nmin_size = "2G"\nmax_size = 16G\n')
    assert err.line == 3
    assert str(err).startswith(f"{tmp_path / 'clusterctl.toml'}:3: TOML syntax error")
    assert "\n" not in err.one_line()


def test_unknown_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    err = first_error(tmp_path, '[swap]\ndir = "/var/lib/x"\nmin_sise = "2G"\n')
    assert err.line == 3
    assert err.key == "swap.min_sise"
    assert 'did you mean "min_size"' in str(err)
    assert "known keys in [swap]" in err.one_line()


def test_unknown_section_is_named(tmp_path: Path) -> None:
    err = first_error(tmp_path, "[swap]\n\n[gpus]\nmonitor_interval = 3\n")
    assert err.line == 3
    assert "unknown section [gpus] (did you mean [gpu]?)" in str(err)
    assert "known sections: swap, optimize, gpu," in err.one_line()


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ('[swap]\nmemory_threshold = "80"\n', "swap.memory_threshold",
         'expected a whole number, got "80" (a string)'),
        ("[gpu]\nthrottle_enabled = 1\n", "gpu.throttle_enabled",
         "expected true or false, got 1 (an integer)"),
        ("[swap]\nmin_size = true\n", "swap.min_size", 'expected a size like "512M"'),
        ('[swap]\nmin_size = "2X"\n', "swap.min_size", 'expected a size like "512M", "2G"'),
        ('[swap]\ndir = "relative/dir"\n', "swap.dir", "expected an absolute path"),
        ('[hibernate]\naction = "sleep"\n', "hibernate.action", 'unknown action "sleep"'),
        ('[hibernate]\naction = ["none", "command"]\n', "hibernate.action",
         '"none" cannot be combined'),
        ('[api]\nlisten = "localhost:9408"\n', "api.listen", "expected an IP address"),
        ('[api]\nlisten = "127.0.0.1:99999"\n', "api.listen", "port 1-65535"),
        ('[heartbeat]\ncontrol_url = "ftp://x"\n', "heartbeat.control_url",
         "expected an http:// or https:// URL"),
        ("[gpu]\nmonitor_interval = \"fast\"\n", "gpu.monitor_interval", "expected a number"),
    ],
)
def test_wrong_types_say_what_is_expected(tmp_path: Path, text: str, key: str,
                                          expected: str) -> None:
    err = first_error(tmp_path, text)
    assert err.key == key
    assert expected in str(err)
    assert err.line is not None
    assert str(err).startswith(f"{tmp_path / 'clusterctl.toml'}:{err.line}: {key}: ")


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("[swap]\ncheck_interval = -5\n", "swap.check_interval", "must be at least 1, got -5"),
        ("[heartbeat]\ninterval = 0\n", "heartbeat.interval", "must be at least 1, got 0"),
        ("[swap]\nmemory_threshold = 120\n", "swap.memory_threshold", "at most 100, got 120"),
        ('[swap]\nincrement = "1M"\n', "swap.increment", "at least 64M, got 1M"),
        ("[optimize]\nswappiness_ssd = 300\n", "optimize.swappiness_ssd", "at most 200"),
        ("[hibernate]\ngpu_usage_threshold = -1.0\n", "hibernate.gpu_usage_threshold",
         "at least 0"),
    ],
)
def test_out_of_range_values_name_the_range(tmp_path: Path, text: str, key: str,
                                            expected: str) -> None:
    err = first_error(tmp_path, text)
    assert err.key == key
    assert expected in str(err)


def test_min_size_above_max_size_is_refused(tmp_path: Path) -> None:
    err = first_error(tmp_path, '[swap]\nmin_size = "32G"\nmax_size = "16G"\n')
    assert err.key == "swap.min_size"
    assert err.line == 2
    assert "min_size (32G) is larger than max_size (16G)" in str(err)


def test_thresholds_must_rise(tmp_path: Path) -> None:
    err = first_error(tmp_path, "[gpu]\ntemp_normal = 80\ntemp_throttle = 78\n")
    assert err.key == "gpu.temp_throttle"
    assert err.line == 3
    assert "temp_normal = 80 but temp_throttle = 78" in str(err)
    assert "temp_optimal < temp_normal < temp_throttle < temp_critical" in str(err)


def test_validate_reports_every_problem_not_just_the_first(tmp_path: Path) -> None:
    path = write(tmp_path, "[swap]\ncheck_interval = -5\nbogus = 1\n[gpu]\nhistory_size = 0\n")
    _path, _source, exists, errors = cfg.validate_file(path)
    assert exists
    assert [e.key for e in errors] == ["swap.check_interval", "swap.bogus", "gpu.history_size"]
    assert [e.line for e in errors] == [2, 3, 5]


def test_sizes_accept_fractions(tmp_path: Path) -> None:
    path = write(tmp_path, '[swap]\nincrement = "1.5G"\n')
    assert cfg.load(path).config.swap.increment_bytes == GIB + GIB // 2


def test_action_may_be_a_list(tmp_path: Path) -> None:
    path = write(tmp_path, '[hibernate]\naction = ["command", "control"]\ncommand = ["true"]\n')
    assert cfg.load(path).config.hibernate.action == ("command", "control")


def test_ipv6_loopback_listen_address(tmp_path: Path) -> None:
    path = write(tmp_path, '[api]\nlisten = "[::1]:9408"\n')
    assert cfg.load(path).config.api.listen == "[::1]:9408"


# -- editing ------------------------------------------------------------------


def test_set_keeps_comments_and_layout(tmp_path: Path) -> None:
    path = tmp_path / "clusterctl.toml"
    path.write_text(SHIPPED.read_text())
    new = cfg.set_values(path, {"swap.max_size": "32G", "gpu.throttle_enabled": "true"})
    assert new.swap.max_size_bytes == 32 * GIB
    assert new.gpu.throttle_enabled is True
    text = path.read_text()
    assert 'max_size = "32G"' in text
    assert "throttle_enabled = true" in text
    before = SHIPPED.read_text().splitlines()
    after = text.splitlines()
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert changed == [('max_size = "16G"', 'max_size = "32G"'),
                       ("throttle_enabled = false", "throttle_enabled = true")]


def test_set_keeps_mode_and_owner(tmp_path: Path) -> None:
    path = write(tmp_path, "[swap]\n")
    path.chmod(0o640)
    cfg.set_values(path, {"swap.min_size": "4G"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_set_creates_a_missing_file_with_a_new_section(tmp_path: Path) -> None:
    path = tmp_path / "new.toml"
    cfg.set_values(path, {"heartbeat.control_url": "https://control.example/"})
    assert cfg.load(path).config.heartbeat.control_url == "https://control.example"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("swap.min_size", "64G", "min_size (64G) is larger than max_size (16G)"),
        ("swap.max_sise", "8G", 'did you mean "max_size"'),
        ("swp.max_size", "8G", "unknown section [swp]"),
        ("swap.check_interval", "soon", "expected a whole number"),
    ],
)
def test_a_bad_set_changes_nothing(tmp_path: Path, key: str, value: str, message: str) -> None:
    path = write(tmp_path, "# mine\n[swap]\nmin_size = \"2G\"\n")
    before = path.read_bytes()
    inode = path.stat().st_ino
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg.set_values(path, {key: value})
    assert path.read_bytes() == before
    assert path.stat().st_ino == inode
    assert [p.name for p in tmp_path.iterdir()] == ["clusterctl.toml"]  # no temp files left


def test_set_refuses_a_file_with_a_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[swap\n")
    with pytest.raises(ConfigError, match="TOML syntax error"):
        cfg.set_values(path, {"swap.min_size": "4G"})
    assert path.read_text() == "[swap\n"


def test_dry_run_set_validates_but_writes_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, "[swap]\n")
    new = cfg.set_values(path, {"swap.max_size": "8G"}, dry_run=True)
    assert new.swap.max_size_bytes == 8 * GIB
    assert path.read_text() == "[swap]\n"


def test_set_replaces_the_file_atomically(tmp_path: Path) -> None:
    path = write(tmp_path, "[swap]\n")
    inode = path.stat().st_ino
    cfg.set_values(path, {"swap.max_size": "8G"})
    assert path.stat().st_ino != inode  # a new file renamed over the old one
    assert [p.name for p in tmp_path.iterdir()] == ["clusterctl.toml"]


def test_set_on_a_symlinked_config_edits_the_target_and_keeps_the_link(tmp_path: Path) -> None:
    managed = tmp_path / "managed" / "clusterctl.toml"
    managed.parent.mkdir()
    managed.write_text("# from config management\n[swap]\n")
    link = tmp_path / "clusterctl.toml"
    link.symlink_to(managed)
    cfg.set_values(link, {"swap.max_size": "8G"})
    assert link.is_symlink()
    assert 'max_size = "8G"' in managed.read_text()


@pytest.mark.integration
def test_set_without_permission_says_run_as_root() -> None:
    """As an ordinary user: one line, exit 1, the file untouched."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop to nobody")
    workdir = Path(tempfile.mkdtemp(prefix="clusterctl-perm-"))
    try:
        workdir.chmod(0o755)
        path = workdir / "clusterctl.toml"
        path.write_text("[swap]\n")
        path.chmod(0o644)
        result = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
             sys.executable, "-m", "clusterctl", "config", "set", "swap.max_size", "8G",
             "--config", str(path)],
            capture_output=True, text=True, check=False, timeout=60,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "agent")})
        assert result.returncode == 1
        assert result.stderr == (f"clusterctl: cannot write {path}: permission denied; "
                                 "run as root\n")
        assert path.read_text() == "[swap]\n"
    finally:
        shutil.rmtree(workdir)


def test_a_key_where_a_table_belongs(tmp_path: Path) -> None:
    err = first_error(tmp_path, "swap = 5\n")
    assert (err.key, err.line) == ("swap", 1)
    assert "expected a [swap] table, got an integer" in str(err)


def test_a_config_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "clusterctl.toml"
    path.write_bytes(b"[swap]\ndir = \"/var/lib/\xff\"\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        cfg.load(path)


def test_set_into_a_missing_directory_names_it(tmp_path: Path) -> None:
    with pytest.raises(HostError, match=r"directory .*absent does not exist") as info:
        cfg.set_values(tmp_path / "absent" / "c.toml", {"swap.max_size": "8G"})
    assert info.value.fix is not None and "create" in info.value.fix


@pytest.mark.parametrize("value", ['["../../etc"]', '["system.slice/./x"]', '[""]', '["/"]',
                                   '["a\\nb"]', '"system.slice"', "[1]"])
def test_watch_cgroups_takes_only_paths_under_the_cgroup_root(tmp_path: Path, value: str
                                                              ) -> None:
    err = first_error(tmp_path, f"[swap]\nwatch_cgroups = {value}\n")
    assert "watch_cgroups" in str(err) and "cgroup path" in str(err)


def test_watch_cgroups_are_kept_without_their_slashes(tmp_path: Path) -> None:
    path = write(tmp_path,
                 '[swap]\nwatch_cgroups = ["/machine.slice/", "system.slice/db.service"]\n')
    assert cfg.load(path).config.swap.watch_cgroups == ("machine.slice", "system.slice/db.service")
    cfg.set_values(path, {"swap.watch_cgroups": "user.slice, kubepods.slice"})
    assert cfg.load(path).config.swap.watch_cgroups == ("user.slice", "kubepods.slice")


def test_watch_cgroups_drops_repeats_and_has_a_cap(tmp_path: Path) -> None:
    path = write(tmp_path, '[swap]\nwatch_cgroups = ["user.slice", "/user.slice/"]\n')
    assert cfg.load(path).config.swap.watch_cgroups == ("user.slice",)
    many = ", ".join(f'"g{i}.slice"' for i in range(cfg.MAX_WATCH_CGROUPS + 1))
    err = first_error(tmp_path, f"[swap]\nwatch_cgroups = [{many}]\n")
    assert f"at most {cfg.MAX_WATCH_CGROUPS} cgroups" in str(err)
