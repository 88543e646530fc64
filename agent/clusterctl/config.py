"""The configuration: schema, defaults, loading, validation and editing.

One source of truth: the frozen section dataclasses below. Each field carries
its TOML key, its kind and its allowed range in ``metadata``; loading,
validation, ``config show`` and ``config set`` are generic over those fields.
Field names carry units (``min_size_bytes``); TOML keys (``min_size``) are the
documented contract of the config file and never change.

Loading order: built-in defaults, then the file. The file is
``/etc/clusterctl/clusterctl.toml`` unless ``--config`` or ``CLUSTERCTL_CONFIG``
names another (the flag wins over the variable). A missing default file means
built-in defaults; a missing file named explicitly is an error.

``parse`` is pure: types, bounded ranges (every number has a maximum; sizes at
most 1 PiB), usable URLs, paths without control characters, and cross-checks.
``load``, ``validate_file`` and ``set_values`` add ``host_checks``, which only read
the host: clusterctl's directories must have no parent another user controls, and
each cleanup path must still be a cache with its symlinks resolved.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import ipaddress
import itertools
import math
import os
import re
import socket
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast
from urllib.parse import urlsplit

from clusterctl.errors import ConfigError
from clusterctl.units import GIB, MAX_SIZE_BYTES, MIB, format_size, parse_size, quoted

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

# Reading uses tomllib (fast, in the standard library); tomlkit, which keeps
# comments and layout, loads only when a file is edited.

DEFAULT_PATH = Path("/etc/clusterctl/clusterctl.toml")
ENV_VAR = "CLUSTERCTL_CONFIG"

Kind = Literal["int", "float", "bool", "str", "strs", "size", "path", "optpath", "paths",
               "actions", "listen", "url", "unit", "choice", "cgroups", "database", "ip"]
ACTIONS = ("none", "command", "control", "systemd")
ALLOCATIONS = ("auto", "fallocate", "zeros")

T = TypeVar("T")


def setting(
    default: T,
    key: str,
    kind: Kind,
    doc: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
) -> T:
    """A config field: its default, TOML key, kind, range and one-line doc."""
    meta = {"key": key, "kind": kind, "doc": doc, "minimum": minimum, "maximum": maximum}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class SwapConfig:
    dir: Path = setting(
        Path("/var/lib/clusterctl/swap"), "dir", "path", "directory that holds the swap files"
    )
    min_size_bytes: int = setting(
        2 * GIB, "min_size", "size", "swap kept at all times", minimum=64 * MIB
    )
    max_size_bytes: int = setting(
        16 * GIB, "max_size", "size", "managed swap never grows past this", minimum=64 * MIB
    )
    increment_bytes: int = setting(
        1 * GIB, "increment", "size", "size of each growth step", minimum=64 * MIB
    )
    memory_threshold_percent: int = setting(
        80, "memory_threshold", "int", "% of memory in use that triggers growth",
        minimum=1, maximum=100,
    )
    check_interval_s: int = setting(
        30, "check_interval", "int", "seconds between policy steps", minimum=1, maximum=86400
    )
    pressure_threshold_percent: float = setting(
        10.0, "pressure_threshold", "float",
        "memory stall (%, PSI 'some': avg60, or within a 1 s window for the agent's triggers) "
        "that also triggers growth while less than half an increment of swap is free",
        minimum=0, maximum=100,
    )
    free_threshold_percent: int = setting(
        15, "free_threshold", "int", "grow when less than this % of the node's swap is free",
        minimum=0, maximum=90,
    )
    watch_cgroups: tuple[str, ...] = setting(
        ("system.slice", "user.slice", "machine.slice"), "watch_cgroups", "cgroups",
        "cgroups (paths under the cgroup root) whose memory pressure, limit and OOM events "
        "the agent watches; those that do not exist are skipped",
    )
    allocation: str = setting(
        "auto", "allocation", "choice", "auto | fallocate | zeros: how file blocks are reserved"
    )


@dataclass(frozen=True)
class OptimizeConfig:
    swappiness_ssd: int = setting(
        10, "swappiness_ssd", "int", "vm.swappiness when swap is on SSD", minimum=0, maximum=200
    )
    swappiness_hdd: int = setting(
        30, "swappiness_hdd", "int", "vm.swappiness when swap is on HDD", minimum=0, maximum=200
    )
    cache_pressure_ssd: int = setting(
        50, "cache_pressure_ssd", "int", "vm.vfs_cache_pressure on SSD", minimum=0, maximum=10000
    )
    cache_pressure_hdd: int = setting(
        100, "cache_pressure_hdd", "int", "vm.vfs_cache_pressure on HDD", minimum=0, maximum=10000
    )
    dask_scheduler: str = setting(
        "tcp://127.0.0.1:8786", "dask_scheduler", "str",
        "scheduler address for clusterctl-dask-worker.service",
    )
    dask_memory_fraction: float = setting(
        0.8, "dask_memory_fraction", "float", "share of RAM the Dask workers get together",
        minimum=0.05, maximum=1.0,
    )
    dask_target: float = setting(
        0.60, "dask_target", "float", "worker memory fraction where it starts spilling to disk",
        minimum=0.0, maximum=1.0,
    )
    dask_spill: float = setting(
        0.70, "dask_spill", "float", "process memory fraction where it spills harder",
        minimum=0.0, maximum=1.0,
    )
    dask_pause: float = setting(
        0.80, "dask_pause", "float", "fraction where the worker pauses new tasks",
        minimum=0.0, maximum=1.0,
    )
    dask_terminate: float = setting(
        0.95, "dask_terminate", "float", "fraction where the nanny restarts the worker",
        minimum=0.0, maximum=1.0,
    )
    ollama_model_size_bytes: int = setting(
        3 * GIB, "ollama_model_size", "size",
        "memory one loaded model takes (a 4-bit 7B model: about 4G)", minimum=256 * MIB,
    )
    cpu_threshold_percent: float = setting(
        90, "cpu_threshold", "float", "monitor: CPU use that, sustained, halves the Dask workers",
        minimum=1, maximum=100,
    )
    cpu_sustain_s: float = setting(
        60, "cpu_sustain", "float", "monitor: seconds CPU must stay over cpu_threshold",
        minimum=0, maximum=86400,
    )
    calm_s: float = setting(
        300, "calm", "float", "monitor: seconds below cpu_threshold - 20 before workers return",
        minimum=0, maximum=86400,
    )
    memory_threshold_percent: float = setting(
        85, "memory_threshold", "float", "monitor: memory use that grows swap and frees memory",
        minimum=1, maximum=100,
    )
    disk_threshold_percent: float = setting(
        90, "disk_threshold", "float", "monitor: state dir disk use that cleans up",
        minimum=1, maximum=100,
    )
    retention_days: float = setting(
        30, "retention_days", "float", "monitor: rotated event logs older than this may go",
        minimum=0, maximum=36500,
    )
    cleanup_paths: tuple[Path, ...] = setting(
        (), "cleanup_paths", "paths",
        "monitor: caches whose contents may be removed when the disk is full",
    )


@dataclass(frozen=True)
class GpuConfig:
    monitor_interval_s: float = setting(
        3, "monitor_interval", "float", "seconds between GPU samples", minimum=0.1, maximum=3600
    )
    history_size: int = setting(
        200, "history_size", "int", "samples kept per GPU", minimum=1, maximum=1_000_000
    )
    temp_optimal_c: int = setting(
        65, "temp_optimal", "int", "below this: OPTIMAL", minimum=0, maximum=150
    )
    temp_normal_c: int = setting(
        75, "temp_normal", "int", "below this: NORMAL", minimum=0, maximum=150
    )
    temp_throttle_c: int = setting(
        85, "temp_throttle", "int", "THROTTLED from temp_normal; from this, power limits step down",
        minimum=0, maximum=150
    )
    temp_critical_c: int = setting(
        90, "temp_critical", "int", "at or above: CRITICAL (power at the floor; unhealthy)",
        minimum=0, maximum=150
    )
    memory_optimal_percent: int = setting(
        70, "memory_optimal", "int", "VRAM use below this: OPTIMAL", minimum=0, maximum=100
    )
    memory_normal_percent: int = setting(
        85, "memory_normal", "int", "VRAM use below this: NORMAL", minimum=0, maximum=100
    )
    memory_critical_percent: int = setting(
        95, "memory_critical", "int", "VRAM use at or above: CRITICAL", minimum=0, maximum=100
    )
    memory_reserve_mb: int = setting(
        512, "memory_reserve_mb", "int", "VRAM never handed out by placement", minimum=0,
        maximum=1024 * 1024,  # 1 TiB
    )
    hysteresis_c: float = setting(
        2, "hysteresis", "float", "degrees past a state's edge before the state is left",
        minimum=0, maximum=50
    )
    hysteresis_percent: float = setting(
        2, "memory_hysteresis", "float", "VRAM percent past an edge before a state is left",
        minimum=0, maximum=50
    )
    throttle_enabled: bool = setting(
        False, "throttle_enabled", "bool", "lower power limits when hot (opt-in)"
    )
    throttle_step_percent: float = setting(
        10, "throttle_step", "float", "each step, as a percentage of the default power limit",
        minimum=1, maximum=100
    )
    throttle_floor_percent: float = setting(
        50, "throttle_floor", "float",
        "lowest limit, as a percentage of the default (never below the GPU's minimum)",
        minimum=1, maximum=100
    )
    throttle_step_interval_s: float = setting(
        15, "throttle_step_interval", "float", "seconds between steps down while hot",
        minimum=0, maximum=3600
    )
    throttle_cooldown_s: float = setting(
        60, "throttle_cooldown_seconds", "float",
        "seconds cool before each step back up towards the original limit",
        minimum=0, maximum=86400
    )
    restore_on_stop: bool = setting(
        True, "restore_on_stop", "bool",
        "give lowered power limits back when the agent stops (false: they stay lowered until "
        "the next start gives them back)"
    )


@dataclass(frozen=True)
class HibernateConfig:
    enabled: bool = setting(False, "enabled", "bool", "act on idleness (never, until asked to)")
    gpu_usage_threshold_percent: float = setting(
        5.0, "gpu_usage_threshold", "float", "GPU utilization under which a GPU is idle",
        minimum=0, maximum=100,
    )
    pause_after_minutes: float = setting(
        3, "pause_after_minutes", "float", "idle minutes before the action", minimum=0.1,
        maximum=525600,  # a year
    )
    action: tuple[str, ...] = setting(
        ("none",), "action", "actions", "none | command | control | systemd, or a list"
    )
    command: tuple[str, ...] = setting(
        (), "command", "strs", 'the "command" action: argv, run without a shell'
    )
    command_timeout_s: float = setting(
        600, "command_timeout", "float", "seconds the command may take", minimum=1,
        maximum=86400,
    )
    systemd_unit: str = setting(
        "hibernate.target", "systemd_unit", "unit",
        'the "systemd" action starts this unit (hibernate.target, suspend.target, ...)',
    )
    fallback: str = setting(
        "refuse", "fallback", "choice",
        "when logind says the node cannot hibernate: suspend, poweroff or refuse",
    )
    cpu_threshold: float = setting(
        0, "cpu_threshold", "float", "also require CPU use under this (%); 0: not a condition",
        minimum=0, maximum=100,
    )
    require_no_ssh: bool = setting(
        False, "require_no_ssh", "bool", "also require that nobody is logged in over SSH"
    )
    busy_processes: tuple[str, ...] = setting(
        (), "busy_processes", "strs", "process names that keep the node awake while running"
    )
    schedule_grace_s: float = setting(
        300, "schedule_grace", "float",
        "seconds between the scheduled-sleep warning event and the action", minimum=0,
        maximum=86400,
    )


@dataclass(frozen=True)
class HeartbeatConfig:
    control_url: str = setting("", "control_url", "url", "control plane base URL; empty: none")
    instance_id: str = setting("", "instance_id", "str", "this node's id; empty: the hostname")
    interval_s: int = setting(
        30, "interval", "int", "seconds between heartbeats", minimum=1, maximum=86400
    )
    token_file: Path = setting(
        Path("/etc/clusterctl/token"), "token_file", "path", "root-only file with the bearer token"
    )
    allow_insecure_http: bool = setting(
        False, "allow_insecure_http", "bool",
        "allow a plain http:// control_url that is not loopback (the token travels in clear)"
    )
    accept_commands: bool = setting(
        True, "accept_commands", "bool",
        "apply the control plane's commands (hibernate now, [hibernate] keys, schedule, "
        "inhibit); false: each is refused"
    )


@dataclass(frozen=True)
class ApiConfig:
    listen: str = setting("127.0.0.1:9408", "listen", "listen", "address:port of the local API")
    token_file: Path = setting(
        Path("/etc/clusterctl/api-token"), "token_file", "path",
        "root-only file with the bearer token the changing endpoints require"
    )
    textfile_dir: str = setting(
        "", "textfile_dir", "optpath",
        "node_exporter textfile-collector directory for the metrics; empty: none"
    )


@dataclass(frozen=True)
class OllamaConfig:
    url: str = setting("http://127.0.0.1:11434", "url", "url", "where Ollama's API answers")


@dataclass(frozen=True)
class PathsConfig:
    state_dir: Path = setting(
        Path("/var/lib/clusterctl"), "state_dir", "path", "ledger, saved originals, event log"
    )
    run_dir: Path = setting(Path("/run/clusterctl"), "run_dir", "path", "locks, runtime files")


@dataclass(frozen=True)
class FleetConfig:
    listen: str = setting(
        "0.0.0.0:9410", "listen", "listen", "address:port the control plane serves (clusterctl "
        "fleet serve)"
    )
    database: str = setting(
        "sqlite:////var/lib/clusterctl/fleet.db", "database", "database",
        "sqlite:////absolute/path.db, or postgresql://user@host:port/dbname"
    )
    join_token_file: Path = setting(
        Path("/etc/clusterctl/fleet-join-token"), "join_token_file", "path",
        "root-only file with the token nodes present once to enrol"
    )
    admin_token_file: Path = setting(
        Path("/etc/clusterctl/fleet-admin-token"), "admin_token_file", "path",
        "root-only file with the operator API's bearer token"
    )
    max_heartbeats_per_s: int = setting(
        50, "max_heartbeats_per_s", "int",
        "the fleet's heartbeats are spread to at most this many a second (never under 10 s a "
        "node)", minimum=1, maximum=100000,
    )
    resume_timeout_s: int = setting(
        600, "resume_timeout", "int",
        "seconds a woken node has to heartbeat before it is wake_failed", minimum=10,
        maximum=86400,
    )
    wake: str = setting(
        "wol", "wake", "choice", "how a node is woken: wol | ipmi | command | none"
    )
    wol_broadcast: str = setting(
        "255.255.255.255", "wol_broadcast", "ip", "where Wake-on-LAN packets are sent"
    )
    wol_port: int = setting(9, "wol_port", "int", "Wake-on-LAN UDP port", minimum=1,
                            maximum=65535)
    ipmi_host: str = setting(
        "", "ipmi_host", "str",
        'the BMC of a node, for wake = "ipmi"; {instance_id} and {hostname} are replaced, '
        'e.g. "{hostname}-bmc"'
    )
    ipmi_user: str = setting("", "ipmi_user", "str", "IPMI user name")
    ipmi_password_file: Path = setting(
        Path("/etc/clusterctl/ipmi-password"), "ipmi_password_file", "path",
        "root-only file with the IPMI password (given to ipmitool -f, never in argv)"
    )
    wake_command: tuple[str, ...] = setting(
        (), "wake_command", "strs",
        'wake = "command": argv run without a shell; {instance_id}, {hostname} and {mac} '
        "are replaced"
    )


@dataclass(frozen=True)
class Config:
    swap: SwapConfig = field(default_factory=SwapConfig)
    optimize: OptimizeConfig = field(default_factory=OptimizeConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    hibernate: HibernateConfig = field(default_factory=HibernateConfig)
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    ollama: OllamaConfig = field(default_factory=OllamaConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)


Source = Literal["--config", "CLUSTERCTL_CONFIG", "default"]


@dataclass(frozen=True)
class LoadedConfig:
    """The effective config and where it came from."""

    config: Config
    path: Path
    source: Source
    file_exists: bool


# ---------------------------------------------------------------------------
# schema helpers


def sections() -> dict[str, type[Any]]:
    """TOML section name -> section dataclass, in file order."""
    return {f.name: cast(type[Any], f.default_factory) for f in dataclasses.fields(Config)}


def section_settings(section: str) -> dict[str, dataclasses.Field[Any]]:
    """TOML key -> dataclass field of one section."""
    cls = sections()[section]
    return {f.metadata["key"]: f for f in dataclasses.fields(cls)}


def to_toml_value(fld: dataclasses.Field[Any], value: object) -> object:
    """A typed field value back in the form an operator writes in TOML."""
    kind = fld.metadata["kind"]
    if kind == "size":
        return format_size(cast(int, value))
    if kind == "path":
        return str(value)
    if kind == "paths":
        return [str(p) for p in cast(tuple[Path, ...], value)]
    if kind in ("strs", "cgroups"):
        return list(cast(tuple[str, ...], value))
    if kind == "actions":
        actions = cast(tuple[str, ...], value)
        return actions[0] if len(actions) == 1 else list(actions)
    return value


def as_toml_dict(config: Config) -> dict[str, dict[str, object]]:
    """The whole config as TOML keys and values (what `config show` prints)."""
    out: dict[str, dict[str, object]] = {}
    for name in sections():
        section = getattr(config, name)
        out[name] = {
            f.metadata["key"]: to_toml_value(f, getattr(section, f.name))
            for f in dataclasses.fields(section)
        }
    return out


# ---------------------------------------------------------------------------
# loading


def resolve_path(
    flag: Path | None, env: Mapping[str, str] | None = None
) -> tuple[Path, Source]:
    """Which config file is in effect and why."""
    env = os.environ if env is None else env
    if flag is not None:
        return flag, "--config"
    if env.get(ENV_VAR):
        return Path(env[ENV_VAR]), "CLUSTERCTL_CONFIG"
    return DEFAULT_PATH, "default"


def load(flag: Path | None = None, env: Mapping[str, str] | None = None) -> LoadedConfig:
    """Load and validate the effective config, the host checks included; raise the first
    ConfigError."""
    path, source = resolve_path(flag, env)
    text = _read(path, source)
    config, errors = (Config(), []) if text is None else parse(text, path=str(path))
    if config is not None:
        errors = host_checks(config, str(path), text or "", swap_dir=False)
    if errors:
        raise errors[0]
    assert config is not None
    return LoadedConfig(config, path, source, file_exists=text is not None)


def validate_file(
    flag: Path | None = None, env: Mapping[str, str] | None = None
) -> tuple[Path, Source, bool, list[ConfigError]]:
    """Every problem in the effective config file (for `config validate`)."""
    path, source = resolve_path(flag, env)
    try:
        text = _read(path, source)
    except ConfigError as err:
        return path, source, True, [err]
    config, errors = (Config(), []) if text is None else parse(text, path=str(path))
    if config is not None:
        errors = host_checks(config, str(path), text or "")
    return path, source, text is not None, errors


MAX_CONFIG_BYTES = 1 << 20  # a config is a page or two; more is a mistake


def read_config_text(path: Path) -> str:
    """The config file's text. Opened without blocking and refused unless it is a regular
    file (a FIFO in its place would hang the reader, a device would never end), at most
    MAX_CONFIG_BYTES, UTF-8. OSError and UnicodeDecodeError for the caller to word."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise OSError(errno.EFBIG, f"larger than {MAX_CONFIG_BYTES // 1024} KiB")
    return data.decode("utf-8")


def _read(path: Path, source: Source) -> str | None:
    try:
        return read_config_text(path)
    except FileNotFoundError as err:
        if source == "default":
            return None
        raise ConfigError(
            f"config file does not exist (named by {source})",
            path=str(path),
            fix="create it, or point --config/CLUSTERCTL_CONFIG at an existing file",
        ) from err
    except IsADirectoryError as err:
        raise ConfigError(
            "is a directory, not a config file", path=str(path), fix="name the .toml file itself"
        ) from err
    except PermissionError as err:
        raise ConfigError(
            "cannot read the config file: permission denied",
            path=str(path),
            fix="run as root or make the file readable",
        ) from err
    except UnicodeDecodeError as err:
        raise ConfigError(
            "config file is not UTF-8 text", path=str(path), fix="save it as UTF-8"
        ) from err
    except OSError as err:  # a symlink loop, an I/O error
        raise ConfigError(
            f"cannot read the config file: {err.strerror or err}", path=str(path),
            fix="point --config/CLUSTERCTL_CONFIG at a readable file",
        ) from err


def parse(text: str, *, path: str) -> tuple[Config | None, list[ConfigError]]:
    """Parse and validate TOML text; the Config (None if unusable) and all problems."""
    try:
        data = tomllib.loads(text)
    except RecursionError:
        return None, [ConfigError("TOML nested too deeply to read", path=path,
                                  fix="write plain sections of key = value lines")]
    except tomllib.TOMLDecodeError as err:
        where = re.search(r"\(at line (\d+), column (\d+)\)$", str(err))
        reason = str(err)[: where.start()].rstrip() if where else str(err)
        column = f" (column {where.group(2)})" if where else ""
        return None, [
            ConfigError(
                f"TOML syntax error: {reason}{column}",
                path=path,
                line=int(where.group(1)) if where else None,
                fix="fix the syntax (strings in double quotes, one key = value per line)",
            )
        ]
    except ValueError:  # Python refuses to convert integers of over 4300 digits
        return None, [ConfigError("TOML holds a number too long to read", path=path,
                                  fix="write numbers of sane size")]
    locator = _LineLocator(text)
    errors: list[ConfigError] = []
    built: dict[str, Any] = {}
    known_sections = sections()
    for name, value in data.items():
        if name not in known_sections:
            errors.append(
                ConfigError(
                    f"unknown section [{_name(name)}]"
                    f"{_suggest(name, known_sections, section=True)}",
                    path=path,
                    line=locator.section(name),
                    fix=f"known sections: {', '.join(known_sections)}",
                )
            )
            continue
        if not isinstance(value, dict):
            errors.append(
                ConfigError(
                    f"expected a [{name}] table, got {_a(_type_name(value))}",
                    path=path,
                    line=locator.key(None, name),
                    key=name,
                )
            )
            continue
        built[name], section_errors = _build_section(name, value, path, locator)
        errors.extend(section_errors)
    if errors:
        return None, errors
    config = Config(**built)
    errors.extend(_cross_checks(config, path, locator))
    return (None if errors else config), errors


def _build_section(
    section: str, values: dict[str, Any], path: str, locator: _LineLocator
) -> tuple[Any, list[ConfigError]]:
    settings = section_settings(section)
    errors: list[ConfigError] = []
    kwargs: dict[str, Any] = {}
    for key, raw in values.items():
        line = locator.key(section, key)
        fld = settings.get(key)
        if fld is None:
            errors.append(
                ConfigError(
                    f"unknown key{_suggest(key, settings)}",
                    path=path,
                    line=line,
                    key=f"{section}.{_name(key)}",
                    fix=f"known keys in [{section}]: {', '.join(settings)}",
                )
            )
            continue
        try:
            kwargs[fld.name] = coerce(fld, raw)
        except ValueError as err:
            errors.append(ConfigError(str(err), path=path, line=line, key=f"{section}.{key}"))
    return sections()[section](**kwargs), errors


def coerce(fld: dataclasses.Field[Any], raw: object) -> object:
    """Check one TOML value against its field and convert it; ValueError says why."""
    kind: Kind = fld.metadata["kind"]
    value: object
    if kind == "bool":
        if not isinstance(raw, bool):
            raise ValueError(f"expected true or false, got {_shown(raw)}")
        return raw
    if kind == "int":
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValueError(f"expected a whole number, got {_shown(raw)}")
        value = raw
    elif kind == "float":
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ValueError(f"expected a number, got {_shown(raw)}")
        if isinstance(raw, float) and not math.isfinite(raw):
            raise ValueError(f"expected a finite number, got {raw}")
        _check_range(fld, raw)  # before float(): a huge int would overflow it
        value = float(raw)
    elif kind == "size":
        if isinstance(raw, bool) or not isinstance(raw, (str, int)):
            raise ValueError(f'expected a size like "512M" or "2G", got {_shown(raw)}')
        value = parse_size(raw) if isinstance(raw, str) else raw
    elif kind in ("path", "optpath", "paths"):
        return _coerce_path(kind, raw)
    elif kind == "strs":
        if not isinstance(raw, list) or not all(isinstance(x, str) and x and "\0" not in x
                                                for x in raw):
            raise ValueError(f'expected a list of strings like ["a", "b"], got {_shown(raw)}')
        return tuple(raw)
    elif kind == "cgroups":
        return _coerce_cgroups(raw)
    elif kind == "actions":
        return _coerce_actions(raw)
    elif kind == "listen":
        return _coerce_listen(raw)
    elif kind == "url":
        return _coerce_url(raw)
    elif kind == "database":
        return _coerce_database(raw)
    elif kind == "ip":
        if not isinstance(raw, str):
            raise ValueError(f'expected an IP address like "192.168.1.255", got {_shown(raw)}')
        try:
            ipaddress.ip_address(raw)
        except ValueError as err:
            raise ValueError(f'expected an IP address like "192.168.1.255", got {quoted(raw)}'
                             ) from err
        return raw
    elif kind == "unit":
        if not isinstance(raw, str) or not _UNIT_RE.match(raw) or len(raw) > 255:
            raise ValueError(f'expected a systemd unit like "hibernate.target" or '
                             f'"snapshot.service", got {_shown(raw)}')
        return raw
    elif kind == "choice":
        choices = _CHOICES[fld.metadata["key"]]
        if raw not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {_shown(raw)}")
        return raw
    else:
        if not isinstance(raw, str) or "\0" in raw:
            raise ValueError(f"expected a string in double quotes, got {_shown(raw)}")
        return raw
    _check_range(fld, cast(float, value))
    return value


_UNIT_RE = re.compile(r"^[A-Za-z0-9:_.@\\-]+\.(target|service)$")


MAX_WATCH_CGROUPS = 64


def _coerce_cgroups(raw: object) -> tuple[str, ...]:
    """Cgroup paths under the hierarchy's root ("system.slice", "/machine.slice/x.scope"):
    no "." or ".." part, no control character; kept without the leading "/"."""
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise ValueError(f'expected a list of cgroup paths like ["system.slice"], '
                         f"got {_shown(raw)}")
    paths: list[str] = []
    for item in cast(list[str], raw):
        parts = item.strip("/").split("/")
        if (_CONTROL.search(item) or "\0" in item or not item.strip("/")
                or any(p in ("", ".", "..") for p in parts)):
            raise ValueError(f'a cgroup path is parts under the cgroup root like '
                             f'"system.slice/db.service", with no "..", got {quoted(item)}')
        path = "/".join(parts)
        if path not in paths:  # twice would be armed twice and said twice
            paths.append(path)
    if len(paths) > MAX_WATCH_CGROUPS:
        raise ValueError(f"at most {MAX_WATCH_CGROUPS} cgroups (the groups under each are "
                         f"watched too), got {len(paths)}: list their parents instead")
    return tuple(paths)


def _coerce_path(kind: Kind, raw: object) -> object:
    """A "path", "optpath" ("" for none) or "paths" (caches) value: absolute, and no
    control character (a newline or tab in a path is a typo or a trap, never a name)."""
    items = raw if kind == "paths" else [raw]
    absolute = isinstance(items, list) and all(
        isinstance(p, str) and "\0" not in p
        and (p.startswith("/") or (kind == "optpath" and p == "")) for p in items)
    if not absolute:
        expected = {"path": 'an absolute path like "/var/lib/x"',
                    "optpath": 'an absolute path like "/var/lib/x", or "" for none',
                    "paths": 'a list of absolute paths like ["/root/.cache/pip"]'}[kind]
        raise ValueError(f"expected {expected}, got {_shown(raw)}")
    for item in cast(list[str], items):
        if _CONTROL.search(item):
            raise ValueError(f"a path may not hold a control character (a newline, a tab), "
                             f"got {quoted(item)}")
        refusal = cache_refusal(item) if kind == "paths" else None
        if refusal:
            raise ValueError(refusal)
    if kind == "paths":
        return tuple(Path(p) for p in cast(list[str], raw))
    return Path(cast(str, raw)) if kind == "path" else raw


WAKE_METHODS = ("wol", "ipmi", "command", "none")
_CHOICES = {"allocation": ALLOCATIONS, "fallback": ("suspend", "poweroff", "refuse"),
            "wake": WAKE_METHODS}


def _check_range(fld: dataclasses.Field[Any], value: float) -> None:
    """Every number is bounded: sizes by MAX_SIZE_BYTES, the rest by their field's range."""
    low, high = fld.metadata["minimum"], fld.metadata["maximum"]
    size = fld.metadata["kind"] == "size"
    if size and high is None:
        high = MAX_SIZE_BYTES
    show = format_size if size else _num
    got = show(value) if abs(value) < 2**63 else "a number with more than 18 digits"
    if low is not None and value < low:
        raise ValueError(f"must be at least {show(low)}, got {got}")
    if high is not None and value > high:
        raise ValueError(f"must be at most {show(high)}, got {got}")


def _coerce_actions(raw: object) -> tuple[str, ...]:
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise ValueError(
            f'expected one action or a list of actions ({" | ".join(ACTIONS)}), got {_shown(raw)}'
        )
    actions = tuple(cast(list[str], items))
    for action in actions:
        if action not in ACTIONS:
            raise ValueError(f'unknown action "{action}"; choose from {", ".join(ACTIONS)}')
    if "none" in actions and len(actions) > 1:
        raise ValueError('"none" cannot be combined with other actions')
    return actions


def _coerce_listen(raw: object) -> str:
    if not isinstance(raw, str):
        raise ValueError(f'expected "address:port" like "127.0.0.1:9408", got {_shown(raw)}')
    host, sep, port = raw.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f'expected "address:port" with a port 1-65535, got {quoted(raw)}')
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(bare)
    except ValueError as err:
        raise ValueError(
            f'expected an IP address before the port ("127.0.0.1", "[::1]"), got {quoted(host)}'
        ) from err
    return raw


