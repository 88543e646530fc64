"""`clusterctl optimize`: read, plan, apply, verify, revert.

The planner (``optimize.plan``) is pure; this module reads the host into
``OptimizeFacts``, applies a plan through ``clusterctl.system`` and keeps the
originals (``optimize.state``). Every path is under ``root`` so tests can run
against a tree; /proc/sys is ``root``/proc/sys.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from clusterctl import locks, system
from clusterctl.config import Config, instance_id
from clusterctl.errors import HostError
from clusterctl.events.log import EventLog
from clusterctl.host import Nvml
from clusterctl.host.procfs import read_cpu, read_memory
from clusterctl.host.software import read_dask, read_ollama
from clusterctl.host.storage import read_filesystem
from clusterctl.host.sysctl import later_settings, read_sysctl, unit_environment
from clusterctl.optimize import state as states
from clusterctl.optimize.plan import (
    DASK_ENV_FILE,
    DASK_UNIT,
    DASK_YAML_FILE,
    OLLAMA_DROPIN,
    OLLAMA_UNIT,
    SYSCTL_FILE,
    SYSCTL_KEYS,
    OptimizeFacts,
    OptimizePlan,
    SysctlOverride,
    plan,
)
from clusterctl.system.sysctl import write_sysctl
from clusterctl.system.systemd import Systemd, systemd_running

log = logging.getLogger("clusterctl.optimize")
LOCK_NAME = "optimize.lock"
OUR_FILES = (SYSCTL_FILE, DASK_ENV_FILE, DASK_YAML_FILE, OLLAMA_DROPIN)


def rooted(root: Path, path: Path | str) -> Path:
    """An absolute host path inside ``root`` (the tree the tests hand in, or "/")."""
    return root / str(path).lstrip("/")


def read_facts(config: Config, *, root: Path = Path("/"), nvml: Nvml | None = None
               ) -> OptimizeFacts:
    inventory = nvml.inventory() if nvml is not None else None
    ollama = read_ollama(root, config.ollama.url, timeout_s=0.3)
    media = read_filesystem(root, str(config.swap.dir)).media
    return OptimizeFacts(
        logical_cores=read_cpu(root).logical_cores,
        ram_bytes=read_memory(root).total_bytes,
        swap_media=media if media in ("ssd", "hdd") else None,
        gpu_vram_bytes=tuple(g.memory_total_bytes for g in inventory.gpus
                             if not g.lost and g.memory_total_bytes) if inventory else (),
        ollama_installed=ollama.installed,
        dask_installed=read_dask(root).distributed_version is not None,
        sysctl_live={k: read_sysctl(root, k) for k in SYSCTL_KEYS},
        sysctl_overrides=tuple(SysctlOverride(k, f, v) for k, f, v in
                               later_settings(root, Path(SYSCTL_FILE).name, SYSCTL_KEYS)),
        ollama_env=unit_environment(root, OLLAMA_UNIT),
        files_now={p: _read(root, p) for p in OUR_FILES},
    )


def _read(root: Path, path: str) -> str | None:
    """A file apply may write: its text, None when absent; HostError when it is there but
    cannot be read (its original could not be saved, so nothing may overwrite it)."""
    try:
        return rooted(root, path).read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise HostError(f"cannot read {path}: {err.strerror or err}",
                        fix=f"make {path} a readable regular file (or remove it), "
                        "then run it again") from err


@dataclass(frozen=True)
class ApplyResult:
    plan: OptimizePlan
    written: tuple[str, ...]  # files
    set_live: dict[str, str]  # sysctl key -> value
    restarted: tuple[str, ...]
    notes: tuple[str, ...]  # restarts not done, and why


def _changes(facts: OptimizeFacts, the_plan: OptimizePlan
             ) -> tuple[list[tuple[str, str, str | None]], dict[str, str]]:
    files = [(f.path, f.content, f.restarts) for f in the_plan.files
             if facts.files_now.get(f.path) != f.content]
    sysctl = {k: v for k, v in the_plan.sysctl.items() if facts.sysctl_live.get(k) != v}
    return files, sysctl


def apply(config: Config, *, root: Path = Path("/"), nvml: Nvml | None = None,
          dry_run: bool = False, systemd: Systemd | None = None,
          now: Callable[[], float] = time.time) -> ApplyResult:
    """Make the node match the plan; a second run with nothing changed touches nothing."""
    if dry_run:  # reads only: no lock to take
        facts = read_facts(config, root=root, nvml=nvml)
        the_plan = plan(facts, config)
        files, sysctl = _changes(facts, the_plan)
        return ApplyResult(the_plan, tuple(p for p, _, _ in files), sysctl, (), ())
    with locks.exclusive(rooted(root, config.paths.run_dir) / LOCK_NAME,
                         what="clusterctl optimize command"):
        facts = read_facts(config, root=root, nvml=nvml)
        the_plan = plan(facts, config)
        files, sysctl = _changes(facts, the_plan)
        if not files and not sysctl:
            return ApplyResult(the_plan, tuple(p for p, _, _ in files), sysctl, (), ())
        state_dir = rooted(root, config.paths.state_dir)
        saved = states.load(state_dir)
        dirs = _missing_dirs(root, [p for p, _, _ in files])
        saved = saved.remembering({k: str(facts.sysctl_live[k]) for k in sysctl},
                                  {p: facts.files_now.get(p) for p, _, _ in files}, dirs)
        states.save(state_dir, saved)  # the originals are on disk before any change
        try:
            for directory in dirs:
                rooted(root, directory).mkdir(mode=0o755)
            for path, content, _ in files:
                system.atomic_write_text(rooted(root, path), content, mode=0o644)
                log.info("wrote %s", path)
            for key, value in sysctl.items():
                write_sysctl(root, key, value)
                log.info("set %s = %s (was %s)", key, value, facts.sysctl_live[key])
        except (OSError, HostError) as err:
            message = err.message if isinstance(err, HostError) else str(err)
            fix = err.fix if isinstance(err, HostError) else None
            raise HostError(f"optimize apply stopped half-way: {message}",
                            fix=(f"{fix}; then " if fix else "")
                            + "re-run apply, or `clusterctl optimize revert` to undo the part "
                            "applied (the originals are saved)") from err
        saved = replace(saved,
                        applied_sysctl={**saved.applied_sysctl, **the_plan.sysctl},
                        applied_files={**saved.applied_files,
                                       **{f.path: states.digest(f.content)
                                          for f in the_plan.files}})
        states.save(state_dir, saved)
        units = sorted({unit for _, _, unit in files if unit})
        restarted, notes = restart_units(root, units, systemd,
                                    reload=any(p.startswith("/etc/systemd/") for p, _, _ in files))
        EventLog(state_dir, instance_id(config)).record(
            "optimize_applied", "settings chosen from the hardware",
            {"files": [p for p, _, _ in files], "sysctl": sysctl,
             "restarted": list(restarted)}, now=now())
        return ApplyResult(the_plan, tuple(p for p, _, _ in files), sysctl, restarted,
                           notes)


def _missing_dirs(root: Path, paths: list[str]) -> tuple[str, ...]:
    missing: list[str] = []
    for path in paths:
        parent = Path(path).parent
        chain = []
        while not rooted(root, parent).exists():
            chain.append(str(parent))
            parent = parent.parent
        missing += [d for d in reversed(chain) if d not in missing]
    return tuple(missing)


def restart_units(root: Path, units: list[str], systemd: Systemd | None = None, *,
                  reload: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """daemon-reload if asked, then restart each unit that is active; notes where none."""
    if not units and not reload:
        return (), ()
    if not systemd_running(root):
        return (), tuple(f"systemd is not running here: restart {u} yourself to use the new "
                         "settings" for u in units)
    manager = systemd or Systemd()
    if reload:
        manager.daemon_reload()
    restarted = tuple(u for u in units if manager.restart_if_active(u))
    for unit in restarted:
        log.info("restarted %s", unit)
    return restarted, ()


@dataclass(frozen=True)
class Drift:
    what: str
    applied: str
    now: str | None


def verify(config: Config, *, root: Path = Path("/")) -> tuple[Drift, ...]:
    """What differs now from what `apply` last set (an operator's edit, another tool)."""
    saved = states.load(rooted(root, config.paths.state_dir))
    drift = [Drift(key, value, read_sysctl(root, key))
             for key, value in saved.applied_sysctl.items() if read_sysctl(root, key) != value]
    for path, digest in saved.applied_files.items():
        text = _read(root, path)
        if text is None or states.digest(text) != digest:
            drift.append(Drift(path, "as written by apply",
                               None if text is None else "edited since"))
    return tuple(drift)


@dataclass(frozen=True)
class RevertResult:
    restored_sysctl: dict[str, str]
    restored_files: tuple[str, ...]
    removed_files: tuple[str, ...]
    restarted: tuple[str, ...]
    notes: tuple[str, ...]


def revert(config: Config, *, root: Path = Path("/"), dry_run: bool = False,
           systemd: Systemd | None = None, now: Callable[[], float] = time.time
           ) -> RevertResult:
    """Every original value back, every file it created gone, affected units restarted."""
    if dry_run:
        saved = states.load(rooted(root, config.paths.state_dir))
        return RevertResult(dict(saved.original_sysctl),
                            tuple(p for p, t in saved.original_files.items() if t is not None),
                            tuple(p for p, t in saved.original_files.items()
                                  if t is None and _read(root, p) is not None), (), ())
    with locks.exclusive(rooted(root, config.paths.run_dir) / LOCK_NAME,
                         what="clusterctl optimize command"):
        state_dir = rooted(root, config.paths.state_dir)
        saved = states.load(state_dir)
        restored = [p for p, text in saved.original_files.items() if text is not None]
        removed = [p for p, text in saved.original_files.items()
                   if text is None and _read(root, p) is not None]
        if saved.empty:
            return RevertResult(dict(saved.original_sysctl), tuple(restored), tuple(removed),
                                (), ())
        for key, value in saved.original_sysctl.items():
            write_sysctl(root, key, value)
            log.info("restored %s = %s", key, value)
        for path, text in saved.original_files.items():
            target = rooted(root, path)
            if text is None:
                if target.parent.is_dir():  # else it was never written
                    target.unlink(missing_ok=True)
            else:
                system.atomic_write_text(target, text)
        for directory in reversed(saved.created_dirs):
            with contextlib.suppress(OSError):  # not empty (someone else's files): left
                rooted(root, directory).rmdir()
        units = sorted({u for u in map(_unit_of, saved.original_files) if u})
        restarted, notes = restart_units(root, units, systemd, reload=any(
            p.startswith("/etc/systemd/") for p in saved.original_files))
        states.forget(state_dir)
        EventLog(state_dir, instance_id(config)).record(
            "optimize_reverted", "original values restored",
            {"sysctl": saved.original_sysctl, "files": list(saved.original_files),
             "restarted": list(restarted)}, now=now())
        return RevertResult(dict(saved.original_sysctl), tuple(restored), tuple(removed),
                            restarted, notes)


def _unit_of(path: str) -> str | None:
    return {OLLAMA_DROPIN: OLLAMA_UNIT, DASK_ENV_FILE: DASK_UNIT,
            DASK_YAML_FILE: DASK_UNIT}.get(path)


def plan_now(config: Config, *, root: Path = Path("/"), nvml: Nvml | None = None
             ) -> tuple[OptimizeFacts, OptimizePlan]:
    facts = read_facts(config, root=root, nvml=nvml)
    return facts, plan(facts, config)
