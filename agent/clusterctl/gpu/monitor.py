"""The GPU monitor: sample, state (with hysteresis), history, callbacks, throttle.

One ``step()`` is one sampling cycle; ``start()`` runs it every ``monitor_interval``
on a background thread; ``stop()`` ends the thread. The agent and `gpu watch` drive
it; the Python API (``clusterctl.gpu.manager``) wraps it.

Power limits have one owner: the agent's monitor (``owns_power_records``), which
gives back every saved limit (``gpu.power``) at start (a crashed run's) and at
stop. A monitor that acts without owning the records (the Python API, when asked
to act) gives back only the limits it lowered itself; a ``plan_only`` monitor
(the default of the Python API, and `gpu watch`) never sets a limit nor writes a
record.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from clusterctl.config import Config, instance_id
from clusterctl.errors import ClusterctlError
from clusterctl.events.log import EventLog
from clusterctl.gpu import power
from clusterctl.gpu.history import History, Point
from clusterctl.gpu.states import GpuState, next_state
from clusterctl.gpu.throttle import Decision, Throttled, decide
from clusterctl.host.nvml import GpuSample, GpuSnapshot, Nvml
from clusterctl.system import statefile

log = logging.getLogger("clusterctl.gpu")
PROCESSES_EVERY = 10  # process lists are a slow read: every 10th sample
HISTORY_FILE = "gpu-history.json"
# world-readable: temperatures and utilisation any user can see with nvidia-smi
HISTORY_SPEC = statefile.StateFile(HISTORY_FILE, "the GPU history", statefile.Policy.START_OVER,
                                   mode=0o644, durable=False, pretty=False, events_here=False)
CallbackKind = Literal["normal", "throttle", "critical"]
_KIND = {GpuState.OPTIMAL: "normal", GpuState.NORMAL: "normal",
         GpuState.THROTTLED: "throttle", GpuState.CRITICAL: "critical"}


@dataclass(frozen=True)
class GpuView:
    """One GPU as the monitor sees it: the sample, its state and the throttle's view."""

    sample: GpuSample
    state: GpuState
    decision: Decision | None
    throttled: bool  # clusterctl holds its power limit below the original

    @property
    def temperature_celsius(self) -> int | None:  # the callback argument's names
        return self.sample.temperature_c

    @property
    def memory_percent(self) -> float | None:
        return self.sample.memory_used_percent

    @property
    def gpu_id(self) -> int:
        return self.sample.index