_LABEL_RE = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def _coerce_url(raw: object) -> str:
    """An http(s) base URL every client in clusterctl can use: paths are appended to it."""
    if not isinstance(raw, str):
        raise ValueError(f'expected a URL like "https://control.example", got {_shown(raw)}')
    if raw == "":
        return raw
    if not raw.isascii() or not raw.isprintable() or " " in raw:
        raise ValueError(f"a URL may not contain spaces, control or non-ASCII characters, "
                         f"got {quoted(raw)}")
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as err:
        raise ValueError(f"not a usable URL ({err}): {quoted(raw)}") from err
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {quoted(raw)}")
    if "@" in parts.netloc:
        raise ValueError(f"a user name or password does not belong in the URL, got {quoted(raw)}")
    if "?" in raw or "#" in raw:
        raise ValueError(f"a base URL cannot have a ?query or #fragment (paths are added to it), "
                         f"got {quoted(raw)}")
    if port == 0:
        raise ValueError(f"expected a port 1-65535, got {quoted(raw)}")
    host = parts.hostname
    if parts.netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError as err:
            raise ValueError(f'expected an IPv6 address in brackets, like "http://[::1]:8080", '
                             f"got {quoted(raw)}") from err
    elif not _is_host_name(host):
        raise ValueError(f'expected a host name or IPv4 address, got "{host}"')
    return raw.rstrip("/")


