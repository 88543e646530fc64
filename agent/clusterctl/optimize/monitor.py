"""`clusterctl optimize monitor`: the emergency measures, with memory between runs.

A sample (CPU over a short window, memory, the state dir's disk, the Dask worker
count in our env file) and the saved ``MonitorState`` go into the pure
``plan_monitor``; ``execute`` carries the actions out. Each action is an event.

- CPU at or over ``cpu_threshold`` for ``cpu_sustain`` seconds: halve the Dask
  workers (env file + restart of clusterctl-dask-worker.service if it runs); again
  after another ``cpu_sustain`` if still hot. Back to the planned count once CPU
  has stayed under ``cpu_threshold - 20`` for ``calm`` seconds.
- Memory at or over ``memory_threshold``: grow swap by one increment (the swap
  policy's own code, its limits included) and free memory; at most once a minute.
- The state dir's disk at or over ``disk_threshold``: remove clusterctl's rotated
  event logs older than ``retention_days`` and the contents of the operator's
  ``cleanup_paths``; at most every five minutes. Nothing else is ever removed: each
  listed cache is opened without following a symlink, and the directory actually
  opened must be the listed path itself, normalised (a symlink anywhere on the way
  leaves it alone) and pass the config's cache rules again before anything in it
  goes; inside it, no symlink is followed (a link is removed, never its target), and
  nothing on another filesystem or under a mount point is touched (rm
  --one-file-system).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from clusterctl import system
from clusterctl.config import Config, cleanup_refusal, instance_id, normal_path
from clusterctl.errors import HostError
from clusterctl.events.log import FILE_NAME as EVENTS_FILE
from clusterctl.events.log import EventLog
from clusterctl.events.outbox import Outbox
from clusterctl.host.procfs import cpu_usage_percent, read_cpu_times, read_memory
from clusterctl.optimize.emergency import free_memory
from clusterctl.optimize.executor import restart_units, rooted
from clusterctl.optimize.plan import DASK_ENV_FILE, DASK_UNIT, parse_env
from clusterctl.swap import executor as swap
from clusterctl.system import statefile
from clusterctl.units import format_size

log = logging.getLogger("clusterctl.optimize")
STATE_FILE = "monitor.json"
STATE_SPEC = statefile.StateFile(STATE_FILE, "the optimize monitor's state",
                                 statefile.Policy.START_OVER)
CALM_MARGIN_PERCENT = 20
MEMORY_COOLDOWN_S = 60
DISK_COOLDOWN_S = 300

Kind = Literal["reduce_dask", "restore_dask", "relieve_memory", "clean_disk"]


@dataclass(frozen=True)
class Sample:
    cpu_percent: float | None
    memory_percent: float | None
    disk_percent: float | None  # the filesystem holding the state dir
    dask_workers: int | None  # DASK_NWORKERS in our env file; None: no env file


@dataclass(frozen=True)
class MonitorState:
    cpu_high_since: float | None = None
    cpu_calm_since: float | None = None
    dask_planned_workers: int | None = None  # set while the workers are reduced
    memory_acted_at: float | None = None
    disk_acted_at: float | None = None


@dataclass(frozen=True)
class MonitorAction:
    kind: Kind
    reason: str
    workers: int | None = None


def plan_monitor(sample: Sample, state: MonitorState, config: Config, now: float
                 ) -> tuple[tuple[MonitorAction, ...], MonitorState]:
    opt = config.optimize
    actions: list[MonitorAction] = []
    cpu = sample.cpu_percent
    if cpu is not None and cpu >= opt.cpu_threshold_percent:
        since = state.cpu_high_since if state.cpu_high_since is not None else now
        state = replace(state, cpu_high_since=since, cpu_calm_since=None)
        workers = sample.dask_workers
        if now - since >= opt.cpu_sustain_s and workers is not None and workers > 1:
            target = max(1, workers // 2)
            actions.append(MonitorAction(
                "reduce_dask", f"CPU {cpu:.0f}% for {now - since:.0f} s (over "
                f"{opt.cpu_threshold_percent:g}%): Dask workers {workers} -> {target}", target))
            state = replace(state, cpu_high_since=now,
                            dask_planned_workers=state.dask_planned_workers or workers)
    elif cpu is not None and cpu < opt.cpu_threshold_percent - CALM_MARGIN_PERCENT:
        since = state.cpu_calm_since if state.cpu_calm_since is not None else now
        state = replace(state, cpu_high_since=None, cpu_calm_since=since)
        planned = state.dask_planned_workers
        if planned is not None and now - since >= opt.calm_s:
            if sample.dask_workers is not None and sample.dask_workers != planned:
                actions.append(MonitorAction(
                    "restore_dask", f"CPU calm ({cpu:.0f}%) for {now - since:.0f} s: Dask "
                    f"workers back to {planned}", planned))
            state = replace(state, dask_planned_workers=None)
    else:
        state = replace(state, cpu_high_since=None, cpu_calm_since=None)
    if _due(sample.memory_percent, opt.memory_threshold_percent, state.memory_acted_at, now,
            MEMORY_COOLDOWN_S):
        actions.append(MonitorAction("relieve_memory", f"memory {sample.memory_percent:.0f}% "
                                     f"in use (at or over {opt.memory_threshold_percent:g}%)"))
        state = replace(state, memory_acted_at=now)
    if _due(sample.disk_percent, opt.disk_threshold_percent, state.disk_acted_at, now,
            DISK_COOLDOWN_S):
        actions.append(MonitorAction("clean_disk", f"the state dir's disk is "
                                     f"{sample.disk_percent:.0f}% full (at or over "
                                     f"{opt.disk_threshold_percent:g}%)"))
        state = replace(state, disk_acted_at=now)
    return tuple(actions), state


def _due(value: float | None, limit: float, last: float | None, now: float,
         cooldown_s: float) -> bool:
    """Over the limit, and the last action on it is at least cooldown_s old."""
    return value is not None and value >= limit and (last is None or now - last >= cooldown_s)


# -- reading -------------------------------------------------------------------------



def read_sample(config: Config, *, root: Path = Path("/"), cpu_window_s: float = 1.0,
                sleep: Callable[[float], None] = time.sleep) -> Sample:
    first = read_cpu_times(root)
    sleep(cpu_window_s)
    second = read_cpu_times(root)
    cpu = cpu_usage_percent(first, second) if first and second else None
    directory = rooted(root, config.paths.state_dir)
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    st = os.statvfs(directory)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    avail = st.f_bavail * st.f_frsize
    disk = 100.0 * used / (used + avail) if used + avail else None
    env_file = rooted(root, Path(DASK_ENV_FILE))
    workers = None
    with contextlib.suppress(FileNotFoundError, ValueError):
        workers = int(parse_env(env_file.read_text())["DASK_NWORKERS"])
    return Sample(cpu, read_memory(root).used_percent, disk, workers)


def load_state(state_dir: Path) -> MonitorState:
    """What the monitor observed so far; lost or damaged (kept aside, with an event):
    it starts observing afresh."""
    found = statefile.read(STATE_SPEC, state_dir, _parse_state)
    return MonitorState() if found is None else found


def _parse_state(data: dict[str, Any]) -> MonitorState:
    state = MonitorState(**{k: data.get(k) for k in MonitorState.__dataclass_fields__})
    for name, value in asdict(state).items():
        if value is not None and (isinstance(value, bool) or
                                  not isinstance(value, (int, float))):
            raise TypeError(f"{name} {value!r} is not a number")
    return state


def save_state(state_dir: Path, state: MonitorState) -> None:
    statefile.write(STATE_SPEC, state_dir, asdict(state))


# -- acting --------------------------------------------------------------------------


@dataclass(frozen=True)
class Done:
    action: MonitorAction
    did: tuple[str, ...]  # what was done, one line each
    notes: tuple[str, ...]


def execute(actions: tuple[MonitorAction, ...], config: Config, *, root: Path = Path("/"),
            now: Callable[[], float] = time.time) -> tuple[Done, ...]:
    state_dir = rooted(root, config.paths.state_dir)
    events = EventLog(state_dir, instance_id(config))
    out = []
    for action in actions:
        if action.kind in ("reduce_dask", "restore_dask"):
            done = _set_workers(action, root)
        elif action.kind == "relieve_memory":
            done = _relieve_memory(action, config, root)
        else:
            done = _clean_disk(action, config, root, now())
        for line in done.did:
            log.warning("%s", line)
        events.record({"reduce_dask": "dask_workers_reduced",
                       "restore_dask": "dask_workers_restored",
                       "relieve_memory": "memory_relieved",
                       "clean_disk": "disk_cleaned"}[action.kind], action.reason,
                      {"done": list(done.did), "notes": list(done.notes)}, now=now())
        out.append(done)
    return tuple(out)


def _set_workers(action: MonitorAction, root: Path) -> Done:
    path = rooted(root, Path(DASK_ENV_FILE))
    text = path.read_text()
    lines = [f"DASK_NWORKERS={action.workers}" if line.startswith("DASK_NWORKERS=") else line
             for line in text.splitlines()]
    system.atomic_write_text(path, "\n".join(lines) + "\n")
    restarted, notes = restart_units(root, [DASK_UNIT])
    did = [f"Dask workers set to {action.workers} in {DASK_ENV_FILE}"]
    did += [f"restarted {unit}" for unit in restarted]
    return Done(action, tuple(did), notes)


def _relieve_memory(action: MonitorAction, config: Config, root: Path) -> Done:
    did: list[str] = []
    notes: list[str] = []
    try:
        grown = swap.run(config, "expand", lock_wait_s=5.0)
        did += [f"swap grown: {a.name} ({format_size(a.size_bytes)})" for a in grown.applied]
        if not grown.applied:
            notes.append(f"swap not grown: {grown.plan.summary}")
    except HostError as err:
        notes.append(f"swap not grown: {err.message}")
    freed = free_memory(config, root=root)
    did.append(f"freed memory: {freed.freed_bytes // 2**20} MiB more available ("
               + ", ".join(freed.steps) + ")")
    return Done(action, tuple(did), tuple(notes) + freed.notes)


def _clean_disk(action: MonitorAction, config: Config, root: Path, now: float) -> Done:
    opt = config.optimize
    did: list[str] = []
    notes: list[str] = []
    cutoff = now - opt.retention_days * 86400
    state_dir = rooted(root, config.paths.state_dir)
    # list first, then ask: a file rotated in between is one the outbox already counts
    candidates = sorted(state_dir.glob(f"{EVENTS_FILE}.*"))
    unsent = (Outbox(state_dir, instance_id=instance_id(config)).unsent_files()
              if config.heartbeat.control_url else set())
    for path in candidates:
        try:
            st = path.lstat()
        except FileNotFoundError:  # gone since the listing
            continue
        if path.name in unsent:
            notes.append(f"kept {path}: it holds events the control plane has not had yet")
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mtime < cutoff:
            path.unlink()
            did.append(f"removed {path} ({format_size(st.st_size)}, older than "
                       f"{opt.retention_days:g} days)")
    for listed in opt.cleanup_paths:
        size, problems = _empty_cache(listed, config, root)
        if size is not None:
            did.append(f"emptied {listed} ({format_size(size)}; listed in cleanup_paths)")
        notes += problems
    if not did:
        notes.append("nothing of clusterctl's to remove; list caches in [optimize] "
                     "cleanup_paths to let monitor empty them")
    return Done(action, tuple(did), tuple(notes))


def _empty_cache(listed: Path, config: Config, root: Path) -> tuple[int | None, list[str]]:
    """Remove what is in one listed cache; the bytes freed (None: left alone) and notes."""
    try:
        fd = os.open(rooted(root, listed), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as err:  # absent, not a directory, or a symlink (ELOOP)
        return None, [f"{listed}: not a directory ({err.strerror}), left alone"]
    try:
        try:  # where the open really led, whatever was swapped in since validation
            opened = Path(f"/proc/self/fd/{fd}").readlink()
        except OSError as err:
            return None, [f"{listed}: cannot tell where it leads ({err.strerror}), left alone"]
        real_root = Path(os.path.realpath(root))
        if not opened.is_relative_to(real_root):
            return None, [f"{listed} is now {opened}, left alone: outside {root}"]
        now = normal_path(f"/{opened.relative_to(real_root)}")
        refusal = cleanup_refusal(now, config, resolve=True)
        if refusal:
            return None, [f"{listed} is now {now}, left alone: {refusal}"]
        if now != normal_path(listed):  # a symlink on the way, however harmless it looks
            return None, [f"{listed} now leads to {now}, left alone; list {now} itself if "
                          "that is meant"]
        walk = _Walk(os.fstat(fd).st_dev, _mount_points(), [])
        with os.scandir(fd) as entries:
            names = [entry.name for entry in entries]
        size, problems = 0, []
        for name in names:
            try:
                size += _remove_at(fd, name, opened / name, walk)
            except (OSError, RecursionError) as err:
                problems.append(f"could not remove {listed}/{name}: "
                                f"{getattr(err, 'strerror', None) or err}")
        kept = [f"kept {listed}/{p.relative_to(opened)}: {why}" for p, why in walk.skipped]
        return size, kept + problems
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Walk:
    """What one emptying stays within: the cache's filesystem, and no mount point."""

    dev: int  # st_dev of the cache
    mounts: frozenset[str]  # every mount point, as the kernel names it
    skipped: list[tuple[Path, str]]  # (real path, why) of what was kept


