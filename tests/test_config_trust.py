"""Config that a root agent must not trust: each is one line and exit 2 from `config validate`,
and `optimize monitor` never removes anything outside a cache (issue 12)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clusterctl import config as cfg
from clusterctl import log
from clusterctl.cli import app
from clusterctl.errors import ConfigError
from clusterctl.optimize.monitor import MonitorAction, execute

runner = CliRunner()
NOBODY = 65534


def clusterctl(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def validate(tmp_path: Path, text: str) -> tuple[int, str]:
    """`clusterctl config validate` on ``text``: the exit code and stderr."""
    path = tmp_path / "clusterctl.toml"
    path.write_text(text)
    code, _out, err = clusterctl("config", "validate", "--config", str(path))
    return code, err


def refused(tmp_path: Path, text: str, key: str, *expected: str) -> str:
    """``text`` is refused with exit 2 and one stderr line naming ``key`` and ``expected``."""
    code, err = validate(tmp_path, text)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("clusterctl: "), err
    assert "internal error" not in err
    assert f" {key}: " in err
    for part in expected:
        assert part in err
    return err


def accepted(tmp_path: Path, text: str) -> None:
    code, err = validate(tmp_path, text)
    assert code == 0, err


# -- finding 1: cleanup_paths may name only caches ------------------------------------------


@pytest.mark.parametrize("listed", ["/etc/.", "/var/lib", "/usr/..", "/", "//etc", "/etc/ssh",
                                    "/var/lib/dpkg", "/var/lib/clusterctl", "/tmp", "/var/tmp",
                                    "/home/ann", "/root", "/root/.cache", "/data/x", "/lib64/x",
                                    "/boot/efi/x", "/srv", "/opt/conda"])
def test_cleanup_paths_refuses_system_trees_however_written(tmp_path: Path, listed: str) -> None:
    refused(tmp_path, f'[optimize]\ncleanup_paths = ["/var/cache/pip", "{listed}"]\n',
            "optimize.cleanup_paths", f'refusing "{listed}"', "list a cache below /var/cache")


@pytest.mark.parametrize("listed", ["/var/cache/pip", "/tmp/hf-cache", "/var/tmp/builds",
                                    "/root/.cache/pip", "/home/ann/.cache/huggingface",
                                    "/opt/conda/pkgs", "/data/cache/hf"])
def test_cleanup_paths_accepts_caches(tmp_path: Path, listed: str) -> None:
    accepted(tmp_path, f'[optimize]\ncleanup_paths = ["{listed}"]\n')


def test_cleanup_paths_may_not_hold_clusterctls_own_state(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    refused(tmp_path, f'[paths]\nstate_dir = "{cache}/state"\n'
            f'[optimize]\ncleanup_paths = ["{cache}"]\n', "optimize.cleanup_paths",
            "holds or is inside [paths] state_dir")
    refused(tmp_path, f'[swap]\ndir = "{cache}"\n[optimize]\ncleanup_paths = ["{cache}/."]\n',
            "optimize.cleanup_paths", "[swap] dir")


def test_cleanup_paths_through_a_symlink_to_a_system_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cache").symlink_to("/etc")
    err = refused(tmp_path, f'[optimize]\ncleanup_paths = ["{tmp_path}/cache"]\n',
                  "optimize.cleanup_paths", "resolves to /etc", 'refusing "/etc"')
    assert "exists" not in err


def tree(root: Path) -> dict[str, bytes | str]:
    """Every file and link under ``root`` (not following links): path -> content or target."""
    out: dict[str, bytes | str] = {}
    for base, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(base, name)
            if path.is_symlink():
                out[str(path)] = f"-> {path.readlink()}"
            elif path.is_file():
                out[str(path)] = path.read_bytes()
    return out


def untouched(before: dict[str, bytes | str], root: Path) -> bool:
    """Every file of ``before`` is still there as it was (the event log may have grown)."""
    now = {**tree(root)}
    return all(k in now and now[k][:len(v)] == v for k, v in before.items())


def test_monitor_empties_only_caches_whatever_the_list_says(tmp_path: Path) -> None:
    """A hostile cleanup_paths (as a reload could hand over, unvalidated) on a fake host tree:
    only the cache is emptied, and the links inside it are removed, never followed.

    Safety: system paths are only ever listed here under ``root=host``, a tree in tmp_path;
    never list a real system directory in a test that runs a cleanup with root "/"."""
    host = tmp_path / "host"
    for d in ("etc/ssh", "var/lib/dpkg", "var/lib/clusterctl", "var/cache/pip/sub", "usr/bin"):
        (host / d).mkdir(parents=True)
    (host / "etc/passwd").write_text("root:x:0:0\n")
    (host / "etc/ssh/sshd_config").write_text("PermitRootLogin no\n")
    (host / "var/lib/dpkg/status").write_text("Package: x\n")
    (host / "var/lib/clusterctl/ledger.json").write_text("{}")
    (host / "usr/bin/python3").write_text("#!")
    pip = host / "var/cache/pip"
    (pip / "wheel.whl").write_bytes(b"w" * 1000)
    (pip / "sub/x").write_bytes(b"x" * 24)
    (pip / "passwd-link").symlink_to(host / "etc/passwd")
    (pip / "sub/etc-link").symlink_to(host / "etc")
    config = cfg.Config(
        paths=cfg.PathsConfig(state_dir=Path("/var/lib/clusterctl"), run_dir=Path("/run/x")),
        optimize=cfg.OptimizeConfig(cleanup_paths=tuple(Path(p) for p in (
            "/var/cache/pip", "/etc/.", "/var/lib", "/usr/..", "/var/lib/clusterctl",
            "/var/cache/pip/../../lib/dpkg"))))
    keep = {k: v for k, v in tree(host).items() if not k.startswith(str(pip))}
    log.setup()  # to this test's stderr, not a CliRunner's closed one

    done = execute((MonitorAction("clean_disk", "test"),), config, root=host)

    assert list(pip.iterdir()) == []
    assert untouched(keep, host)
    assert done[0].did[-1] == "emptied /var/cache/pip (1K; listed in cleanup_paths)"
    notes = "\n".join(done[0].notes)
    for listed in ("/etc", "/var/lib", "/usr/..", "/var/lib/clusterctl",
                   "/var/cache/pip/../../lib/dpkg"):
        assert f"{listed} is now " in notes and "left alone: refusing" in notes


def test_a_cache_swapped_for_a_symlink_after_validation_is_left_alone(tmp_path: Path) -> None:
    state_parent, caches = tmp_path / "clusterctl", tmp_path / "caches"
    state, pip = state_parent / "pip", caches / "pip"
    for d in (state, pip):
        d.mkdir(parents=True)
    (state / "ledger.json").write_text("{}")
    (pip / "new.whl").write_bytes(b"n")
    conf = tmp_path / "clusterctl.toml"
    conf.write_text(f'[paths]\nstate_dir = "{state}"\nrun_dir = "{tmp_path}/run"\n'
                    f'[swap]\ndir = "{tmp_path}/swap"\n[optimize]\ncleanup_paths = ["{pip}"]\n')
    config = cfg.load(conf).config
    log.setup()
    # after validation, the cache's parent becomes a link to the state dir's parent
    caches.rename(tmp_path / "caches.old")
    caches.symlink_to(state_parent)
    keep = tree(state)
    done = execute((MonitorAction("clean_disk", "test"),), config)
    assert untouched(keep, tmp_path)
    assert f"{pip} is now {state}, left alone: refusing" in "\n".join(done[0].notes)
    # and the cache itself replaced by a link is not followed
    caches.unlink()
    caches.mkdir()
    pip.symlink_to(state)
    done = execute((MonitorAction("clean_disk", "test"),), config)
    assert untouched(keep, tmp_path)
    assert f"{pip}: not a directory" in "\n".join(done[0].notes)


def fake_host(tmp_path: Path) -> Path:
    """A host tree in tmp_path with a shared model store in /srv/models (never "/")."""
    host = tmp_path / "host"
    (host / "home/u").mkdir(parents=True)
    (host / "srv/models/huggingface").mkdir(parents=True)
    (host / "srv/models/huggingface/llama-70b.safetensors").write_text("precious")
    return host


def clean_disk(config: cfg.Config, host: Path, tmp_path: Path) -> tuple[tuple[str, ...], str]:
    """`optimize monitor`'s disk cleanup on ``host``, a fake host tree that must be in
    tmp_path (never "/"): what it did, and its notes."""
    assert host.resolve().is_relative_to(tmp_path.resolve()) and tmp_path.resolve() != Path("/")
    log.setup()
    done = execute((MonitorAction("clean_disk", "test"),), config, root=host)
    return done[0].did, "\n".join(done[0].notes)


def test_a_link_above_the_listed_cache_is_never_followed(tmp_path: Path) -> None:
    """User u replaces ~/.cache with a link to the shared model store: the listed
    /home/u/.cache/huggingface now leads to /srv/models/huggingface, which stays."""
    host = fake_host(tmp_path)
    (host / "home/u/.cache").symlink_to(host / "srv/models")
    config, errors = cfg.parse('[optimize]\ncleanup_paths = ["/home/u/.cache/huggingface"]\n',
                               path="c.toml")
    assert config is not None, errors
    keep = tree(host / "srv")
    did, notes = clean_disk(config, host, tmp_path)
    assert untouched(keep, host / "srv") and tree(host / "srv") == keep
    assert not [line for line in did if "emptied" in line]
    assert ("/home/u/.cache/huggingface now leads to /srv/models/huggingface, left alone; "
            "list /srv/models/huggingface itself if that is meant") in notes


def test_a_cache_listed_as_it_really_is_is_emptied_even_under_a_linked_root(
        tmp_path: Path) -> None:
    host = fake_host(tmp_path)
    (tmp_path / "linked").symlink_to(host)  # the root itself may be reached through a link
    config = cfg.Config(optimize=cfg.OptimizeConfig(
        cleanup_paths=(Path("/srv/models/huggingface"),)))
    did, notes = clean_disk(config, tmp_path / "linked", tmp_path)
    assert list((host / "srv/models/huggingface").iterdir()) == []
    assert "emptied /srv/models/huggingface (8B; listed in cleanup_paths)" in did, notes


def mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")


def test_emptying_a_cache_never_enters_another_filesystem_or_a_mount(tmp_path: Path) -> None:
    """Like rm --one-file-system: a tmpfs and a bind mount of the model store inside the
    cache keep what they hold, and are said; the rest of the cache goes."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount")
    host = fake_host(tmp_path)
    cache = host / "var/cache/pip"
    for d in ("tmpfs", "deep/models", "plain"):
        (cache / d).mkdir(parents=True)
    (cache / "plain/wheel.whl").write_bytes(b"w" * 10)
    mounted = []
    try:
        mount("-t", "tmpfs", "-o", "size=1M", "tmpfs", str(cache / "tmpfs"))
        mounted.append(cache / "tmpfs")
        (cache / "tmpfs/on-tmpfs").write_text("kept")
        mount("--bind", str(host / "srv/models"), str(cache / "deep/models"))
        mounted.append(cache / "deep/models")
        keep = tree(host / "srv")
        config = cfg.Config(optimize=cfg.OptimizeConfig(cleanup_paths=(Path("/var/cache/pip"),)))
        did, notes = clean_disk(config, host, tmp_path)
        assert (cache / "tmpfs/on-tmpfs").read_text() == "kept"
        assert tree(host / "srv") == keep
        assert not (cache / "plain").exists()
        assert "kept /var/cache/pip/tmpfs: another filesystem is mounted there" in notes
        assert "kept /var/cache/pip/deep/models: another filesystem is mounted there" in notes
        assert "emptied /var/cache/pip (10B; listed in cleanup_paths)" in did
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", str(point)], check=False)