def _coerce_database(raw: object) -> str:
    """sqlite:////absolute/path or postgresql://[user[:password]@]host[:port]/dbname."""
    if not isinstance(raw, str) or not raw.isascii() or not raw.isprintable():
        raise ValueError('expected a database URL like "sqlite:////var/lib/clusterctl/fleet.db" '
                         f'or "postgresql://clusterctl@db.example/fleet", got {_shown(raw)}')
    if raw.startswith("sqlite:///"):
        file = raw[len("sqlite:///"):]
        if not file.startswith("/") or "?" in file or "\0" in file:
            raise ValueError("a SQLite URL needs an absolute path (four slashes: "
                             f'"sqlite:////var/lib/clusterctl/fleet.db"), got {quoted(raw)}')
        return raw
    scheme, sep, _rest = raw.partition("://")
    if scheme in ("postgresql", "postgres") and sep:
        try:
            parts = urlsplit(raw)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as err:
            raise ValueError(f"not a usable PostgreSQL URL ({err}): {quoted(raw)}") from err
        if not parts.hostname or not parts.path.strip("/"):
            raise ValueError("a PostgreSQL URL needs a host and a database name (e.g. "
                             f'"postgresql://clusterctl@db.example:5432/fleet"), '
                             f"got {quoted(raw)}")
        return raw
    raise ValueError('expected "sqlite:////absolute/path.db" or "postgresql://host/dbname", '
                     f"got {quoted(raw)}")


