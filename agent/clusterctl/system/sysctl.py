"""Setting sysctl values live (/proc/sys)."""

from __future__ import annotations

from pathlib import Path

from clusterctl.errors import HostError
from clusterctl.host.sysctl import proc_path


def write_sysctl(root: Path, key: str, value: str) -> None:
    path = root / proc_path(key)
    try:
        path.write_text(f"{value}\n")
    except PermissionError as err:
        raise HostError(f"cannot set {key}: permission denied", fix="run as root") from err
    except OSError as err:
        raise HostError(f"cannot set {key} = {value}: {err.strerror}",
                        fix=f"check that {value!r} is valid for {key}") from err