@pytest.mark.parametrize(("listed", "why"), [
    ("/var/cache/debconf", "debconf's answers"), ("/var/cache/debconf/x", "debconf's answers"),
    ("/tmp/systemd-private-0123-ollama.service-AbCd", "PrivateTmp"),
    ("/var/tmp/systemd-private-0123-x.service-y/tmp", "PrivateTmp"),
    ("/tmp/.X11-unix", "X11 and ICE sockets"), ("/tmp/.ICE-unix", "X11 and ICE sockets"),
    ("/tmp/.font-unix", "X11 and ICE sockets"), ("/var/tmp/.XIM-unix", "X11 and ICE sockets"),
    ("/tmp/.Test-unix/x", "X11 and ICE sockets"),
])
def test_system_state_below_the_cache_roots_is_refused(tmp_path: Path, listed: str,
                                                      why: str) -> None:
    refused(tmp_path, f'[optimize]\ncleanup_paths = ["{listed}"]\n', "optimize.cleanup_paths",
            f'refusing "{listed}"', why, "not a cache")


@pytest.mark.parametrize(("section", "key", "value"), [
    ("optimize", "cleanup_paths", '["/var/cache/pip\\n/etc"]'),
    ("optimize", "cleanup_paths", '["/tmp/hf\\tcache"]'),
    ("paths", "state_dir", '"/var/lib/clusterctl\\n"'),
    ("paths", "run_dir", '"/run/cluster\\u0007ctl"'),
    ("swap", "dir", '"/var/lib/swap\\tfiles"'),
    ("api", "textfile_dir", '"/var/lib/node_exporter\\r"'),
])
def test_a_path_with_a_control_character_is_refused(tmp_path: Path, section: str, key: str,
                                                    value: str) -> None:
    refused(tmp_path, f"[{section}]\n{key} = {value}\n", f"{section}.{key}",
            "control character")