def _is_host_name(host: str) -> bool:
    """A DNS name the resolver accepts (labels of 1-63 characters) or an IPv4 address."""
    labels = host.split(".")
    return len(host) <= 253 and all(_LABEL_RE.match(label) for label in labels)


def is_loopback(host: str) -> bool:
    """A loopback IP address, or localhost."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# Directories that are never clusterctl's own (swap, state, run dir) nor a cache to empty.
SYSTEM_DIRS = frozenset({
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32",
    "/media", "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/snap", "/srv", "/sys",
    "/tmp", "/usr", "/usr/bin", "/usr/lib", "/usr/local", "/usr/sbin", "/usr/share",  # noqa: S108
    "/var", "/var/cache", "/var/lib", "/var/log", "/var/mail", "/var/spool", "/var/tmp",  # noqa: S108
})
# Trees where monitor may empty nothing, except below the cache roots.
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/proc", "/root", "/run",
                "/sbin", "/snap", "/sys", "/tmp", "/usr", "/var")  # noqa: S108
CACHE_ROOTS = ("/var/cache", "/var/tmp", "/tmp", "/root/.cache", "/home/*/.cache")  # noqa: S108
MIN_CACHE_DEPTH = 3  # outside the cache roots: "/opt/conda/pkgs", never "/data/x"
# Below the cache roots, what holds the system's state, not a cache (and why).
NOT_CACHES = (
    (re.compile(r"^/var/cache/debconf(/|$)"), "it holds debconf's answers"),
    (re.compile(r"^/(var/)?tmp/systemd-private-[^/]*(/|$)"),
     "a service's private /tmp (systemd PrivateTmp)"),
    (re.compile(r"^/(var/)?tmp/\.(X11|ICE|font|XIM|Test)-unix(/|$)"),
     "the X11 and ICE sockets"),
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def normal_path(path: str | Path) -> str:
    """``path`` made absolute and normalised as text ("/etc/." -> "/etc", "//x" -> "/x")."""
    return "/" + os.path.normpath(f"/{path}").lstrip("/")


def is_inside(path: str, tree: str) -> bool:
    """``path`` is ``tree`` or below it (both normalised)."""
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def cache_refusal(path: str | Path) -> str | None:
    """Why ``path`` is not clearly a cache whose contents may be removed, or None.

    On the text, normalised: check the resolved path again before removing."""
    norm = normal_path(path)
    parts = norm.split("/")[1:]
    fix = ("list a cache below " + ", ".join(CACHE_ROOTS).replace("*", "<user>")
           + f", or one at least {MIN_CACHE_DEPTH} levels deep outside the system trees")
    if _CONTROL.search(str(path)):
        return (f"refusing {quoted(str(path))}: a control character (a newline, a tab) in "
                "a path; write the path without it")
    held = next((why for pattern, why in NOT_CACHES if pattern.match(norm)), None)
    if held:
        return f"refusing {quoted(str(path))}: {held}, not a cache; {fix}"
    home_cache = len(parts) >= 4 and parts[0] == "home" and parts[2] == ".cache"
    if home_cache or any(norm != root and is_inside(norm, root) for root in CACHE_ROOTS):
        return None
    tree = "/" if norm == "/" else next((t for t in SYSTEM_TREES if is_inside(norm, t)), None)
    if tree is None and parts[0].startswith("lib"):
        tree = f"/{parts[0]}"
    if tree is not None:
        where = "a system directory" if norm == tree else f"inside {tree}"
        return f"refusing {quoted(str(path))}: {where}, not a cache; {fix}"
    if len(parts) < MIN_CACHE_DEPTH:
        return f"refusing {quoted(str(path))}: too near / to be only a cache; {fix}"
    return None


def _clusterctl_dirs(config: Config) -> tuple[tuple[str, str, Path], ...]:
    """The directories that hold clusterctl's own files: (section, key, path)."""
    return (("swap", "dir", config.swap.dir), ("paths", "state_dir", config.paths.state_dir),
            ("paths", "run_dir", config.paths.run_dir))


