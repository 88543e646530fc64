"""What the agent knows of each GPU's XIDs: counts, the last code, an unrecovered fatal one.

A fatal XID (``clusterctl.gpu.xid.FATAL``) holds its GPU out of placement and makes
``/healthz`` unhealthy until it **clears**, which is one of:

- the GPU was seen lost (it stopped answering NVML: fell off the bus, or was reset) and
  then answering again, in the agent's samples: a reset, a re-seat, the driver back;
- the node rebooted (every GPU is reset at boot);
- an operator who dealt with the GPU (``nvidia-smi -r -i N``, with its work stopped)
  says so: ``clusterctl gpu clear-xid --gpu N`` (:func:`clear`), recorded as a
  ``gpu_xid_cleared`` event with who cleared which XID on which GPU.

An agent restart does **not** clear one: systemd restarts a crashed agent, and a crash
loop must not forget a GPU fault. The agent keeps the unrecovered ones in
``<state_dir>/gpu-xid.json`` (with the boot id), written under ``<run_dir>/gpu-xid.lock``
by the agent and by ``clear-xid`` alike; every placement (the API, ``clusterctl gpu
place``, the Python API) leaves those GPUs out. At start the agent takes this boot's
back (:class:`FileSync`); a file from an earlier boot counts for nothing; a damaged one
is set aside (START_OVER, with an event) and the journal says that fatal XIDs may have
been forgotten. The running agent looks at the file's inode, size and mtime at every GPU
step and reads it again when they changed: what ``clear-xid`` cleared (the file's
``cleared`` list: the GPU, its XID and when it was cleared) drops out of its ledger too,
unless a fatal XID came on that GPU after the clear.

Each XID is an event once; the same code on the same GPU within RECORD_AGAIN_S of the
last one recorded is only counted (a storm of application faults), and the next event
says how many were seen (``count``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clusterctl import locks
from clusterctl.errors import ClusterctlError, HostError, UsageError
from clusterctl.gpu.xid import XidInfo, describe
from clusterctl.host.nvml import GpuSample
from clusterctl.host.nvml_events import XidEvent
from clusterctl.host.procfs import read_boot_id
from clusterctl.system import statefile
from clusterctl.units import iso_utc

log = logging.getLogger("clusterctl.gpu")
RECORD_AGAIN_S = 10.0
MAX_CODES = 32  # distinct codes counted per GPU; a driver inventing more: counted as OTHER
OTHER = -1  # the code they are counted under ("other" in /metrics)
FILE_NAME = "gpu-xid.json"
SPEC = statefile.StateFile(FILE_NAME, "the GPUs with an unrecovered fatal XID",
                           statefile.Policy.START_OVER)
LOCK_NAME = "gpu-xid.lock"  # under the run dir
CLEARS = ("it also clears when the GPU was lost and answers again, or at a reboot; an "
          "agent restart does not clear it")


def gpu_key(index: int, uuid: str | None) -> str:
    """How a GPU is known here: its UUID, else its index."""
    return uuid or f"index-{index}"


@dataclass(frozen=True)
class Fatal:
    """A fatal XID its GPU has not recovered from."""

    index: int
    uuid: str | None
    xid: int
    at: float  # time.time()

    @property
    def info(self) -> XidInfo:
        return describe(self.xid)

    @property
    def problem(self) -> str:
        return (f"GPU {self.index} had fatal XID {self.xid} at {iso_utc(self.at)} "
                f"({self.info.meaning})")

    @property
    def fix(self) -> str:
        return (f"{self.info.action_for(self.index)}; then clusterctl gpu clear-xid "
                f"--gpu {self.index} ({CLEARS})")

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "uuid": self.uuid, "xid": self.xid, "at": self.at}


@dataclass(frozen=True)
class GpuXids:
    index: int
    uuid: str | None
    last: int | None  # the last code seen
    counts: tuple[tuple[int, int], ...]  # (code, times seen), by code
    fatal: Fatal | None  # unrecovered

    @property
    def count(self) -> int:
        return sum(n for _, n in self.counts)


@dataclass(frozen=True)
class XidStatus:
    """Every GPU's XIDs at one moment, for the API, /metrics and heartbeats."""

    gpus: tuple[GpuXids, ...] = ()
    watched: frozenset[int] = frozenset()  # GPU indices whose XIDs are watched
    problem: str | None = None  # why XIDs are not watched (on some GPUs)

    def of(self, index: int, uuid: str | None) -> GpuXids | None:
        key = gpu_key(index, uuid)
        return next((g for g in self.gpus if gpu_key(g.index, g.uuid) == key), None)

    def unrecovered(self) -> dict[str, Fatal]:
        """GPU key -> its unrecovered fatal XID."""
        return {gpu_key(g.index, g.uuid): g.fatal for g in self.gpus if g.fatal is not None}