# -- finding 10: sizes and numbers are finite and bounded -------------------------------------


@pytest.mark.parametrize(("text", "key", "expected"), [
    (f'[swap]\nmax_size = "{"9" * 300}T"\n', "swap.max_size", "at most 1024T (1 PiB)"),
    ('[swap]\nmax_size = "2048T"\n', "swap.max_size", "at most 1024T (1 PiB)"),
    ("[swap]\nmax_size = 99999999999999999999\n", "swap.max_size",
     "at most 1024T, got a number with more than 18 digits"),
    ("[swap]\nmin_size = -99999999999999999999\n", "swap.min_size", "at least 64M"),
    (f"[optimize]\nollama_model_size = {2**62}\n", "optimize.ollama_model_size", "at most 1024T"),
    ("[gpu]\nhysteresis = 1e400\n", "gpu.hysteresis", "expected a finite number, got inf"),
    (f"[gpu]\nhysteresis = {'9' * 400}\n", "gpu.hysteresis", "at most 50, got a number"),
    ("[hibernate]\npause_after_minutes = 1e308\n", "hibernate.pause_after_minutes",
     "at most 525600"),
    ("[gpu]\nmemory_reserve_mb = 9223372036854775807\n", "gpu.memory_reserve_mb",
     "at most 1048576"),
])
def test_absurd_numbers_are_refused_with_the_bound(tmp_path: Path, text: str, key: str,
                                                   expected: str) -> None:
    refused(tmp_path, text, key, expected)