def _mount_points() -> frozenset[str]:
    """The mount points in /proc/self/mountinfo (the fifth field, its octal escapes read)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    return frozenset(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)),
                            line.split()[4]) for line in lines if len(line.split()) > 4)


def _remove_at(parent_fd: int, name: str, path: Path, walk: _Walk) -> int:
    """Remove ``name`` (really ``path``) from the directory open as ``parent_fd``, without
    following any symlink (a link goes, its target stays) nor entering another filesystem
    or a mount point (kept, and said in ``walk.skipped``); the bytes of the files removed."""
    st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    if st.st_dev != walk.dev or str(path) in walk.mounts:
        walk.skipped.append((path, "another filesystem is mounted there"))
        return 0
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=parent_fd)
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
    kept = len(walk.skipped)
    try:
        with os.scandir(fd) as entries:
            names = [entry.name for entry in entries]
        size = sum(_remove_at(fd, child, path / child, walk) for child in names)
    finally:
        os.close(fd)
    if len(walk.skipped) == kept:  # else it still holds what was kept
        os.rmdir(name, dir_fd=parent_fd)
    return size


def run_once(config: Config, *, root: Path = Path("/"), cpu_window_s: float = 1.0,
             dry_run: bool = False, now: Callable[[], float] = time.time
             ) -> tuple[Sample, tuple[MonitorAction, ...], tuple[Done, ...]]:
    """One sample, one plan, and (unless dry_run) its actions; the state is kept."""
    sample = read_sample(config, root=root, cpu_window_s=cpu_window_s)
    state_dir = rooted(root, config.paths.state_dir)
    actions, state = plan_monitor(sample, load_state(state_dir), config, now())
    if dry_run:
        return sample, actions, ()
    done = execute(actions, config, root=root, now=now)
    save_state(state_dir, state)
    return sample, actions, done


def sample_dict(sample: Sample) -> dict[str, Any]:
    return asdict(sample)