@dataclass(frozen=True)
class Noted:
    """What one XID changed."""

    event: XidEvent
    info: XidInfo
    count: int  # this code on this GPU, since the agent started
    record: bool  # an event to record (not within RECORD_AGAIN_S of the last one)
    newly_fatal: bool  # the GPU is now held out of placement (it was not before)


@dataclass
class _Gpu:
    index: int
    uuid: str | None
    last: int | None = None
    counts: dict[int, int] | None = None
    fatal: Fatal | None = None
    recorded_at: dict[int, float] | None = None  # code -> when last recorded


class XidLedger:
    """Thread-safe: the XID thread notes, the GPU step observes, readers take status."""

    def __init__(self, record_again_s: float = RECORD_AGAIN_S) -> None:
        self.record_again_s = record_again_s
        self._lock = threading.Lock()
        self._gpus: dict[str, _Gpu] = {}
        self._lost: set[str] = set()  # GPUs seen lost since their last answer

    def note(self, event: XidEvent) -> Noted:
        info = describe(event.xid)
        with self._lock:
            key = gpu_key(event.index, event.uuid)
            gpu = self._gpus.setdefault(key, _Gpu(event.index, event.uuid, counts={},
                                                  recorded_at={}))
            assert gpu.counts is not None and gpu.recorded_at is not None
            gpu.last = event.xid
            slot = event.xid if event.xid in gpu.counts or len(gpu.counts) < MAX_CODES \
                else OTHER  # events and series stay bounded whatever the driver says
            count = gpu.counts[slot] = gpu.counts.get(slot, 0) + 1
            last_recorded = gpu.recorded_at.get(slot)
            record = (last_recorded is None or not
                      0 <= event.at - last_recorded < self.record_again_s)
            if record:
                gpu.recorded_at[slot] = event.at
            newly = info.fatal and gpu.fatal is None
            if info.fatal:
                gpu.fatal = Fatal(event.index, event.uuid, event.xid, event.at)
        return Noted(event, info, count, record, newly)

    def observe(self, samples: Iterable[GpuSample]) -> list[Fatal]:
        """One GPU sample: the fatal XIDs of GPUs that were lost and answer again, cleared
        (the GPU recovered)."""
        recovered = []
        with self._lock:
            for sample in samples:
                key = gpu_key(sample.index, sample.uuid)
                if sample.lost:
                    self._lost.add(key)
                    continue
                if key not in self._lost:
                    continue
                self._lost.discard(key)
                gpu = self._gpus.get(key)
                if gpu is not None and gpu.fatal is not None:
                    recovered.append(gpu.fatal)
                    gpu.fatal = None
        return recovered

    def adopt(self, fatal: Iterable[Fatal]) -> list[Fatal]:
        """What an earlier run of the agent held (this boot's file, at start): held again
        on every GPU that holds none yet. Those taken."""
        taken = []
        with self._lock:
            for f in fatal:
                gpu = self._gpus.setdefault(gpu_key(f.index, f.uuid),
                                            _Gpu(f.index, f.uuid, counts={}, recorded_at={}))
                if gpu.fatal is None:
                    gpu.fatal = f
                    taken.append(f)
        return taken

    def clear(self, cleared: Iterable[Cleared]) -> list[Fatal]:
        """What an operator cleared (``clusterctl gpu clear-xid``): a GPU's fatal XID
        dropped when it is the one cleared or came before the clear; one that came after
        stays. Those dropped."""
        dropped = []
        with self._lock:
            for c in cleared:
                gpu = self._gpus.get(gpu_key(c.index, c.uuid))
                if gpu is None or gpu.fatal is None:
                    continue
                if gpu.fatal.at <= c.cleared_at or gpu.fatal == c.fatal:
                    dropped.append(gpu.fatal)
                    gpu.fatal = None
        return dropped

    def status(self, watched: frozenset[int] = frozenset(), problem: str | None = None
               ) -> XidStatus:
        with self._lock:
            gpus = tuple(GpuXids(g.index, g.uuid, g.last,
                                 tuple(sorted((g.counts or {}).items())), g.fatal)
                         for g in self._gpus.values())
        return XidStatus(tuple(sorted(gpus, key=lambda g: g.index)), watched, problem)

    def unrecovered(self) -> dict[str, Fatal]:
        return self.status().unrecovered()


# -- the file placement reads -------------------------------------------------------


@dataclass(frozen=True)
class Cleared:
    """A fatal XID an operator cleared (``clusterctl gpu clear-xid``)."""

    fatal: Fatal
    cleared_at: float  # time.time()
    by: str

    @property
    def index(self) -> int:
        return self.fatal.index

    @property
    def uuid(self) -> str | None:
        return self.fatal.uuid

    def as_dict(self) -> dict[str, Any]:
        return {**self.fatal.as_dict(), "cleared_at": self.cleared_at, "by": self.by}