def test_a_number_too_long_for_python_is_a_config_error(tmp_path: Path) -> None:
    code, err = validate(tmp_path, f"[swap]\nmax_size = {'9' * 5000}\n")
    assert code == 2 and err.count("\n") == 1
    assert "TOML holds a number too long to read" in err


def test_every_number_has_an_upper_bound() -> None:
    """No int or float field is unbounded (sizes are bounded by MAX_SIZE_BYTES)."""
    for name in cfg.sections():
        for key, fld in cfg.section_settings(name).items():
            if fld.metadata["kind"] in ("int", "float"):
                assert fld.metadata["maximum"] is not None, f"{name}.{key}"


def test_the_api_cannot_set_an_unbounded_memory_reserve() -> None:
    with pytest.raises(ConfigError, match="must be at most 1048576"):
        cfg.with_changes(cfg.Config(), "gpu", {"memory_reserve_mb": 2**80},
                         source="PUT /api/gpu/config")


# -- finding 5 (config part): URLs every client can use ----------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    ("http://[::1", "Invalid IPv6 URL"),
    ("http://127.0.0.1:99999", "Port out of range"),
    ("http://127.0.0.1:port", "could not be cast to integer"),
    ("http://127.0.0.1:0", "port 1-65535"),
    ("https://control example", "may not contain spaces"),
    ("https://control.example/\\n", "control"),
    ("https://contröl.example", "non-ASCII"),
    ("https://user:secret@control.example", "user name or password"),
    ("https://control.example/api?x=1", "?query or #fragment"),
    ("https://control.example/#top", "?query or #fragment"),
    ("https://[v1.x]/", "IPv6 address in brackets"),
    (f"https://{'a' * 64}.example", "host name"),
    ("https://control..example", "host name"),
    ("https://-control.example", "host name"),
    ("ftp://control.example", "http:// or https://"),
    ("http://10.0.0.5:8080", "plain http to another machine"),
])
def test_control_urls_that_would_fail_later_are_refused_now(tmp_path: Path, url: str,
                                                             expected: str) -> None:
    refused(tmp_path, f'[heartbeat]\ncontrol_url = "{url}"\n', "heartbeat.control_url", expected)
    if expected != "plain http to another machine":
        refused(tmp_path, f'[ollama]\nurl = "{url}"\n', "ollama.url", expected)