class GpuMonitor:
    def __init__(self, config: Config, nvml: Nvml, *, plan_only: bool = False,
                 owns_power_records: bool = True,
                 clock: Callable[[], float] = time.time, write_history: bool = False,
                 record_events: bool = True) -> None:
        self.config = config
        self.nvml = nvml
        self.plan_only = plan_only
        self.owns_power_records = owns_power_records and not plan_only
        self.clock = clock
        self.write_history = write_history
        self.record_events = record_events  # False for viewers: the agent records them
        self.state_dir = config.paths.state_dir
        self.histories: dict[str, History] = {}
        self.states: dict[str, GpuState] = {}
        self._notified: dict[str, GpuState] = {}  # the state callbacks last heard of
        self.snapshot: GpuSnapshot | None = None
        self.views: tuple[GpuView, ...] = ()
        self.callbacks: dict[str, list[Callable[[GpuView], None]]] = {
            "normal": [], "throttle": [], "critical": []}
        self._records: dict[str, Throttled] | None = None
        # why the saved power limits cannot be read now (None: they can); no limit changes
        self.originals_problem: str | None = None
        self._lowered: dict[str, Throttled] = {}  # records this monitor began, as it left them
        self._count = 0
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- one cycle -------------------------------------------------------------------

    def records(self) -> dict[str, Throttled]:
        """The saved power-limit records. Originals that cannot be read (a damaged record, a
        move from the old file that cannot be settled) never stop sampling, and are never
        set aside nor written over: while they cannot be read no limit is changed (never a
        lowering without its original on record), ``originals_problem`` says why, the log
        says it once, and they are read again at every sample, so a fixed record is taken
        up without a restart."""
        if self._records is None:
            try:
                self._records = power.load(self.state_dir)
            except ClusterctlError as err:
                if self.originals_problem is None:
                    log.error("%s; no GPU power limit is changed until it can be read",
                              err.one_line())
                self.originals_problem = err.one_line()
                self._records = {}
            else:
                if self.originals_problem is not None:
                    log.warning("the saved GPU power limits can be read again")
                self.originals_problem = None
        return self._records

    def step(self) -> tuple[GpuView, ...]:
        with self._lock:
            now = self.clock()
            if not self.owns_power_records or self.originals_problem is not None:
                self._records = None  # the owner changes them, or they were unreadable
            snapshot = self.nvml.sample(processes=self._count % PROCESSES_EVERY == 0, now=now)
            self._count += 1
            self.snapshot = snapshot
            views = []
            for gpu in snapshot.gpus:
                views.append(self._one(gpu, now))
            self.views = tuple(views)
            if self.write_history:
                self._save_history()
            return self.views

    def _one(self, gpu: GpuSample, now: float) -> GpuView:
        key = gpu.uuid or f"index-{gpu.index}"
        history = self.histories.setdefault(key, History(self.config.gpu.history_size))
        previous = self.states.get(key)
        if gpu.lost:
            state = GpuState.CRITICAL
        else:
            state = next_state(previous, gpu.temperature_c, gpu.memory_used_percent,
                               self.config.gpu)
            history.add(Point(now, gpu.temperature_c, gpu.utilization_gpu_percent,
                              gpu.memory_used_percent))
        self.states[key] = state
        if state is not previous and previous is not None:
            self._changed(gpu, previous, state, now)
        decision = None
        records = self.records()
        if not gpu.lost:
            decision = decide(gpu, state, records.get(key), self.config.gpu, now)
            if (self.config.gpu.throttle_enabled and not self.plan_only
                    and self.originals_problem is None):
                try:
                    self._records = power.apply(decision, self.nvml, self.state_dir, records)
                except statefile.StateRefused:
                    self._records = None  # damaged since it was read: read (and say) it
                    self.records()
                except ClusterctlError as err:
                    log.error("GPU %d: %s", gpu.index, err.one_line())
                self._note_lowered(key, before=records.get(key))
                if decision.move != "hold":
                    self._event("gpu_power_limited", decision.reason, gpu, now,
                                move=decision.move, limit_w=decision.limit_w)
        view = GpuView(gpu, state, decision, key in self.records())
        if state is not self._notified.get(key):
            self._notified[key] = state
            for fn in self.callbacks[_KIND[state]]:
                try:
                    fn(view)
                except Exception:  # a caller's callback must not stop the monitor
                    log.exception("a GPU %s callback failed", _KIND[state])
        return view

    def _changed(self, gpu: GpuSample, before: GpuState, after: GpuState, now: float) -> None:
        if not self.record_events:
            return
        level = logging.WARNING if after.rank > before.rank else logging.INFO
        log.log(level, "GPU %d: %s -> %s (%s C, VRAM %s%%)", gpu.index, before.value,
                after.value, gpu.temperature_c,
                None if gpu.memory_used_percent is None else round(gpu.memory_used_percent))
        self._event("gpu_state_changed", f"{before.value} -> {after.value}", gpu, now,
                    state_from=before.value, state_to=after.value,
                    speed_multiplier=after.speed_multiplier)

    def _event(self, kind: str, reason: str, gpu: GpuSample, now: float, **extra: object
               ) -> None:
        if not self.record_events:
            return
        with contextlib.suppress(ClusterctlError):  # an unwritable log must not stop sampling
            EventLog(self.state_dir, instance_id(self.config)).record(
                kind, reason, {"gpu": gpu.index, "uuid": gpu.uuid,
                               "temperature_c": gpu.temperature_c,
                               "memory_used_percent": gpu.memory_used_percent, **extra},
                now=now)

    def _save_history(self) -> None:
        data = {key: [[p.at, p.temperature_c, p.utilization_percent, p.memory_used_percent]
                      for p in h.points()] for key, h in self.histories.items()}
        with contextlib.suppress(ClusterctlError, OSError):
            statefile.write(HISTORY_SPEC, self.config.paths.run_dir, data)

    # -- the thread ------------------------------------------------------------------

    def start(self) -> None:
        """Give back limits a crashed run left lowered, then sample in the background."""
        if self._thread is not None:
            return
        self._notified.clear()  # callbacks hear every GPU's state at the first sample
        self.restore()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # keep monitoring through a bad sample
                log.exception("GPU sampling failed")
            self._stop.wait(self.config.gpu.monitor_interval_s)

    def stop(self) -> None:
        """End the thread and give back the power limits this monitor answers for: every
        record for the owner, only those it lowered itself for any other; unless
        ``[gpu] restore_on_stop`` is false, when they stay as they are, on record, for the
        next start to give back (as after a crash)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=30)
            self._thread = None
        if self.config.gpu.restore_on_stop:
            self.restore()
        elif not self.plan_only and (self._lowered or (self.owns_power_records
                                                        and self.records())):
            log.warning("power limits left as they are at stop ([gpu] restore_on_stop = "
                        "false); the originals stay on record and the next start gives "
                        "them back")

    def restore(self) -> list[str]:
        """Give back what this monitor answers for (see :meth:`stop`); what was done."""
        with self._lock:
            if self.plan_only:
                return []
            if not self.owns_power_records:
                done = self._give_back_own()
            else:
                if not self.records():  # none, or unreadable (said once by records())
                    return []
                snapshot = self.nvml.sample()
                done = power.restore_all(self.nvml, self.state_dir,
                                         {g.uuid: g.index for g in snapshot.gpus if g.uuid})
                self._records = None
            for line in done:
                log.warning("%s", line)
            return done

    def _note_lowered(self, key: str, *, before: Throttled | None) -> None:
        """Keep track of the records this monitor began (none before its own change)."""
        after = (self._records or {}).get(key)
        if after is None:
            self._lowered.pop(key, None)
        elif before is None or key in self._lowered:
            self._lowered[key] = after

    def _give_back_own(self) -> list[str]:
        """The limits this monitor lowered, back to their originals; a record another
        writer has changed since (or given back) is left to it."""
        if not self._lowered:
            return []
        try:
            records = power.load(self.state_dir)
        except ClusterctlError as err:
            return [f"{err.one_line()}: no power limit given back"]
        where = {g.uuid or f"index-{g.index}": g.index for g in self.nvml.sample().gpus}
        done = []
        for key, mine in sorted(self._lowered.items()):
            record = records.get(key)
            if record != mine:
                done.append(f"{key}: its power record changed since this process lowered "
                            "it; left to the process that changed it")
                continue
            if key not in where:
                done.append(f"{key}: not present now; its original "
                            f"{mine.original_limit_w:.0f} W kept on record")
                continue
            back = Decision(key, where[key], "restore", mine.original_limit_w,
                            "given back by the process that lowered it", None)
            try:
                records = power.apply(back, self.nvml, self.state_dir, records)
            except ClusterctlError as err:
                done.append(f"GPU {where[key]}: {err.one_line()}")
                continue
            done.append(f"GPU {where[key]}: power limit back to {mine.original_limit_w:.0f} W")
        self._lowered.clear()
        self._records = None
        return done

    def with_config(self, config: Config) -> None:
        with self._lock:
            self.config = config
            for key, history in list(self.histories.items()):
                fresh = History(config.gpu.history_size)
                for point in history.points():
                    fresh.add(point)
                self.histories[key] = fresh


def load_history(run_dir: Path, size: int, *, record: statefile.Recorder | None = None
                 ) -> dict[str, History]:
    """The ring a running monitor keeps in ``<run_dir>/gpu-history.json``; none when there
    is none or it was damaged (kept aside; the monitor writes it whole again next sample).
    The run dir has no event log: ``record`` says where the set-aside event goes."""
    def parse(data: dict[str, Any]) -> dict[str, History]:
        out = {}
        for key, points in data.items():
            history = History(size)
            for at, temp, util, mem in points:
                history.add(Point(at, temp, util, mem))
            out[key] = history
        return out
    return statefile.read(HISTORY_SPEC, run_dir, parse, record=record) or {}


def view_now(sample: GpuSample, config: Config, record: Throttled | None, now: float
             ) -> GpuView:
    """A one-off view (no history): the table's state, and what the throttle would do."""
    state = GpuState.CRITICAL if sample.lost else next_state(
        None, sample.temperature_c, sample.memory_used_percent, config.gpu)
    decision = None if sample.lost else decide(sample, state, record, config.gpu, now)
    return GpuView(sample, state, decision, record is not None)