@dataclass(frozen=True)
class OnDisk:
    """gpu-xid.json as read."""

    boot_id: str | None
    fatal: tuple[Fatal, ...]  # unrecovered
    cleared: tuple[Cleared, ...] = ()  # by an operator, for the running agent to follow

    def of_boot(self, boot_id: str | None) -> bool:
        return self.boot_id is not None and self.boot_id == boot_id


def save(state_dir: Path, unrecovered: Iterable[Fatal], *, root: Path = Path("/"),
         cleared: Iterable[Cleared] = ()) -> None:
    """The unrecovered fatal XIDs on disk, with this boot's id (and the clears the agent
    has yet to follow); the file gone when there is neither. The caller holds the lock
    (:func:`locked`)."""
    found = [f.as_dict() for f in unrecovered]
    gone = [c.as_dict() for c in cleared]
    if not found and not gone:
        statefile.remove(SPEC, state_dir)
        return
    statefile.write(SPEC, state_dir, {"boot_id": read_boot_id(root), "gpus": found,
                                      **({"cleared": gone} if gone else {})})


def locked(run_dir: Path, *, wait_s: float = 10.0) -> AbstractContextManager[None]:
    """Held while gpu-xid.json is read and written (the agent, ``clear-xid``)."""
    return locks.exclusive(run_dir / LOCK_NAME, what=f"change of {FILE_NAME}", wait_s=wait_s)


def read(state_dir: Path, *, record: statefile.Recorder | None = None,
         now: float | None = None) -> OnDisk | None:
    """The file, whatever its boot; None when there is none, or it was damaged: set aside
    with an event (``record``, by default the state dir's event log), and the journal says
    that fatal XIDs may have been forgotten. HostError when it cannot be read."""
    recorder = record or statefile.events_to(state_dir)
    damaged: list[str] = []

    def noted(event_type: str, reason: str, details: dict[str, Any], *, now: float) -> None:
        damaged.append(reason)
        recorder(event_type, reason, details, now=now)

    found = statefile.read(SPEC, state_dir, _parse, record=noted, now=now)
    if damaged:
        log.warning("%s was damaged and set aside: the fatal XIDs it held may have been "
                    "forgotten; check the GPUs (clusterctl gpu health, journalctl -k | grep "
                    "Xid) and the gpu_xid events", state_dir / FILE_NAME)
    return found


Signature = tuple[int, int, int, int]  # inode, size, mtime and ctime (ns)


def signature(state_dir: Path) -> Signature | None:
    """What tells one version of the file from another, from one stat; None: no file."""
    path = state_dir / FILE_NAME
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise HostError(f"cannot look at {SPEC.what} {path}: {err.strerror}") from err
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def clear(state_dir: Path, run_dir: Path, *, gpu: int | None, every: bool, by: str,
          now: float, root: Path = Path("/"), record: statefile.Recorder | None = None,
          wait_s: float = 10.0) -> list[Fatal]:
    """``clusterctl gpu clear-xid``: the unrecovered fatal XID of GPU ``gpu`` (of every GPU:
    ``every``; of the one GPU that has one when neither is given) taken out of this boot's
    file under its lock, each a ``gpu_xid_cleared`` event (``by``: who); the running agent
    follows within a GPU step. Those cleared; none when that GPU has none. UsageError,
    nothing changed, when neither is given and several GPUs have one."""
    if every and gpu is not None:
        raise UsageError("--gpu N and --all: give one of them")
    recorder = record or statefile.events_to(state_dir)
    with locked(run_dir, wait_s=wait_s):
        found = read(state_dir, record=recorder, now=now)
        if found is None or not found.of_boot(read_boot_id(root)):
            return []
        held = sorted(found.fatal, key=lambda f: f.index)
        if gpu is not None:
            chosen = [f for f in held if f.index == gpu]
        elif every or len(held) <= 1:
            chosen = held
        else:
            which = ", ".join(f"GPU {f.index} (XID {f.xid})" for f in held)
            raise UsageError(f"{len(held)} GPUs have an unrecovered fatal XID: {which}; "
                             "say which with --gpu N, or clear them all with --all")
        if not chosen:
            return []
        done = {gpu_key(f.index, f.uuid): Cleared(f, now, by) for f in chosen}
        earlier = [c for c in found.cleared if gpu_key(c.index, c.uuid) not in done]
        save(state_dir, [f for f in held if f not in chosen], root=root,
             cleared=[*earlier, *done.values()])
    for f in chosen:
        reason = (f"fatal XID {f.xid} on GPU {f.index} cleared by {by} (clusterctl gpu "
                  "clear-xid): placement on it again")
        try:
            recorder("gpu_xid_cleared", reason, {
                "gpu": f.index, "uuid": f.uuid, "xid": f.xid, "xid_at": iso_utc(f.at),
                "by": by}, now=now)
        except (ClusterctlError, OSError) as err:  # cleared all the same: say so
            log.warning("%s; the event could not be recorded: %s", reason,
                        err.one_line() if isinstance(err, ClusterctlError) else err)
    return chosen