@pytest.mark.parametrize("url", ["https://control.example", "https://control.example:8443/v1/",
                                 "http://127.0.0.1:8080", "http://[::1]:8080", "http://localhost",
                                 "https://cp_1.internal"])
def test_usable_urls_are_accepted(tmp_path: Path, url: str) -> None:
    accepted(tmp_path, f'[heartbeat]\ncontrol_url = "{url}"\n[ollama]\nurl = "{url}"\n')


# -- low: accepted but meaningless --------------------------------------------------------------


@pytest.mark.parametrize(("text", "key", "expected"), [
    ('[hibernate]\naction = "command"\n', "hibernate.action", "needs a command"),
    ('[hibernate]\naction = ["command", "systemd"]\n', "hibernate.action", "needs a command"),
    ('[hibernate]\nsystemd_unit = ""\n', "hibernate.systemd_unit", "expected a systemd unit"),
    ('[hibernate]\nsystemd_unit = "../../etc/x.target"\n', "hibernate.systemd_unit",
     "expected a systemd unit"),
    ('[hibernate]\nsystemd_unit = "hibernate target"\n', "hibernate.systemd_unit",
     "expected a systemd unit"),
    ('[hibernate]\nsystemd_unit = "hibernate"\n', "hibernate.systemd_unit",
     "expected a systemd unit"),
    ('[api]\ntextfile_dir = "node-exporter"\n', "api.textfile_dir",
     'expected an absolute path like "/var/lib/x", or "" for none'),
    ('[hibernate]\ncommand = ["/bin/snap\\u0000shot"]\n', "hibernate.command",
     "expected a list of strings"),
    ('[paths]\nstate_dir = "/var/lib/\\u0000x"\n', "paths.state_dir", "absolute path"),
])
def test_meaningless_settings_are_refused(tmp_path: Path, text: str, key: str,
                                          expected: str) -> None:
    refused(tmp_path, text, key, expected)


def test_meaningful_hibernate_settings_are_accepted(tmp_path: Path) -> None:
    accepted(tmp_path, '[hibernate]\naction = ["command", "systemd"]\ncommand = ["true"]\n'
             'systemd_unit = "snapshot-and-stop@gpu.service"\n[api]\ntextfile_dir = ""\n')
    accepted(tmp_path, '[api]\ntextfile_dir = "/var/lib/prometheus/node-exporter"\n')


@pytest.mark.parametrize(("key", "value"), [("swap", "dir"), ("paths", "state_dir"),
                                            ("paths", "run_dir")])
@pytest.mark.parametrize("directory", ["/", "/etc", "/etc/.", "/var/..", "/usr/lib",
                                       "//var/lib", "/tmp"])
def test_clusterctls_directories_are_never_a_system_tree(tmp_path: Path, key: str, value: str,
                                                         directory: str) -> None:
    refused(tmp_path, f'[{key}]\n{value} = "{directory}"\n', f"{key}.{value}",
            "is a system directory")


def test_a_directory_under_a_parent_another_user_controls_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    err = refused(tmp_path, f'[paths]\nstate_dir = "{theirs}/state"\n', "paths.state_dir",
                  f"{theirs} is owned by ", "(uid 65534), not root",
                  "parents are all root's")
    assert "clusterctl: " in err
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    refused(tmp_path, f'[swap]\ndir = "{open_dir}/swap"\n', "swap.dir",
            f"{open_dir} may be written by others (mode 0777, no sticky bit)")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "ok")
    os.lchown(link, NOBODY, NOBODY)
    refused(tmp_path, f'[paths]\nrun_dir = "{link}/run"\n', "paths.run_dir", f"{link} is owned")
    # the same for every command that loads the config
    code, _out, err = clusterctl("config", "show", "--config", str(tmp_path / "clusterctl.toml"))
    assert code == 2 and f"{link} is owned" in err


