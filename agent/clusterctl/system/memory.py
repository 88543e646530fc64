"""Emergency memory measures: drop the page cache, compact, unload Ollama models."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from clusterctl.errors import HostError


def drop_page_cache(root: Path) -> None:
    """sync, then drop clean page cache (not dentries and inodes: those are cheap to keep)."""
    os.sync()
    _write(root / "proc/sys/vm/drop_caches", "1")


def compact_memory(root: Path) -> bool:
    """Ask the kernel to compact free memory; False where it has no compaction."""
    path = root / "proc/sys/vm/compact_memory"
    if not path.exists():
        return False
    _write(path, "1")
    return True


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value + "\n")
    except PermissionError as err:
        raise HostError(f"cannot write {path}: permission denied", fix="run as root") from err
    except OSError as err:
        raise HostError(f"cannot write {path}: {err.strerror}") from err


def unload_model(api_url: str, name: str, *, timeout_s: float = 30.0) -> None:
    """Ollama unloads ``name`` from memory (keep_alive 0); the model stays on disk."""
    body = json.dumps({"model": name, "keep_alive": 0}).encode()
    # api_url is validated as http(s) by the config
    request = urllib.request.Request(f"{api_url}/api/generate", data=body,  # noqa: S310
                                     method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            answer = json.loads(response.read(1 << 16) or b"{}")
    except urllib.error.HTTPError as err:
        raise HostError(f"Ollama refused to unload {name}: HTTP {err.code}") from err
    except (urllib.error.URLError, OSError) as err:
        raise HostError(f"no answer from Ollama at {api_url} while unloading {name} "
                        f"({getattr(err, 'reason', err)})") from err
    except ValueError as err:
        raise HostError(f"Ollama's answer to unloading {name} was not JSON") from err
    if not answer.get("done"):
        raise HostError(f"Ollama did not confirm unloading {name}: {answer!r:.200}")
