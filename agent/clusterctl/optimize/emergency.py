"""The emergency measures: free memory now (and, in `monitor`, react to load)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clusterctl.config import Config, instance_id
from clusterctl.errors import HostError
from clusterctl.events.log import EventLog
from clusterctl.host.procfs import read_memory
from clusterctl.host.software import LoadedModel, read_loaded_models
from clusterctl.optimize.executor import rooted
from clusterctl.system.memory import compact_memory, drop_page_cache, unload_model

log = logging.getLogger("clusterctl.optimize")


@dataclass(frozen=True)
class FreeResult:
    available_before_bytes: int
    available_after_bytes: int
    steps: tuple[str, ...]  # what was done, in order
    unloaded: tuple[LoadedModel, ...]
    notes: tuple[str, ...]  # what could not be done, and why

    @property
    def freed_bytes(self) -> int:
        """MemAvailable after minus before: the measured gain (may be 0 or less)."""
        return self.available_after_bytes - self.available_before_bytes


def _available(root: Path) -> int:
    memory = read_memory(root)
    return memory.available_bytes if memory.available_bytes is not None else memory.free_bytes


def free_memory(config: Config, *, root: Path = Path("/"), ollama: bool = True,
                dry_run: bool = False, now: Callable[[], float] = time.time) -> FreeResult:
    """sync + drop the page cache, compact, unload Ollama's loaded models (never delete).

    Ollama does not say whether a model is serving a request; every loaded model is
    asked to unload (keep_alive 0), which is what `ollama stop` does.
    """
    before = _available(root)
    steps: list[str] = []
    notes: list[str] = []
    unloaded: list[LoadedModel] = []
    models: tuple[LoadedModel, ...] = ()
    if ollama:
        try:
            models = read_loaded_models(config.ollama.url)
        except HostError as err:
            notes.append(f"Ollama's models not unloaded: {err.message}")
    if dry_run:
        return FreeResult(before, before, ("would drop the page cache", "would compact memory",
                                           *(f"would unload {m.name}" for m in models)),
                          (), tuple(notes))
    for model in models:
        try:
            unload_model(config.ollama.url, model.name)
        except HostError as err:
            notes.append(err.message)
            continue
        unloaded.append(model)
        steps.append(f"unloaded {model.name}")
    drop_page_cache(root)
    steps.append("dropped the page cache")
    if compact_memory(root):
        steps.append("compacted memory")
    else:
        notes.append("this kernel has no memory compaction (CONFIG_COMPACTION)")
    result = FreeResult(before, _available(root), tuple(steps), tuple(unloaded), tuple(notes))
    log.info("free-memory: %+d MiB available", result.freed_bytes // 2**20)
    EventLog(rooted(root, config.paths.state_dir), instance_id(config)).record(
        "memory_freed", "clusterctl optimize free-memory",
        {"available_before_bytes": before, "available_after_bytes": result.available_after_bytes,
         "unloaded": [m.name for m in unloaded], "steps": list(steps)}, now=now())
    return result