def cleanup_refusal(listed: str | Path, config: Config, *, resolve: bool = False
                    ) -> str | None:
    """Why monitor must not empty ``listed``, or None. ``resolve`` also compares with
    clusterctl's directories with their symlinks resolved (reads the host)."""
    refusal = cache_refusal(listed)
    if refusal:
        return refusal
    norm = normal_path(listed)
    for section, key, own in _clusterctl_dirs(config):
        forms = {normal_path(own), normal_path(os.path.realpath(own)) if resolve else ""}
        for mine in forms - {""}:
            if is_inside(norm, mine) or is_inside(mine, norm):
                return (f"refusing {quoted(str(listed))}: it holds or is inside [{section}] "
                        f"{key} ({own}), clusterctl's own files; list only caches")
    return None


def _cross_checks(config: Config, path: str, locator: _LineLocator) -> list[ConfigError]:
    errors: list[ConfigError] = []

    def fail(section: str, key: str, message: str) -> None:
        errors.append(
            ConfigError(
                message, path=path, line=locator.key(section, key), key=f"{section}.{key}"
            )
        )

    swap = config.swap
    if swap.min_size_bytes > swap.max_size_bytes:
        fail(
            "swap",
            "min_size",
            f"min_size ({format_size(swap.min_size_bytes)}) is larger than "
            f"max_size ({format_size(swap.max_size_bytes)}); make min_size <= max_size",
        )
    if swap.increment_bytes > swap.max_size_bytes:
        fail(
            "swap",
            "increment",
            f"increment ({format_size(swap.increment_bytes)}) is larger than "
            f"max_size ({format_size(swap.max_size_bytes)}); make increment <= max_size",
        )
    gpu = config.gpu
    _ascending(
        fail,
        "gpu",
        [
            ("temp_optimal", gpu.temp_optimal_c),
            ("temp_normal", gpu.temp_normal_c),
            ("temp_throttle", gpu.temp_throttle_c),
            ("temp_critical", gpu.temp_critical_c),
        ],
    )
    opt = config.optimize
    _ascending(
        fail,
        "optimize",
        [
            ("dask_target", opt.dask_target),
            ("dask_spill", opt.dask_spill),
            ("dask_pause", opt.dask_pause),
            ("dask_terminate", opt.dask_terminate),
        ],
    )
    _ascending(
        fail,
        "gpu",
        [
            ("memory_optimal", gpu.memory_optimal_percent),
            ("memory_normal", gpu.memory_normal_percent),
            ("memory_critical", gpu.memory_critical_percent),
        ],
    )
    for section, key, own in _clusterctl_dirs(config):
        if normal_path(own) in SYSTEM_DIRS:
            fail(section, key, f"{own} is a system directory, not one for clusterctl's own "
                 f'files; use a directory of its own, like "/var/lib/clusterctl"')
    for listed in opt.cleanup_paths:
        refusal = cleanup_refusal(listed, config)
        if refusal:
            fail("optimize", "cleanup_paths", refusal)
    if "command" in config.hibernate.action and not config.hibernate.command:
        fail("hibernate", "action", 'the "command" action needs a command; set [hibernate] '
             'command = ["/path/to/program", "arg"]')
    fleet = config.fleet
    if fleet.wake == "command" and not fleet.wake_command:
        fail("fleet", "wake", 'wake = "command" needs a command; set [fleet] wake_command = '
             '["/path/to/program", "{instance_id}"]')
    if fleet.wake == "ipmi" and not fleet.ipmi_host:
        fail("fleet", "wake", 'wake = "ipmi" needs the BMC\'s address; set [fleet] ipmi_host, '
             'e.g. "{hostname}-bmc"')
    beat = config.heartbeat
    host = urlsplit(beat.control_url).hostname or ""
    if (beat.control_url.startswith("http:") and not beat.allow_insecure_http
            and not is_loopback(host)):
        fail("heartbeat", "control_url",
             f"{beat.control_url} is plain http to another machine: the token and the "
             "node's data would cross the network in clear; use https://, or set "
             "[heartbeat] allow_insecure_http = true")
    return errors