def test_a_sticky_shared_parent_like_tmp_is_accepted(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    accepted(tmp_path, f'[paths]\nstate_dir = "{shared}/state"\nrun_dir = "{shared}/run"\n'
             f'[swap]\ndir = "{shared}/state/swap"\n')


# -- low: the CLI on unreadable files and absurd durations ------------------------------------


def test_config_set_on_a_non_utf8_file_is_a_config_error_and_changes_nothing(tmp_path: Path
                                                                             ) -> None:
    path = tmp_path / "clusterctl.toml"
    path.write_bytes(b'[swap]\n# caf\xe9\nmax_size = "8G"\n')
    before = path.read_bytes()
    code, _out, err = clusterctl("config", "set", "swap.max_size", "16G", "--config", str(path))
    assert code == 2
    assert err == (f"clusterctl: {path}: config file is not UTF-8 text, so it cannot be edited; "
                   "save it as UTF-8 (iconv -t utf-8), then set again\n")
    assert path.read_bytes() == before


@pytest.mark.parametrize("command", [("config", "show"), ("config", "validate"),
                                     ("config", "set", "swap.max_size", "8G"),
                                     ("hibernate", "status")])
@pytest.mark.parametrize("kind", ["not-utf8", "directory", "symlink-loop", "fifo", "huge"])
def test_unreadable_config_files_are_one_line_and_exit_2(tmp_path: Path, command: tuple[str, ...],
                                                         kind: str) -> None:
    path = tmp_path / "clusterctl.toml"
    if kind == "not-utf8":
        path.write_bytes(b"[swap]\ndir = \"/var/lib/\xff\"\n")
    elif kind == "directory":
        path.mkdir()
    elif kind == "fifo":  # a reader that waited for a writer would hang (a reload: forever)
        os.mkfifo(path)
    elif kind == "huge":
        path.write_bytes(b"#" * (2 << 20))
    else:
        path.symlink_to(tmp_path / "loop")
        (tmp_path / "loop").symlink_to(path)
    code, _out, err = clusterctl(*command, "--config", str(path))
    assert code == 2, err
    assert err.startswith(f"clusterctl: {path}: ") and err.count("\n") == 1
    assert "internal error" not in err


def test_inhibit_for_an_absurd_duration_is_refused_before_writing(tmp_path: Path) -> None:
    conf = tmp_path / "clusterctl.toml"
    state = tmp_path / "state"
    conf.write_text(f'[paths]\nstate_dir = "{state}"\nrun_dir = "{tmp_path}/run"\n')
    env = {k: v for k, v in os.environ.items() if k != "CLUSTERCTL_CONFIG"}
    for duration in ("99999999999d", "366d", f"{'9' * 400}s"):
        done = subprocess.run([sys.executable, "-m", "clusterctl", "hibernate", "inhibit", "--for",
                               duration, "--config", str(conf)], capture_output=True, text=True,
                              env=env, timeout=60, check=False)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"clusterctl: --for {duration}: at most 365d; ")
        assert not state.exists()
    done = subprocess.run([sys.executable, "-m", "clusterctl", "hibernate", "inhibit", "--for",
                           "365d", "--config", str(conf)], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads((state / "hibernate-inhibit.json").read_text())["until"] > 0


# -- config set where the section is not a table ------------------------------------------------


@pytest.mark.parametrize(("text", "kind"), [
    ('[[swap]]\nmax_size = "4G"\n', "an array of tables ([[...]])"), ("swap = 1\n", "an integer"),
    ('swap = "x"\n', "a string"), ("swap = []\n", "a list"), ("swap = true\n", "a boolean"),
    ("swap = 1979-05-27\n", "a date"), ("swap = 1979-05-27T07:32:00Z\n", "a datetime"),
])
def test_config_set_on_a_section_that_is_not_a_table_is_one_line_and_changes_nothing(
        tmp_path: Path, text: str, kind: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    code, _out, err = clusterctl("config", "set", "--config", str(path), "swap.min_size", "1G")
    assert code == 2, err
    assert err == (f"clusterctl: {path}: swap.min_size: swap is {kind} in this file, not a "
                   "[swap] table, so min_size cannot be set in it; make it a table by hand: a "
                   "[swap] line, then key = value lines\n")
    assert path.read_text() == text
    assert [p.name for p in tmp_path.iterdir()] == ["c.toml"]
