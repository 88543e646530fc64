"""Init system, cgroups, and the AI services on the node (Ollama, Dask), rooted at ``root``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from clusterctl.host.procfs import read_text

# Where services and operators install programs; systemd's own default PATH.
BIN_DIRS = ("usr/local/sbin", "usr/local/bin", "usr/sbin", "usr/bin", "sbin", "bin")
UNIT_DIRS = ("etc/systemd/system", "run/systemd/system", "usr/lib/systemd/system",
             "lib/systemd/system")

CgroupMode = Literal["v2", "hybrid", "v1"]


@dataclass(frozen=True)
class SystemFacts:
    hostname: str | None
    kernel: str | None
    systemd_booted: bool  # systemd is PID 1 (sd_booted: /run/systemd/system exists)
    init: str | None  # name of PID 1
    cgroup: CgroupMode | None


def read_system(root: Path) -> SystemFacts:
    hostname = read_text(root, "proc/sys/kernel/hostname")
    kernel = read_text(root, "proc/sys/kernel/osrelease")
    init = read_text(root, "proc/1/comm")
    return SystemFacts(
        hostname=hostname.strip() if hostname else None,
        kernel=kernel.strip() if kernel else None,
        systemd_booted=(root / "run/systemd/system").is_dir(),
        init=init.strip() if init else None,
        cgroup=cgroup_mode(root),
    )


def cgroup_mode(root: Path) -> CgroupMode | None:
    cgroup = root / "sys/fs/cgroup"
    if (cgroup / "cgroup.controllers").exists():
        return "v2"
    if (cgroup / "unified/cgroup.controllers").exists():
        return "hybrid"
    if cgroup.is_dir() and any(cgroup.iterdir()):
        return "v1"
    return None


def find_binary(root: Path, name: str) -> str | None:
    for directory in BIN_DIRS:
        candidate = root / directory / name
        if candidate.is_file():
            return f"/{directory}/{name}"
    return None


def find_unit(root: Path, unit: str) -> str | None:
    for directory in UNIT_DIRS:
        if (root / directory / unit).is_file():
            return f"/{directory}/{unit}"
    return None


@dataclass(frozen=True)
class OllamaFacts:
    binary: str | None
    unit: str | None
    api_url: str
    api_version: str | None  # set when the API answered
    api_error: str | None  # why it did not

    @property
    def installed(self) -> bool:
        return self.binary is not None or self.unit is not None

    @property
    def running(self) -> bool:
        return self.api_version is not None


def read_ollama(root: Path, api_url: str, *, timeout_s: float = 0.5) -> OllamaFacts:
    # urllib's HTTP stack costs ~25 ms to import: only `check` pays for it
    import json
    import urllib.error
    import urllib.request

    version = error = None
    try:
        # api_url is validated as http(s) by the config
        url = f"{api_url}/api/version"
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310
            body = json.loads(response.read(4096) or b"{}")
            version = str(body.get("version") or "unknown")
    except urllib.error.HTTPError as err:
        error = f"HTTP {err.code} from {api_url}"
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        error = f"no answer from {api_url} ({reason})"
    except (ValueError, AttributeError):
        error = f"{api_url} answered, but not like Ollama"
    return OllamaFacts(
        binary=find_binary(root, "ollama"),
        unit=find_unit(root, "ollama.service"),
        api_url=api_url,
        api_version=version,
        api_error=error,
    )


@dataclass(frozen=True)
class DaskFacts:
    version: str | None  # dask
    distributed_version: str | None  # dask.distributed, which provides `dask worker`
    location: str | None  # the site-packages it was found in
    worker_binary: str | None


_DIST_INFO = re.compile(r"^(dask|distributed)-([^-]+)\.dist-info$")
_SITE_GLOBS = (
    "usr/lib/python3*/dist-packages",
    "usr/lib/python3*/site-packages",
    "usr/local/lib/python3*/dist-packages",
    "usr/local/lib/python3*/site-packages",
    "opt/*/lib/python3*/site-packages",
    "opt/*/*/lib/python3*/site-packages",
)


def read_dask(root: Path) -> DaskFacts:
    """Dask as installed for the node's Pythons (not clusterctl's own venv)."""
    worker = find_binary(root, "dask") or find_binary(root, "dask-worker")
    for pattern in _SITE_GLOBS:
        for site in sorted(root.glob(pattern)):
            found = {}
            for entry in site.glob("*.dist-info"):
                match = _DIST_INFO.match(entry.name)
                if match:
                    found[match.group(1)] = match.group(2)
            if "dask" in found:
                location = "/" + str(site.relative_to(root))
                return DaskFacts(found["dask"], found.get("distributed"), location, worker)
    if root == Path("/"):
        import importlib.metadata

        try:
            version = importlib.metadata.version("dask")
        except importlib.metadata.PackageNotFoundError:
            pass
        else:
            try:
                distributed: str | None = importlib.metadata.version("distributed")
            except importlib.metadata.PackageNotFoundError:
                distributed = None
            return DaskFacts(version, distributed, "clusterctl's Python", worker)
    return DaskFacts(None, None, None, worker)


@dataclass(frozen=True)
class LoadedModel:
    """A model Ollama holds in memory (``GET /api/ps``)."""

    name: str
    size_bytes: int
    vram_bytes: int


def read_loaded_models(api_url: str, *, timeout_s: float = 2.0) -> tuple[LoadedModel, ...]:
    """What Ollama has loaded now; HostError when it does not answer like Ollama."""
    import json
    import urllib.error
    import urllib.request

    from clusterctl.errors import HostError

    try:
        with urllib.request.urlopen(f"{api_url}/api/ps", timeout=timeout_s) as response:  # noqa: S310
            body = json.loads(response.read(1 << 20) or b"{}")
        return tuple(LoadedModel(str(m["name"]), int(m.get("size") or 0),
                                 int(m.get("size_vram") or 0)) for m in body.get("models") or ())
    except urllib.error.HTTPError as err:
        raise HostError(f"Ollama at {api_url} answered HTTP {err.code} to /api/ps",
                        fix="is it Ollama 0.1.38 or newer?") from err
    except (urllib.error.URLError, OSError) as err:
        raise HostError(f"no answer from Ollama at {api_url} ({getattr(err, 'reason', err)})",
                        fix="is ollama.service running? check [ollama] url") from err
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise HostError(f"{api_url}/api/ps did not answer like Ollama") from err