def host_checks(config: Config, path: str, text: str = "", *, swap_dir: bool = True
                ) -> list[ConfigError]:
    """What the host says about a parsed config: read-only (lstat, realpath).

    clusterctl's directories must have no parent another user controls; a cache
    in cleanup_paths must still be a cache with its symlinks resolved. ``swap_dir``
    False leaves the swap dir to the swap step, which checks it again when it acts and
    reports it in `swap status` (exit 1) rather than refusing the whole config."""
    from clusterctl.host.trust import untrusted_ancestor

    locator = _LineLocator(text)
    errors: list[ConfigError] = []
    for section, key, own in _clusterctl_dirs(config):
        if section == "swap" and not swap_dir:
            continue
        reason = untrusted_ancestor(own)
        if reason:
            errors.append(ConfigError(
                f"{own} is not safe for root's files: {reason}", path=path,
                line=locator.key(section, key), key=f"{section}.{key}",
                fix="use a directory whose parents are all root's and not writable by others"))
    for listed in config.optimize.cleanup_paths:
        real = os.path.realpath(listed)
        refusal = cleanup_refusal(real, config, resolve=True)
        if refusal:
            errors.append(ConfigError(
                f"{listed} resolves to {real}: {refusal}", path=path,
                line=locator.key("optimize", "cleanup_paths"), key="optimize.cleanup_paths"))
    return errors


