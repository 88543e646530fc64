"""Emergency memory measures: drop the page cache, compact, unload Ollama models."""

from __future__ import annotations

import os
from pathlib import Path

from clusterctl.errors import HostError
from clusterctl.host.software import ollama_call


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
    """Ollama unloads ``name`` from memory (keep_alive 0); the model stays on disk.
    HostError when it refuses, does not answer, or answers other than its API does."""
    try:
        answer = ollama_call(api_url, "/api/generate", timeout_s=timeout_s,
                             body={"model": name, "keep_alive": 0})
    except HostError as err:
        raise HostError(f"{name} not unloaded: {err.message}", fix=err.fix) from err
    if answer.get("done") is not True:
        raise HostError(f"Ollama did not confirm unloading {name}: {str(answer)[:200]}")
