"""sysctl as the kernel has it now, and the files systemd-sysctl applies at boot."""

from __future__ import annotations

import contextlib
from pathlib import Path

from clusterctl.errors import HostError

# systemd-sysctl's search path, in its order of precedence for files of the same name
SYSCTL_DIRS = ("etc/sysctl.d", "run/sysctl.d", "usr/local/lib/sysctl.d", "usr/lib/sysctl.d",
               "lib/sysctl.d")


def proc_path(key: str) -> str:
    return "proc/sys/" + key.replace(".", "/")


def read_sysctl(root: Path, key: str) -> str | None:
    """The live value ("60"), or None when this kernel has no such key.

    HostError when the key is there but cannot be read (EACCES, EIO): whoever sets it
    must have the value to save and restore, and "no such key" would be a lie.
    """
    path = root / proc_path(key)
    try:
        return path.read_text(errors="replace").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        raise HostError(f"cannot read sysctl {key} (/{proc_path(key)}): "
                        f"{err.strerror or err}",
                        fix="run as root, with /proc/sys readable (ProtectKernelTunables= "
                        "keeps it readable)") from err


def _settings(text: str) -> dict[str, str]:
    out = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip().lstrip("-").replace("/", ".")] = value.strip()
    return out


def boot_files(root: Path) -> list[tuple[str, Path]]:
    """(name, path) in the order systemd-sysctl applies them; /etc wins a shared name."""
    chosen: dict[str, Path] = {}
    for directory in SYSCTL_DIRS:
        with contextlib.suppress(OSError):
            for path in (root / directory).iterdir():
                if path.name.endswith(".conf") and path.name not in chosen:
                    chosen[path.name] = path
    return sorted(chosen.items())


def later_settings(root: Path, ours: str, keys: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(key, file, value) for every file applied after ``ours`` that sets one of ``keys``.

    The last file read wins at boot: files named after ours in sysctl.d, and
    /etc/sysctl.conf (procps reads it last; Debian links it as 99-sysctl.conf).
    """
    found = []
    later = [(n, p) for n, p in boot_files(root) if n > ours]
    later.append(("sysctl.conf", root / "etc/sysctl.conf"))
    seen: set[Path] = set()
    for _, path in later:
        try:
            resolved = path.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            values = _settings(path.read_text(errors="replace"))
        except OSError:
            continue
        shown = "/" + str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        found += [(key, shown, values[key]) for key in keys if key in values]
    return found


def unit_environment(root: Path, unit: str) -> dict[str, str]:
    """Environment= set in ``unit``'s drop-ins (/etc, /run), later files winning."""
    out: dict[str, str] = {}
    files: dict[str, Path] = {}
    for directory in (f"run/systemd/system/{unit}.d", f"etc/systemd/system/{unit}.d"):
        with contextlib.suppress(OSError):
            for path in (root / directory).iterdir():
                if path.name.endswith(".conf"):
                    files[path.name] = path  # /etc over /run for a shared name
    for _, path in sorted(files.items()):
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                key, sep, value = line.strip().partition("=")
                if sep and key == "Environment":
                    for item in value.split('" "') if '"' in value else value.split():
                        name, eq, val = item.strip('"').partition("=")
                        if eq:
                            out[name] = val
    return out