def _ascending(
    fail: Any, section: str, values: Sequence[tuple[str, float]]
) -> None:
    for (low_key, low), (high_key, high) in itertools.pairwise(values):
        if not low < high:
            order = " < ".join(k for k, _ in values)
            fail(
                section,
                high_key,
                f"thresholds out of order: {low_key} = {_num(low)} but "
                f"{high_key} = {_num(high)}; they must rise: {order}",
            )
            return


def with_changes(config: Config, section: str, changes: Mapping[str, object],
                 *, source: str = "update") -> Config:
    """``config`` with ``[section]`` keys changed (values as TOML gives them), validated
    like a file: the first problem is raised as a ConfigError and nothing changes."""
    if section not in sections():
        raise ConfigError(f"unknown section [{_name(section)}]", path=source)
    values = {**as_toml_dict(config)[section], **changes}
    built, errors = _build_section(section, values, source, _LineLocator(""))
    if not errors:
        candidate = dataclasses.replace(config, **{section: built})
        errors = _cross_checks(candidate, source, _LineLocator(""))
        if not errors:
            return candidate
    raise errors[0]


# ---------------------------------------------------------------------------
# editing


def set_values(path: Path, changes: Mapping[str, str], *, dry_run: bool = False) -> Config:
    """Change keys ("section.key" -> value as typed on a command line) in a config file.

    Edits with tomlkit so comments and layout stay; validates the whole new
    file before writing; replaces the file atomically, keeping its mode and
    owner. Creates the file when it does not exist. ``dry_run`` validates
    and returns the new config without writing. A symlinked config (config
    management often links /etc files) is edited at its target; the link stays.
    """
    import tomlkit
    import tomlkit.exceptions

    from clusterctl import system

    try:
        text = read_config_text(path)
    except FileNotFoundError:
        text = ""
    except UnicodeDecodeError as err:
        raise ConfigError("config file is not UTF-8 text, so it cannot be edited",
                          path=str(path), fix="save it as UTF-8 (iconv -t utf-8), then set again"
                          ) from err
    except OSError as err:
        raise ConfigError(f"cannot read the config file: {err.strerror}", path=str(path)) from err
    _config, errors = parse(text, path=str(path))
    if _config is None and any(e.reason.startswith("TOML") for e in errors):
        raise errors[0]  # unreadable as TOML: nothing to edit
    try:
        document = tomlkit.parse(text)
    except (tomlkit.exceptions.TOMLKitError, ValueError, RecursionError) as err:
        raise ConfigError(f"cannot edit this file: {err}", path=str(path),
                          fix="fix it by hand; `clusterctl config validate` says where") from None
    for dotted, typed in changes.items():
        section, key, fld = _setting_for(dotted)
        try:
            value = to_toml_value(fld, coerce(fld, parse_cli_value(fld, typed)))
        except ValueError as err:
            raise ConfigError(str(err), key=dotted) from err
        if section not in document:
            document.add(section, tomlkit.table())
        table = cast(Any, document[section])
        if not isinstance(table, tomlkit.items.AbstractTable):
            kind = ("an array of tables ([[...]])" if isinstance(table, tomlkit.items.AoT)
                    else _a(_type_name(document.unwrap()[section])))
            raise ConfigError(f"{section} is {kind} in this file, not a [{section}] table, so "
                              f"{key} cannot be set in it", path=str(path), key=dotted,
                              fix=f"make it a table by hand: a [{section}] line, then "
                              "key = value lines")
        table[key] = value
    new_text = tomlkit.dumps(document)
    config, errors = parse(new_text, path=str(path))
    if config is not None:
        errors = host_checks(config, str(path), new_text)
    if errors:
        raise errors[0]
    assert config is not None
    if not dry_run:
        system.atomic_write_text(path.resolve(), new_text, mode=0o644)
    return config