@dataclass(frozen=True)
class Synced:
    """What one look at the file changed in the agent's ledger."""

    adopted: tuple[Fatal, ...] = ()  # this boot's, from an earlier run (at start)
    cleared: tuple[tuple[Fatal, Cleared], ...] = ()  # (what was held, the clear)


class FileSync:
    """The agent's side of gpu-xid.json (thread-safe): :meth:`sync` at every GPU step
    (one stat; the file read again only when its signature changed) and, with ``write``,
    whenever the ledger's fatal XIDs changed. The first sync takes this boot's fatal XIDs
    back; each later read drops those an operator cleared. The file is rewritten under
    the lock when the ledger differs from it (clears followed, a file from another boot,
    one removed or set aside while fatal XIDs are held)."""

    def __init__(self, ledger: XidLedger, state_dir: Path, run_dir: Path, *,
                 root: Path = Path("/"), record: statefile.Recorder | None = None,
                 wait_s: float = 2.0) -> None:
        self.ledger = ledger
        self.state_dir = state_dir
        self.run_dir = run_dir
        self.root = root
        self.record = record
        self.wait_s = wait_s
        self._lock = threading.Lock()
        self._started = False
        self._seen: Signature | None = None  # as the agent last read or wrote it
        self._unsaved = False  # a write failed (a full disk): tried again at the next sync

    def sync(self, *, write: bool = False, now: float | None = None) -> Synced:
        with self._lock:
            if (self._started and not write and not self._unsaved
                    and signature(self.state_dir) == self._seen):
                return Synced()
            with locked(self.run_dir, wait_s=self.wait_s):
                return self._synced(write, now)

    def _synced(self, write: bool, now: float | None) -> Synced:
        adopted: list[Fatal] = []
        cleared: list[tuple[Fatal, Cleared]] = []
        seen = signature(self.state_dir)
        stale = False  # the file says other than the ledger
        if not self._started or seen != self._seen:
            found = None if seen is None else read(self.state_dir, record=self.record,
                                                   now=now)
            on_disk: set[Fatal] = set()
            if found is not None and found.of_boot(read_boot_id(self.root)):
                if not self._started:
                    adopted = self.ledger.adopt(found.fatal)
                for c in found.cleared:
                    cleared += [(f, c) for f in self.ledger.clear([c])]
                on_disk = set(found.fatal)
                stale = bool(found.cleared)
            elif found is not None:
                stale = True  # another boot's
            stale = stale or on_disk != set(self.ledger.unrecovered().values())
        if write or stale or self._unsaved:
            self._unsaved = True
            save(self.state_dir, self.ledger.unrecovered().values(), root=self.root)
            self._unsaved = False
        self._started = True
        self._seen = signature(self.state_dir)
        return Synced(tuple(adopted), tuple(cleared))


def load(state_dir: Path, *, root: Path = Path("/")) -> dict[str, Fatal]:
    """GPU key -> its unrecovered fatal XID, as the agent last wrote them in this boot;
    nothing when there is no file, it is from an earlier boot, or it is damaged (it stays
    for the agent, its owner, to set aside)."""
    found = statefile.peek(SPEC, state_dir, _parse)
    if found is None or not found.of_boot(read_boot_id(root)):
        return {}
    return {gpu_key(f.index, f.uuid): f for f in found.fatal}


def _fatal(g: Mapping[str, Any]) -> Fatal:
    return Fatal(_count(g["index"]), None if g["uuid"] is None else str(g["uuid"]),
                 _count(g["xid"]), _time(g["at"]))


MAX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z: the last time iso_utc can write


def _count(value: object) -> int:
    """A GPU index or an XID code: a non-negative integer (ValueError for damage)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"not a non-negative integer: {value!r}")
    return value


def _time(value: object) -> float:
    """A Unix time iso_utc can write (NaN, Infinity, 1e300 are damage, not a crash)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 <= value <= MAX_TIME:  # NaN fails too
        raise ValueError(f"not a time: {value!r}")
    return float(value)


def _parse(data: Mapping[str, Any]) -> OnDisk:
    gpus, cleared = data["gpus"], data.get("cleared", [])
    if not isinstance(gpus, list) or not isinstance(cleared, list):
        raise TypeError("gpus or cleared is not a list")
    boot = data.get("boot_id")
    return OnDisk(None if boot is None else str(boot), tuple(_fatal(g) for g in gpus),
                  tuple(Cleared(_fatal(c), _time(c["cleared_at"]), str(c["by"]))
                        for c in cleared))
