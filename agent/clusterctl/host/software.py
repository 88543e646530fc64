"""Init system, cgroups, and the AI services on the node (Ollama, Dask), rooted at ``root``.

Whatever answers on Ollama's port, asking it (``ollama_call``) ends in a JSON object or a
HostError that says which: an HTTP error, no answer, or something that is not its API.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from clusterctl.errors import HostError
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


def _holds(path: Path, test: Callable[[Path], bool]) -> bool:
    """``test(path)`` (is_dir, is_file, exists); False when the path cannot be looked at
    (EACCES on a hidden directory, EIO): only what can be seen is reported as there."""
    try:
        return test(path)
    except OSError:
        return False


def _glob(directory: Path, pattern: str) -> list[Path]:
    """``directory.glob(pattern)``, sorted; what was listed before a directory vanished
    mid-walk (a package being upgraded: ENOENT) or could not be read is left out."""
    found: list[Path] = []
    try:
        for path in directory.glob(pattern):
            found.append(path)
    except OSError:
        pass
    return sorted(found)


def read_system(root: Path) -> SystemFacts:
    hostname = read_text(root, "proc/sys/kernel/hostname")
    kernel = read_text(root, "proc/sys/kernel/osrelease")
    init = read_text(root, "proc/1/comm")
    return SystemFacts(
        hostname=hostname.strip() if hostname else None,
        kernel=kernel.strip() if kernel else None,
        systemd_booted=_holds(root / "run/systemd/system", Path.is_dir),
        init=init.strip() if init else None,
        cgroup=cgroup_mode(root),
    )


def cgroup_mode(root: Path) -> CgroupMode | None:
    cgroup = root / "sys/fs/cgroup"
    if _holds(cgroup / "cgroup.controllers", Path.exists):
        return "v2"
    if _holds(cgroup / "unified/cgroup.controllers", Path.exists):
        return "hybrid"
    if _holds(cgroup, lambda p: p.is_dir() and any(p.iterdir())):
        return "v1"
    return None


def find_binary(root: Path, name: str) -> str | None:
    for directory in BIN_DIRS:
        candidate = root / directory / name
        if _holds(candidate, Path.is_file):
            return f"/{directory}/{name}"
    return None


def find_unit(root: Path, unit: str) -> str | None:
    for directory in UNIT_DIRS:
        if _holds(root / directory / unit, Path.is_file):
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
    version = error = None
    try:
        body = ollama_call(api_url, "/api/version", timeout_s=timeout_s)
        version = str(body.get("version") or "unknown")
    except _HttpStatus as err:
        error = f"HTTP {err.code} from {api_url}"
    except _NoAnswer as err:
        error = f"no answer from {api_url} ({err.reason})"
    except HostError:
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
        for site in _glob(root, pattern):
            found = {}
            for entry in _glob(site, "*.dist-info"):
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
    models = ollama_call(api_url, "/api/ps", timeout_s=timeout_s).get("models") or []
    if not isinstance(models, list):
        raise not_ollama(api_url, f"/api/ps gave models as {_json_kind(models)}")
    return tuple(_loaded_model(api_url, entry) for entry in models)


def _loaded_model(api_url: str, entry: object) -> LoadedModel:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise not_ollama(api_url, f"/api/ps listed {_json_kind(entry)} where a model belongs")
    sizes = [entry.get(key) or 0 for key in ("size", "size_vram")]
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < 2**63:
            raise not_ollama(api_url, f"/api/ps gave {entry['name']!r:.80} a size of "
                             f"{_json_kind(size) if not isinstance(size, float) else size}")
    return LoadedModel(entry["name"], sizes[0], sizes[1])


# -- talking to Ollama -------------------------------------------------------------------

OLLAMA_ANSWER_LIMIT_BYTES = 1 << 20  # /api/ps with hundreds of models is a few KiB


def not_ollama(api_url: str, what: str) -> HostError:
    return HostError(f"Ollama at {api_url} answered something that is not its API: {what}",
                     fix="check that [ollama] url is Ollama's address")


def ollama_call(api_url: str, path: str, *, timeout_s: float,
                body: dict[str, object] | None = None) -> dict[str, Any]:
    """Ollama's answer (a JSON object) to GET ``path``, or POST ``body`` as JSON.

    Whatever listens on Ollama's port, this ends in the object or a HostError: HTTP
    errors, no answer, or an answer that is not Ollama's API (broken HTTP, a header line
    too long, more than OLLAMA_ANSWER_LIMIT_BYTES, not JSON, JSON nested too deeply, not
    an object)."""
    # urllib's HTTP stack costs ~25 ms to import: only what asks Ollama pays for it
    import http.client
    import json
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    # api_url is validated as http(s) by the config
    request = urllib.request.Request(f"{api_url}{path}", data=data,  # noqa: S310
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            raw = response.read(OLLAMA_ANSWER_LIMIT_BYTES + 1)
    except urllib.error.HTTPError as err:
        err.close()
        raise _HttpStatus(f"Ollama at {api_url} answered HTTP {err.code} to {path}",
                          code=err.code) from err
    except http.client.HTTPException as err:  # a bad status line, a header line too long
        raise not_ollama(api_url, f"broken HTTP ({_clipped(str(err) or type(err).__name__)})"
                         ) from err
    except (urllib.error.URLError, OSError) as err:
        raise _NoAnswer(str(getattr(err, "reason", err)), api_url) from err
    except ValueError as err:  # http.client on a malformed chunk size
        raise not_ollama(api_url, f"broken HTTP ({_clipped(str(err))})") from err
    if len(raw) > OLLAMA_ANSWER_LIMIT_BYTES:
        raise not_ollama(api_url, f"more than {OLLAMA_ANSWER_LIMIT_BYTES >> 20} MiB to {path}")
    try:
        answer = json.loads(raw or b"{}")
    except RecursionError:
        raise not_ollama(api_url, f"JSON nested too deeply from {path}") from None
    except ValueError as err:  # not JSON, not UTF-8
        raise not_ollama(api_url, f"not JSON from {path} ({_clipped(str(err))})") from err
    if not isinstance(answer, dict):
        raise not_ollama(api_url, f"{_json_kind(answer)} from {path}, not a JSON object")
    return answer


def _json_kind(value: object) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _clipped(text: str, limit: int = 80) -> str:
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _NoAnswer(HostError):
    def __init__(self, reason: str, api_url: str) -> None:
        super().__init__(f"no answer from Ollama at {api_url} ({reason})",
                         fix="is ollama.service running? check [ollama] url")
        self.reason = reason


class _HttpStatus(HostError):
    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message, fix="is it Ollama 0.1.38 or newer?")
        self.code = code