def _setting_for(dotted: str) -> tuple[str, str, dataclasses.Field[Any]]:
    if _name(dotted) != dotted:
        raise ConfigError(f"not a key: {quoted(dotted)}",
                          fix="keys look like swap.max_size (section.key)")
    section, _, key = dotted.partition(".")
    known = sections()
    if section not in known:
        raise ConfigError(
            f"unknown section [{section}]{_suggest(section, known, section=True)}",
            key=dotted,
            fix=f"keys look like swap.max_size; sections: {', '.join(known)}",
        )
    settings = section_settings(section)
    if key not in settings:
        raise ConfigError(
            f"unknown key{_suggest(key, settings)}",
            key=dotted,
            fix=f"known keys in [{section}]: {', '.join(settings)}",
        )
    return section, key, settings[key]


def parse_cli_value(fld: dataclasses.Field[Any], text: str) -> object:
    """A command-line string as the TOML value its field expects."""
    kind: Kind = fld.metadata["kind"]
    if kind == "bool":
        lowered = text.lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
        return text
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            return text
    if kind == "float":
        try:
            return float(text)
        except ValueError:
            return text
    if kind == "actions":
        items = [part.strip() for part in text.split(",") if part.strip()]
        return items[0] if len(items) == 1 else items
    if kind in ("paths", "strs", "cgroups"):
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


# ---------------------------------------------------------------------------
# messages


class _LineLocator:
    """Finds the line of a [section] or key in TOML text (1-based), when it can."""

    _HEADER = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]\s*(#.*)?$")

    def __init__(self, text: str) -> None:
        self._lines = text.splitlines()

    def section(self, name: str) -> int | None:
        for number, line in enumerate(self._lines, start=1):
            match = self._HEADER.match(line)
            if match and match.group(1) == name:
                return number
        return self.key(None, name)

    def key(self, section: str | None, key: str) -> int | None:
        current: str | None = None
        key_re = re.compile(rf"^\s*(\"?){re.escape(key)}\1\s*=")
        dotted_re = re.compile(rf"^\s*{re.escape(f'{section}.{key}')}\s*=") if section else None
        for number, line in enumerate(self._lines, start=1):
            match = self._HEADER.match(line)
            if match:
                current = match.group(1)
                continue
            if current == section and key_re.match(line):
                return number
            if current is None and dotted_re and dotted_re.match(line):
                return number
        return None


def _suggest(word: str, known: Mapping[str, object], *, section: bool = False) -> str:
    """ (did you mean "x"?) when a known name is close, else nothing."""
    close = difflib.get_close_matches(word, list(known), n=1)
    if not close:
        return ""
    return f" (did you mean [{close[0]}]?)" if section else f' (did you mean "{close[0]}"?)'


def _type_name(value: object) -> str:
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "list",
        dict: "table",
    }.get(type(value), type(value).__name__)


def _shown(value: object) -> str:
    if isinstance(value, str):
        return f"{quoted(value)} (a string)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    return f"{_clipped(repr(value))} ({_a(_type_name(value))})"


def _name(text: str) -> str:
    """A section or key name as written, or quoted when it is not plain printable text."""
    return text if text.isprintable() and len(text) <= 120 else quoted(text)




def _clipped(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else f"{text[:limit]}..."


def _a(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def instance_id(config: Config) -> str:
    """This node's name to the control plane and in events: ``[heartbeat] instance_id``,
    else the host name."""
    return config.heartbeat.instance_id or socket.gethostname()
