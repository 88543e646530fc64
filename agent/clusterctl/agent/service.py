"""The agent: one process, a few threads that never wait on each other.

- GPU: a sample every ``[gpu] monitor_interval`` (states, history, throttle).
- Delivery: a heartbeat every ``[heartbeat] interval`` (or the answer's
  ``next_interval_s``, jittered), the answer's commands run and acknowledged
  (``commands.py``), then the outbox drained, with backoff when the control plane is down.
- Swap policy: swap use sampled twice a second (how fast it grows); a `swap auto`
  step (same lock and code as the timer's) as soon as swap is running out (under
  ``[swap] free_threshold``, or gone before a new file could be online at the rate it
  grows), as soon as the PSI trigger on /proc/pressure/memory fires (at most every few
  seconds, acting on what fired), and, run as clusterctl-agent.service, every
  ``[swap] check_interval``: the agent owns the policy then, and the swap timer's
  service stands down. Run any other way (by hand, in tests), the timer keeps the
  steady steps. A reload that changes ``[swap] pressure_threshold`` re-arms the trigger.
- XID: NVML's XID events, waited on ``XID_WAIT_S`` at a time (``xid_step``): each an
  event, a fatal one held against its GPU (``/healthz``, placement) until it recovers or
  an operator clears it; held across restarts within a boot (``xid_ledger.FileSync``).
- API: the local HTTP API and /metrics, which read only ``Agent.snapshot()``: one
  immutable view of the agent, never its insides.
- Main: READY=1 after the first GPU cycle, STATUS lines, WATCHDOG=1 while the loops
  make progress; SIGTERM stops (power limits given back, outbox on disk), SIGHUP
  reloads a validated config.

Each loop's iteration is a step function given ``now`` (time.monotonic()) that says
when it is due again: ``gpu_step``, ``delivery_step``, ``swap_tick``. The threads call
them; ``Agent.tick(now)`` runs every due one once, on the caller's thread, with no
thread started (tests drive it with a clock of their own).

Nothing a loop meets ends it: any exception is counted in /metrics
(``clusterctl_loop_errors_total{loop=...}``), logged once per distinct cause (again
only after the loop has succeeded in between), and the loop goes on. A loop thread
that died, or one stuck past its limit, holds the watchdog pings back and is named
in STATUS, so systemd restarts the agent; the pressure loop that found no PSI is
"off", not dead. A reload never ends the agent, and the main loop always ends in
``stop()`` (power limits given back).
"""

from __future__ import annotations

import logging
import os
import random
import select
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import sdnotify

from clusterctl import config as cfg
from clusterctl.agent import commands
from clusterctl.agent.api import serve
from clusterctl.agent.control import TOTAL_TIMEOUT_S, ControlClient
from clusterctl.agent.heartbeat import Delivery, DeliveryState, memory_summaries, node_payload
from clusterctl.agent.metrics import Metrics, write_textfile
from clusterctl.errors import ClusterctlError
from clusterctl.events.log import EventLog
from clusterctl.events.outbox import Outbox
from clusterctl.gpu import energy as gpu_energy
from clusterctl.gpu import placement, xid_ledger
from clusterctl.gpu.energy_store import EnergyKeeper
from clusterctl.gpu.history import Point
from clusterctl.gpu.monitor import GpuMonitor, GpuView
from clusterctl.gpu.shapes import fleet_metrics
from clusterctl.gpu.xid_ledger import XidLedger, XidStatus
from clusterctl.hibernate import actions
from clusterctl.hibernate.controller import Hibernation
from clusterctl.hibernate.idle import IdleState
from clusterctl.host.cgroups import CgroupSignal, CgroupWatch
from clusterctl.host.nvml import GpuSnapshot, Nvml
from clusterctl.host.nvml_events import XidEvent, XidWatcher
from clusterctl.host.procfs import read_memory
from clusterctl.host.psi import PressureTrigger
from clusterctl.swap import executor as swap
from clusterctl.swap import ledger as swap_ledger
from clusterctl.swap.policy import (
    HORIZON_STEP_S,
    ONLINE_S_UNMEASURED,
    RATE_WINDOW_S,
    Signal,
    SwapTrend,
    swap_rate,
    swap_shortage,
)
from clusterctl.system import statefile
from clusterctl.system.systemd import AGENT_UNIT, own_unit

log = logging.getLogger("clusterctl.agent")
SWAP_STEP_MIN_GAP_S = 5.0  # a pressure storm runs at most one swap step this often
SWAP_SAMPLE_S = 0.5  # swap use is sampled this often, for its rate and shortage
SWAP_SHORT_GAP_S = HORIZON_STEP_S  # swap running out: a step at most this often
# (SWAP_STEP_MIN_GAP_S once a step could not grow)
CANNOT_HELP_AGAIN_S = 600.0  # a cgroup swap cannot help is said again after this
PENDING_SIGNALS_KEPT = 64  # signals waiting for the next step, the latest kept
CANNOT_HELP_KEPT = 256  # cgroups remembered as said, beyond which old ones are forgotten
MAIN_PERIOD_S = 2.0  # STATUS and WATCHDOG=1 this often
PRESSURE_RETRY_S = 5.0  # after an unexpected failure, the PSI trigger is armed again
# a loop whose last iteration is older than this stops the watchdog pings
GPU_STALL_MIN_S = 30.0  # or 10 sampling intervals, whichever is longer
DELIVERY_STALL_MARGIN_S = 60.0  # beyond the interval and two requests' timeouts
BACKLOG_PASS_S = 1.0  # between delivery passes while a backlog drains
MAX_CAUSES_SAID = 8  # distinct failures of one loop logged until it works again
PRESSURE_STALL_S = 10.0  # it wakes every SWAP_SAMPLE_S
SWAP_STEP_STALL_S = 900.0  # a swap step may write a swap file of many GiB
XID_WAIT_S = 0.5  # the XID thread's wait on NVML's event set: a stop waits about this long
XID_STALL_S = 60.0  # an XID wait (or re-registration) not back by then: the loop is stuck
LOOPS = {"gpu": "GPU sampling", "hibernate": "idle detection",
         "textfile": "the metrics textfile", "metrics": "rendering /metrics",
         "delivery": "heartbeat/event delivery",
         "pressure": "the memory pressure trigger", "api": "the local API",
         "main": "the main loop", "xid": "watching XID errors",
         "xid_file": "keeping the fatal XIDs in gpu-xid.json"}


class Notifier:
    """sd_notify, or nothing when not under systemd."""

    def __init__(self) -> None:
        self._n: Any = None
        if os.environ.get("NOTIFY_SOCKET"):
            self._n = sdnotify.SystemdNotifier()

    def __call__(self, message: str) -> None:
        if self._n is not None:
            self._n.notify(message)


@dataclass
class Progress:
    """When each loop last went round (time.monotonic()), for the watchdog."""

    gpu_at: float | None = None
    delivery_at: float | None = None
    pressure_at: float | None = None
    xid_at: float | None = None
    pressure_off: str | None = None  # why the trigger is off (no PSI): not a dead loop
    swap_step_since: float | None = None  # a swap step on pressure is running
    swap_steps: int = 0
    last_swap: str | None = None


@dataclass(frozen=True)
class GpuReading:
    """One GPU cycle as it ended: the sample and the views made from it, together."""

    snapshot: GpuSnapshot | None = None
    views: tuple[GpuView, ...] = ()
    energy: gpu_energy.EnergyLedger | None = None  # the energy accounting after it


NO_READING = GpuReading()


@dataclass(frozen=True)
class AgentSnapshot:
    """The agent at one moment, for the API, /metrics and the textfile: what they read,
    copied, so that a reader never meets a loop's half-made change."""

    config: cfg.Config
    gpu: GpuSnapshot | None  # the last GPU sample (None before the first)
    views: tuple[GpuView, ...]  # made from that sample
    histories: Mapping[str, tuple[Point, ...]]  # per GPU key; empty unless asked for
    memory: Mapping[str, Any] | None  # as heartbeats carry them; None: see unreadable
    swap: Mapping[str, Any] | None
    delivery: DeliveryState | None  # None while heartbeats are off
    progress: Progress
    loop_errors: Mapping[str, int]
    problems: tuple[str, ...]  # loops that died or are stuck (the watchdog's view)
    hibernation: IdleState
    originals_problem: str | None  # why the saved GPU power limits cannot be read
    outbox_unsent_bytes: int | None  # 0 without a control plane; None: see unreadable
    outbox_skipped_lines: int
    started_at: float  # time.time() when the agent started
    taken_at: float  # time.time() of this snapshot
    gpu_metrics: Mapping[str, Any] = field(default_factory=dict)  # GET gpu-metrics' body
    energy: gpu_energy.EnergyLedger | None = None  # per GPU, busy and idle, since boot
    unreadable: str | None = None  # why /proc/meminfo or the outbox could not be read
    xids: XidStatus = field(default_factory=XidStatus)  # every GPU's XIDs (xid_ledger)

    def gpu_view(self, index: int) -> GpuView | None:
        return next((v for v in self.views if v.sample.index == index), None)


def restart_only_changes(old: cfg.Config, new: cfg.Config) -> list[str]:
    """Settings a running agent cannot take: where its files are (the outbox, the power
    records and the ledgers would split between two dirs) and where its API listens."""
    changed = [f"[paths] {f}" for f in ("state_dir", "run_dir")
               if getattr(old.paths, f) != getattr(new.paths, f)]
    if old.api.listen != new.api.listen:
        changed.append("[api] listen")
    return changed


def stall_limits_s(config: cfg.Config, delivery_interval_s: float | None = None
                   ) -> dict[str, float]:
    """How long each watched loop may go without an iteration (pure); the delivery loop's
    interval the longer of ``[heartbeat] interval`` and ``delivery_interval_s`` (the
    control plane's ``next_interval_s`` with its jitter)."""
    interval_s = max(float(config.heartbeat.interval_s), delivery_interval_s or 0.0)
    return {"gpu": max(GPU_STALL_MIN_S, 10 * config.gpu.monitor_interval_s),
            "delivery": interval_s + 2 * TOTAL_TIMEOUT_S + DELIVERY_STALL_MARGIN_S,
            "pressure": PRESSURE_STALL_S, "xid": XID_STALL_S}


class Agent:
    def __init__(self, config_path: Path | None, *, nvml: Nvml | None = None,
                 notify: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.time,
                 owns_swap_policy: bool | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.config_path = config_path
        loaded = cfg.load(config_path)
        self.config = loaded.config
        self.nvml = nvml if nvml is not None else Nvml()
        self.notify = notify if notify is not None else Notifier()
        self.clock = clock
        self.monitor = GpuMonitor(self.config, self.nvml, write_history=True)
        self.outbox = Outbox(self.config.paths.state_dir,
                             instance_id=cfg.instance_id(self.config))
        self.progress = Progress()
        self._reading = NO_READING  # replaced whole, after each GPU cycle
        self.energy = EnergyKeeper(self.config.paths.run_dir,
                                   failed=lambda err: self.loop_failed("gpu", err))
        self._gpu_started = False  # the crashed run's limits given back
        self._due: dict[str, float] = {}  # tick(): loop -> when it is due again
        self.stopping = threading.Event()
        self.first_cycle = threading.Event()
        self.started_monotonic = time.monotonic()
        self.delivery: Delivery | None = None
        self._delivery_config: cfg.HeartbeatConfig | None = None  # what delivery was built for
        self.api_server: Any = None
        self.psi_root = Path("/")  # where /proc/pressure/memory and /proc/meminfo are read
        self.cgroup_root = Path("/")  # where the cgroup hierarchies are found
        self._cgroups_said: tuple[object, ...] = ()  # the watch's problems, said once
        self.loops: dict[str, threading.Thread] = {}
        self.loop_errors: dict[str, int] = dict.fromkeys(LOOPS, 0)
        self._causes: dict[str, set[str]] = {}  # loop -> failures logged since it last worked
        self._errors_lock = threading.Lock()
        # the steady swap step is the agent's when it runs as its unit (the timer's
        # service stands down then); ``monotonic`` says when a step is due
        self.owns_swap_policy = (own_unit() == AGENT_UNIT if owns_swap_policy is None
                                 else owns_swap_policy)
        self.monotonic = monotonic
        self._swap_step_at: float | None = None  # self.monotonic() of the last step
        self._swap_samples: deque[tuple[float, int]] = deque()  # (monotonic, used bytes)
        self._swap_now = (0, 0)  # (total, free) bytes at the last sample
        self._online_s: float | None = None  # how long a new swap file took, measured
        self._last_step_helped = True  # False: swap ran short and the step could not grow
        self._signals: list[Signal] = []  # signals waiting for the next step
        self._cannot_help_said: dict[str, float] = {}
        self._watch_failed = False  # the cgroup watch failed to arm: armed again soon
        self._arm_failed = False
        self._reload = threading.Event()
        self._naps = threading.Condition()
        self._generation = 0
        self.metrics = Metrics(self.snapshot)  # rendered once per GPU sample: API, textfile
        self.next_interval_s: int | None = None  # the control plane's, from its last answer
        self._jitter = random.Random()  # noqa: S311 - spreading heartbeats, not secrets
        self.commands = commands.Commands(
            self.config.paths.state_dir, run=lambda command: commands.apply(self, command),
            record=self._record, accepting=lambda: self.config.heartbeat.accept_commands)
        self.hibernation = Hibernation(self.config, instance_id=cfg.instance_id(self.config),
                                       record=self._record, drain=self._drain,
                                       control=self._control_client, clock=clock,
                                       failed=lambda err: self.loop_failed("hibernate", err))
        self.xids = XidLedger()  # noted by the XID thread, recovery seen by the GPU step
        self.xid_watcher = XidWatcher(self.nvml, failed=lambda err: self.loop_failed("xid", err))
        self.xid_file = xid_ledger.FileSync(  # gpu-xid.json: taken back at start, followed
            self.xids, self.config.paths.state_dir, self.config.paths.run_dir,
            record=statefile.events_to(self.config.paths.state_dir,
                                       cfg.instance_id(self.config)))

    # -- failures in the loops -------------------------------------------------------

    def loop_failed(self, loop: str, err: BaseException) -> None:
        """Count a failure in ``loop``; log it once per distinct cause, until it succeeds."""
        cause = (err.one_line() if isinstance(err, ClusterctlError)
                 else f"{type(err).__name__}: {err}")
        with self._errors_lock:
            self.loop_errors[loop] = self.loop_errors.get(loop, 0) + 1
            seen = self._causes.setdefault(loop, set())
            repeated = cause in seen
            if len(seen) < MAX_CAUSES_SAID:
                seen.add(cause)
            else:
                repeated = True  # enough said until it works again
        if repeated:
            return
        what = LOOPS.get(loop, loop)
        if isinstance(err, ClusterctlError):  # a message with its fix, no traceback
            log.error("%s: %s", what, cause)
        else:
            log.error("%s failed, will retry: %s", what, cause, exc_info=err)

    def loop_ok(self, loop: str) -> None:
        with self._errors_lock:
            causes = self._causes.pop(loop, None)
        if causes:
            log.info("%s works again", LOOPS.get(loop, loop))

    def _guarded(self, loop: str, action: Callable[[], object]) -> None:
        try:
            action()
        except Exception as err:  # counted and logged; the loop goes on
            self.loop_failed(loop, err)
        else:
            self.loop_ok(loop)

    # -- what the API and metrics read -----------------------------------------------

    def snapshot(self, *, histories: bool = False) -> AgentSnapshot:
        """The agent now, copied: the last GPU cycle's sample and views (published whole
        by the GPU step), one read of /proc/meminfo, the delivery state, progress and
        error counts (under their lock), the hibernation state. ``histories``: the GPU
        histories too (a copy of every point kept, so only when a reader needs them)."""
        reading = self._reading
        config = self.config
        memory: Mapping[str, Any] | None = None
        swap: Mapping[str, Any] | None = None
        unsent = unreadable = None
        try:  # host reads, for metrics only: the GPU answers never depend on them
            memory, swap = map(MappingProxyType, self.summaries())
            unsent = self.outbox.unsent_bytes() if config.heartbeat.control_url else 0
        except ClusterctlError as err:
            unreadable = err.one_line()
        except OSError as err:  # no descriptor left, say
            unreadable = f"{type(err).__name__}: {err}"
        with self._errors_lock:
            errors = dict(self.loop_errors)
        delivery = self.delivery
        kept = {}
        if histories:
            kept = {key: history.points() for key, history in dict(self.monitor.histories).items()}
        now = time.time()
        xids = self.xid_status()
        return AgentSnapshot(
            config=config, gpu=reading.snapshot, views=reading.views,
            histories=MappingProxyType(kept), memory=memory, swap=swap,
            delivery=None if delivery is None else replace(delivery.state),
            progress=replace(self.progress), loop_errors=MappingProxyType(errors),
            problems=tuple(self.problems()), hibernation=self.hibernation.state,
            originals_problem=self.monitor.originals_problem,
            outbox_unsent_bytes=unsent,
            outbox_skipped_lines=self.outbox.skipped_lines,
            started_at=now - (time.monotonic() - self.started_monotonic), taken_at=now,
            gpu_metrics=MappingProxyType(self._gpu_metrics(reading, xids)), unreadable=unreadable,
            energy=reading.energy, xids=xids)

    @staticmethod
    def _gpu_metrics(reading: GpuReading, xids: XidStatus | None = None) -> dict[str, Any]:
        if reading.snapshot is None:
            return {"timestamp": None, "gpus": [], "reason": "no sample yet"}
        return fleet_metrics(reading.snapshot, reading.views, reading.energy, xids=xids)

    def gpu_metrics(self) -> dict[str, Any]:
        return self._gpu_metrics(self._reading, self.xid_status())

    # -- what the API may ask --------------------------------------------------------

    def place(self, name: str, vram_mib: int, gpu_index: int | None) -> placement.Placed:
        """Hand ``vram_mib`` on one GPU (the least busy, or ``gpu_index``) to ``name``."""
        config = self.config
        return placement.place(config.paths.state_dir, config.paths.run_dir, self.nvml.sample,
                               name, vram_mib, config.gpu.memory_reserve_mb,
                               gpu_index=gpu_index, now=time.time(), wait_s=2.0,
                               faulty=self.xids.unrecovered())

    def hibernate_now(self, reason: str) -> None:
        """The hibernation action now, in the background; TemporaryError if one runs."""
        self.hibernation.start_now(reason)

    def summaries(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(memory, swap) for heartbeats and metrics, from one read of /proc/meminfo."""
        return memory_summaries(read_memory(Path("/")), last_swap_step=self.progress.last_swap,
                                swap_steps=self.progress.swap_steps,
                                growth_blocked=swap_ledger.growth_blocked(
                                    self.config.paths.state_dir))

    # -- the loops -------------------------------------------------------------------

    def tick(self, now: float) -> float:
        """One iteration of every loop that is due at ``now`` (as time.monotonic()), here,
        on the caller's thread: the GPU cycle, the delivery pass, the swap policy's steady
        step. No thread is started; what a loop's thread would do between iterations
        (wait, or return early on a reload) is the caller's. When the next is due."""
        for name, step in (("gpu", self.gpu_step), ("delivery", self.delivery_step)):
            if now >= self._due.get(name, now):
                self._due[name] = now + step(now)
        self.swap_tick(now)
        return min(self._due.values())

    def gpu_step(self, now: float) -> float:
        """One GPU cycle at ``now`` (time.monotonic()): a sample (the first gives back the
        limits a crashed run left lowered), published whole for readers, idle detection,
        the textfile. Seconds until the next."""
        if not self._gpu_started:
            self._gpu_started = True
            self._guarded("gpu", self.monitor.restore)
        self._guarded("gpu", self._sample)  # a bad sample must not end monitoring
        self._xid_file_step()
        self.progress.gpu_at = now
        self._guarded("metrics", self.metrics.refresh)  # before readers hear of the cycle
        self.first_cycle.set()
        self._guarded("hibernate", self._observe)
        if self.config.api.textfile_dir:
            self._guarded("textfile", lambda: write_textfile(
                self.metrics, Path(self.config.api.textfile_dir)))
        return self.monitor.config.gpu.monitor_interval_s

    def _sample(self) -> None:
        views = self.monitor.step()
        snapshot, config = self.monitor.snapshot, self.config
        energy = self.energy.after(  # never raises: its failures are counted as ours
            snapshot, self.monotonic(), config.hibernate.gpu_usage_threshold_percent,
            max(gpu_energy.MAX_GAP_S, 10 * config.gpu.monitor_interval_s))
        self._reading = GpuReading(snapshot, views, energy)

    def _gpu_loop(self) -> None:
        while not self.stopping.is_set():
            self._nap(self.gpu_step(time.monotonic()))

    def _observe(self) -> None:
        self.hibernation.observe(tuple(
            None if v.sample.lost else v.sample.utilization_gpu_percent
            for v in self._reading.views))

    # -- XID errors (their own thread: NVML's event wait blocks) ---------------------

    def xid_status(self) -> XidStatus:
        watcher = self.xid_watcher
        return self.xids.status(watcher.watched, watcher.problem)

    def xid_step(self, timeout_s: float = XID_WAIT_S) -> list[XidEvent]:
        """One wait on NVML's XID events (about ``timeout_s`` when none comes): each XID
        noted and recorded as a ``gpu_xid`` event (one code repeating on one GPU: counted,
        recorded again after xid_ledger.RECORD_AGAIN_S), a fatal one written down for
        placement, /metrics rendered again. What arrived."""
        failures = self.xid_watcher.failures
        events = self.xid_watcher.wait(timeout_s)
        self.progress.xid_at = time.monotonic()
        for event in events:
            self._on_xid(event)
        if events:
            self._guarded("metrics", self.metrics.refresh)
        if self.xid_watcher.failures == failures:
            self.loop_ok("xid")
        return events

    def _on_xid(self, event: XidEvent) -> None:
        noted = self.xids.note(event)
        info = noted.info
        if noted.newly_fatal:
            self._save_faults()
        if not noted.record:
            return
        reason = (f"{'fatal ' if info.fatal else ''}XID {event.xid} on GPU {event.index}: "
                  f"{info.meaning}")
        action = info.action_for(event.index)
        log.log(logging.ERROR if info.fatal else logging.WARNING, "%s; %s", reason, action)
        self._record("gpu_xid", reason, {
            "gpu": event.index, "uuid": event.uuid, "xid": event.xid, "kind": info.kind,
            "fatal": info.fatal, "meaning": info.meaning, "action": action,
            "count": noted.count})

    def _xid_file_step(self) -> None:
        """The GPU step's part of the XIDs: the file followed (before recovery: a clear, or a
        restart), then recovery; their failures (a full disk) are counted and said once
        under their own name, which works again only when both did (the XID thread's waits
        going well say nothing of the file)."""
        failures = self.loop_errors.get("xid_file", 0)
        for part in (self._xid_follow, self._xid_recovery):
            try:
                part()
            except Exception as err:  # counted and logged; the GPU step goes on
                self.loop_failed("xid_file", err)
        if self.loop_errors.get("xid_file", 0) == failures:
            self.loop_ok("xid_file")

    def _xid_follow(self, *, write: bool = False) -> None:
        """gpu-xid.json and the ledger agree (see xid_ledger.FileSync): at the first GPU
        step this boot's fatal XIDs taken back from an earlier run; later, those an operator
        cleared (clusterctl gpu clear-xid) dropped; ``write``: the ledger changed."""
        synced = self.xid_file.sync(write=write)
        for fatal in synced.adopted:
            log.warning("%s, before the agent started: still held (placement leaves the GPU "
                        "out, /healthz 503); %s", fatal.problem, fatal.fix)
        for fatal, clear in synced.cleared:
            log.warning("fatal XID %s on GPU %s cleared by %s (clusterctl gpu clear-xid): "
                        "placement on it again", fatal.xid, fatal.index, clear.by)

    def _xid_recovery(self) -> None:
        """The GPU step's part: a GPU lost and answering again has recovered."""
        recovered = self.xids.observe(v.sample for v in self._reading.views)
        for fatal in recovered:
            reason = (f"GPU {fatal.index} answers again after it was lost: fatal XID "
                      f"{fatal.xid} cleared, placement on it again")
            log.warning("%s", reason)
            self._record("gpu_xid_recovered", reason,
                         {"gpu": fatal.index, "uuid": fatal.uuid, "xid": fatal.xid})
        if recovered:
            self._save_faults()

    def _save_faults(self) -> None:
        """gpu-xid.json as the ledger has it (for every placement); a failure counted (and
        the write tried again at the next GPU step)."""
        try:
            self._xid_follow(write=True)
        except Exception as err:  # a full disk: the agent's own placements still know
            self.loop_failed("xid_file", err)

    def _xid_loop(self) -> None:
        """XIDs as they come, until stop (what an earlier run held against a GPU in this
        boot stays held: see ``_xid_follow``)."""
        while not self.stopping.is_set():
            try:
                self.xid_step(XID_WAIT_S)
            except Exception as err:  # counted and logged once; the next wait goes on
                self.loop_failed("xid", err)
                self.stopping.wait(XID_WAIT_S)

    def delivery_step(self, now: float) -> float:
        """One delivery pass at ``now`` (time.monotonic()): a heartbeat and the outbox
        drained. Seconds until the next (sooner while a backlog drains, later on failures)."""
        wait = float(self.config.heartbeat.interval_s)
        try:
            wait = self._deliver_once()
        except Exception as err:  # e.g. a full disk for the sequence file: retry
            self.loop_failed("delivery", err)
        else:
            self.loop_ok("delivery")
        self.progress.delivery_at = now
        return wait

    def _delivery_loop(self) -> None:
        while not self.stopping.is_set():
            self._nap(self.delivery_step(time.monotonic()))

    def _nap(self, seconds: float) -> None:
        """Wait ``seconds``, or less: a stop or a change of config (new intervals, and the
        watchdog's new limits with them) wakes every loop at once."""
        with self._naps:
            generation = self._generation
            self._naps.wait_for(lambda: self._generation != generation
                                or self.stopping.is_set(), timeout=seconds)

    def wake_loops(self) -> None:
        with self._naps:
            self._generation += 1
            self._naps.notify_all()

    def _delivery_for(self, beat: cfg.HeartbeatConfig) -> Delivery | None:
        """The Delivery for ``[heartbeat]``; when any of it changed (a reload), the same one
        with a new client: the new URL, token file... from the next request on, counters,
        backoff and the one-flush-at-a-time lock kept."""
        if beat == self._delivery_config:
            return self.delivery
        self._delivery_config = beat
        try:
            client = ControlClient(beat, self.config.paths.state_dir)
        except ClusterctlError as err:
            log.error("heartbeats off: %s", err.one_line())
            self.delivery = None
            return None
        if self.delivery is None:
            self.delivery = Delivery(client, self.outbox, self.config.paths.state_dir,
                                     monotonic=self.monotonic)
        else:
            self.delivery.client = client
        return self.delivery

    def _deliver_once(self) -> float:
        """One heartbeat and a drain of the outbox; seconds until the next."""
        config = self.config
        if not config.heartbeat.control_url:
            return float(config.heartbeat.interval_s)
        delivery = self._delivery_for(config.heartbeat)
        if delivery is None:
            return float(config.heartbeat.interval_s)
        answer = delivery.beat(self._payload(delivery.next_sequence()))
        ok = answer is not None
        if answer is not None:
            self._directed(answer.body)
        dropped = self.outbox.bound()
        if dropped:
            self._record("outbox_overflow", f"{dropped} unsent events dropped",
                         {"dropped": dropped})
        ok = delivery.flush(budget_s=float(config.heartbeat.interval_s)) and ok
        if ok:  # a backlog left: the next pass (a heartbeat, more events) soon
            return BACKLOG_PASS_S if delivery.more else self._interval_s()
        return min(float(config.heartbeat.interval_s), delivery.backoff.failed())

    def _directed(self, body: object) -> None:
        """What the heartbeat's answer asks: the next interval, and its commands run and
        acknowledged (events, sent by this same pass). Nothing in it can end the pass."""
        asked = commands.directions(body)
        self.next_interval_s = asked.next_interval_s
        self._guarded("delivery", lambda: self.commands.handle(asked.commands))

    def _interval_s(self) -> float:
        """Seconds to the next heartbeat: the control plane's ``next_interval_s`` within
        10 % either way, else ``[heartbeat] interval``."""
        given = self.next_interval_s
        if given is None:
            return float(self.config.heartbeat.interval_s)
        return given * self._jitter.uniform(0.9, 1.1)

    def _payload(self, sequence: int) -> dict[str, Any]:
        state = self.hibernation.state
        return node_payload(self.config, sequence=sequence, now=self.clock(),
                            status=state.status, idle_since=state.idle_since,
                            gpus=self.gpu_metrics()["gpus"], summaries=self.summaries())

    def _control_client(self) -> ControlClient | None:
        if not self.config.heartbeat.control_url:
            return None
        return ControlClient(self.config.heartbeat, self.config.paths.state_dir)

    def _drain(self) -> None:
        """Before the action: a last heartbeat (hibernating), Ollama's models unloaded,
        the outbox sent."""
        delivery = self.delivery
        actions.drain(self.config, heartbeat=None if delivery is None else
                      lambda: delivery.heartbeat(self._payload(delivery.next_sequence())),
                      flush=None if delivery is None else delivery.flush)

    def _pressure_loop(self) -> None:
        """The swap policy: swap use sampled every SWAP_SAMPLE_S, the PSI trigger armed
        (again after any failure, and when its threshold changes) and answered, and the
        steady step when the agent owns it. Returns only on stop: on a node without PSI
        (the trigger "off") the samples still see swap running out."""
        while not self.stopping.is_set():
            self.progress.pressure_at = time.monotonic()
            trigger = self._arm()
            watch = self._arm_cgroups()
            try:
                self._watch_pressure(trigger, watch)
            except Exception as err:  # a full disk under swap.run, a torn-down trigger
                self.loop_failed("pressure", err)
                self.stopping.wait(PRESSURE_RETRY_S)
            finally:
                if trigger is not None:
                    trigger.close()
                if watch is not None:
                    watch.close()

    def _arm(self) -> PressureTrigger | None:
        """The PSI trigger at ``[swap] pressure_threshold``, armed; None when this node
        cannot have one (``pressure_off`` says why) or arming failed (tried again)."""
        if self.progress.pressure_off:
            return None
        threshold = self.config.swap.pressure_threshold_percent
        trigger = PressureTrigger(threshold, root=self.psi_root)
        try:
            window = trigger.arm()
        except ClusterctlError as err:  # no PSI, not allowed: samples and steady steps only
            self.progress.pressure_off = err.one_line()
            log.warning("memory pressure trigger off: %s", err.one_line())
            return None
        except Exception as err:  # out of file descriptors, say: try again
            self._arm_failed = True
            self.loop_failed("pressure", err)
            return None
        if self._arm_failed:
            self._arm_failed = False
            self.loop_ok("pressure")
        log.info("memory pressure trigger armed (%g%% of a %g s window)", threshold, window)
        return trigger

    def _arm_cgroups(self) -> CgroupWatch | None:
        """The watch on ``[swap] watch_cgroups``: their pressure, limit hits and OOM kills.
        Cgroups that cannot be watched are said once per arming, at info (a default slice
        that does not exist on this node is no problem); None when none is watched."""
        swap = self.config.swap
        if not swap.watch_cgroups:
            return None
        watch = CgroupWatch(swap.watch_cgroups, swap.pressure_threshold_percent,
                            root=self.cgroup_root)
        try:
            problems = watch.arm()
        except Exception as err:  # out of file descriptors: armed again in a moment
            self._watch_failed = True
            self.loop_failed("pressure", err)
            return None
        self._watch_failed = False
        said = (swap.watch_cgroups, problems)
        if said != self._cgroups_said:
            self._cgroups_said = said
            for line in problems:
                if "Read-only file system" in line:  # the unit's sandbox: counters only
                    log.warning("not watching cgroup %s; its limit and OOM counters only: "
                                "`clusterctl config dropins` lets this unit write it", line)
                else:
                    log.info("not watching cgroup %s", line)
            if watch.watched:
                log.info("watching cgroups %s for memory pressure, limits and OOM kills",
                         ", ".join(watch.watched))
        if not watch.watched:
            watch.close()
            return None
        return watch

    def _watch_pressure(self, trigger: PressureTrigger | None,
                        watch: CgroupWatch | None = None) -> None:
        """Wake every SWAP_SAMPLE_S (at once when a trigger fires) for a step that is due;
        returns on stop, when what was armed no longer matches the config (a reload), or,
        without a trigger that failed to arm, after PRESSURE_RETRY_S to arm it again."""
        retry_at = (time.monotonic() + PRESSURE_RETRY_S
                    if (trigger is None and not self.progress.pressure_off)
                    or self._watch_failed else None)
        swap = self.config.swap
        armed = (swap.pressure_threshold_percent, swap.watch_cgroups)
        while not self.stopping.is_set():
            self.progress.pressure_at = time.monotonic()
            swap = self.config.swap
            if (swap.pressure_threshold_percent, swap.watch_cgroups) != armed:
                return
            if retry_at is not None and time.monotonic() >= retry_at:
                return
            poll = select.poll()
            if trigger is not None:
                poll.register(trigger.fileno(), select.POLLPRI)
            for fd, mask in (watch.fds() if watch is not None else {}).items():
                poll.register(fd, mask)
            if trigger is None and watch is None:
                self.stopping.wait(SWAP_SAMPLE_S)
                ready: list[tuple[int, int]] = []
            else:
                ready = poll.poll(int(SWAP_SAMPLE_S * 1000))
            signals: list[Signal] = []
            for fd, mask in ready:
                if trigger is not None and fd == trigger.fileno() and trigger.fired(mask):
                    signals.append(Signal(
                        "pressure", "system",
                        detail=f"memory stalled >= {trigger.threshold_percent:g}% of a "
                        f"{trigger.window_s:g} s window"))
            if watch is not None:
                signals += [_signal_of(s) for s in watch.signals({fd for fd, _ in ready})]
            self.swap_tick(self.monotonic(), signals=tuple(signals))

    def sample_swap(self, now: float) -> SwapTrend | None:
        """Swap in use now, kept with the last seconds' samples; how fast it grows. None
        (and no sample) where meminfo cannot be read: the step itself says why."""
        try:
            memory = read_memory(self.psi_root)
        except ClusterctlError:
            self._swap_now = (0, 0)
            return None
        samples = self._swap_samples
        if samples and now < samples[-1][0]:
            samples.clear()  # a clock that went back: start over
        samples.append((now, memory.swap_used_bytes))
        while samples and now - samples[0][0] > RATE_WINDOW_S:
            samples.popleft()
        self._swap_now = (memory.swap_total_bytes, memory.swap_free_bytes)
        rate = swap_rate(list(samples))
        if rate is None:
            return None
        return SwapTrend(rate, online_s=self._online_s or ONLINE_S_UNMEASURED)

    def swap_tick(self, now: float, *, signals: tuple[Signal, ...] = ()) -> bool:
        """Sample swap use at ``now`` (``self.monotonic()``) and run one policy step when
        one is due: at once (at most every SWAP_SHORT_GAP_S) when swap is running out, on
        a signal (a PSI trigger, a cgroup event) at most every SWAP_STEP_MIN_GAP_S, and,
        when the agent owns the policy, every ``[swap] check_interval`` (the first at
        once). Signals that find no step due wait for the next. True if a step ran."""
        trend = self.sample_swap(now)
        self._signals += [s for s in signals if self._news(s, now)]
        del self._signals[:-PENDING_SIGNALS_KEPT]  # a storm of counters: the latest
        total, free = self._swap_now
        short = swap_shortage(total, free, trend, self.config.swap)
        last = self._swap_step_at
        since = None if last is None or now < last else now - last  # a clock gone back
        short_gap = SWAP_SHORT_GAP_S if self._last_step_helped else SWAP_STEP_MIN_GAP_S
        due = ((short is not None and (since is None or since >= short_gap))
               or (bool(self._signals) and (since is None or since >= SWAP_STEP_MIN_GAP_S))
               or (self.owns_swap_policy
                   and (since is None or since >= self.config.swap.check_interval_s)))
        if not due:
            return False
        fired, self._signals = tuple(self._signals), []
        why = (short.reason if short is not None else
               f"{fired[0].who}: {fired[0].kind}" if fired else "swap policy step")
        self._swap_step_at = now
        self.progress.swap_step_since = time.monotonic()
        try:
            self._last_step_helped = self._swap_step(why, trend, fired) or short is None
        finally:
            self.progress.swap_step_since = None
        return True

    def _news(self, signal: Signal, now: float) -> bool:
        """A signal about a cgroup that swap cannot help is said once per
        CANNOT_HELP_AGAIN_S; every other signal is news."""
        if signal.cannot_help is None:
            return True
        key = f"{signal.source}:{signal.cannot_help}"
        said = self._cannot_help_said.get(key)
        if said is not None and 0 <= now - said < CANNOT_HELP_AGAIN_S:
            return False
        if len(self._cannot_help_said) >= CANNOT_HELP_KEPT:  # containers come and go
            self._cannot_help_said = {k: t for k, t in self._cannot_help_said.items()
                                      if 0 <= now - t < CANNOT_HELP_AGAIN_S}
        self._cannot_help_said[key] = now
        return True

    def _swap_step(self, why: str, trend: SwapTrend | None = None,
                   signals: tuple[Signal, ...] = ()) -> bool:
        """One `swap auto` step under the swap lock; True if it made swap grow."""
        started = time.monotonic()
        try:
            result = swap.run(self.config, "auto", lock_wait_s=1.0, trend=trend,
                              signals=signals)
        except ClusterctlError as err:
            self.progress.last_swap = f"failed: {err.message}"
            log.warning("swap step (%s): %s", why, err.one_line())
            return False
        self.loop_ok("pressure")
        self.progress.swap_steps += 1
        self.progress.last_swap = result.plan.summary
        created = sum(1 for a in result.applied if a.kind == "create")
        if created:  # how long a file takes to come online here, for the next prediction
            took = (time.monotonic() - started) / created
            self._online_s = took if self._online_s is None else (self._online_s + took) / 2
        for action in result.applied:
            log.warning("%s: %s %s (%s)", why, action.kind, action.name, action.reason)
        return created > 0

    def _record(self, kind: str, reason: str, details: dict[str, Any]) -> None:
        try:
            EventLog(self.config.paths.state_dir, cfg.instance_id(self.config)).record(
                kind, reason, details, now=self.clock())
        except ClusterctlError as err:
            log.error("cannot record %s: %s", kind, err.one_line())
        except Exception as err:  # a full disk, no file descriptors: the caller goes on
            log.error("cannot record %s: %s: %s", kind, type(err).__name__, err)

    # -- life ------------------------------------------------------------------------

    def status_line(self) -> str:
        reading = self._reading
        views = reading.views
        if not views:
            reason = reading.snapshot.reason if reading.snapshot else "starting"
            gpus = f"no GPU ({reason})"
        else:
            states = ", ".join(f"{v.sample.index}:{v.state.value}" for v in views)
            temps = [v.sample.temperature_c for v in views if v.sample.temperature_c is not None]
            gpus = f"GPUs {states}" + (f", hottest {max(temps)} C" if temps else "")
        swap_used = read_memory(Path("/")).swap_used_bytes // 2**20
        beat = "heartbeats off"
        if self.delivery is not None:
            state = self.delivery.state
            beat = ("heartbeat ok" if state.last_heartbeat_ok else
                    f"heartbeat failing ({state.last_error})" if state.last_error
                    else "heartbeat pending")
        if self.monitor.originals_problem:  # said, not a watchdog matter: sampling goes on
            beat += "; GPU power limits held: the saved originals cannot be read"
        return f"{gpus}; swap {swap_used} MiB in use; {beat}"

    def problems(self, now: float | None = None) -> list[str]:
        """The loops that died or are stuck past their limit; ``now`` as time.monotonic()."""
        now = time.monotonic() if now is None else now
        given = self.next_interval_s
        limits = stall_limits_s(self.config, None if given is None else given * 1.1)
        if self.progress.swap_step_since is not None:
            limits["pressure"] = SWAP_STEP_STALL_S
        last = {"gpu": self.progress.gpu_at, "delivery": self.progress.delivery_at,
                "pressure": self.progress.pressure_at, "xid": self.progress.xid_at}
        found = []
        for name, limit_s in limits.items():
            thread = self.loops.get(name)
            if thread is None:
                continue  # not started
            if not thread.is_alive():
                found.append(f"{name} loop died")
                continue
            at = last[name]
            since = self.started_monotonic if at is None else at
            if now - since > limit_s:
                found.append(f"{name} loop stuck for {now - since:.0f} s")
        return found

    def reload(self) -> None:
        """Load the config again; a config that cannot be loaded is refused, the running
        one stays, and nothing here can end the agent."""
        try:
            loaded = cfg.load(self.config_path)
        except ClusterctlError as err:
            self._refuse_reload(err.one_line())
            return
        except Exception as err:  # whatever the file held: refused, never fatal
            self._refuse_reload(f"cannot load {self.config_path}: {type(err).__name__}: {err}",
                                err)
            return
        fixed = restart_only_changes(self.config, loaded.config)
        if fixed:
            self._refuse_reload(f"{', '.join(fixed)} changed: those take a restart "
                                "(systemctl restart clusterctl-agent)")
            return
        try:
            self.apply_config(loaded.config)
        except Exception as err:
            self._refuse_reload(f"cannot apply it: {type(err).__name__}: {err}", err)
            return
        log.info("config reloaded from %s", loaded.path)

    def apply_config(self, new: cfg.Config) -> None:
        """Run on ``new`` from now on (a reload, the API): the monitor, hibernation and the
        loops' intervals, which wake at once; delivery picks up [heartbeat] on its next pass;
        the swap policy takes ``[swap]`` at its next step, and the pressure loop arms the PSI
        trigger again within a second when ``[swap] pressure_threshold`` changed."""
        self.monitor.with_config(new)
        self.config = new
        self.hibernation.config = new
        self.wake_loops()

    def _refuse_reload(self, why: str, unexpected: Exception | None = None) -> None:
        log.error("reload refused, the running config stays: %s", why, exc_info=unexpected)
        self._tell(f"STATUS=reload refused: {why}")

    def _tell(self, message: str) -> None:
        """sd_notify; a failure (no buffer, no descriptor) is counted, never fatal."""
        try:
            self.notify(message)
        except Exception as err:
            self.loop_failed("main", err)

    def _status(self) -> str:
        try:
            return self.status_line()
        except Exception as err:  # /proc unreadable (no descriptor left, say)
            self.loop_failed("main", err)
            return "status unavailable"

    def start(self) -> None:
        for name, target in (("gpu", self._gpu_loop), ("delivery", self._delivery_loop),
                             ("pressure", self._pressure_loop), ("xid", self._xid_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self.loops[name] = thread
        self.api_server = serve(self)

    def run(self) -> int:
        """Until SIGTERM; the exit status. Always ends in ``stop()``."""
        wake = threading.Event()  # a signal ends the main loop's wait at once

        def on(flag: threading.Event) -> Callable[..., None]:
            def handler(*_: object) -> None:
                flag.set()
                wake.set()
            return handler

        signal.signal(signal.SIGTERM, on(self.stopping))
        signal.signal(signal.SIGINT, on(self.stopping))
        signal.signal(signal.SIGHUP, on(self._reload))
        try:
            self.start()
            self.first_cycle.wait(timeout=60)
            status = self._status()
            self._tell(f"READY=1\nSTATUS={status}")
            log.info("ready: %s", status)
            while not self.stopping.is_set():
                wake.clear()  # before the step: a signal during it is not slept through
                try:
                    self._main_step()
                except Exception as err:  # the next round tries again
                    self.loop_failed("main", err)
                wake.wait(MAIN_PERIOD_S)
        finally:
            self.stop()
        return 0

    def _main_step(self) -> None:
        if self._reload.is_set():
            self._reload.clear()
            self.reload()
        problems = self.problems()
        if problems:
            self._tell(f"STATUS={'; '.join(problems)}: watchdog pings held back")
        else:
            self._tell(f"WATCHDOG=1\nSTATUS={self._status()}")

    def stop(self) -> None:
        self._tell("STOPPING=1\nSTATUS=stopping: giving back power limits")
        self.stopping.set()
        self.wake_loops()
        if self.api_server is not None:
            try:
                self.api_server.shutdown()
                self.api_server.server_close()
            except Exception as err:
                log.error("stopping the API: %s: %s", type(err).__name__, err)
        for thread in self.loops.values():
            # a request in flight may take its 10 s; its thread is a daemon and the
            # outbox is on disk already, so stopping does not wait for the network
            thread.join(timeout=2 if thread.name == "delivery" else
                        XID_WAIT_S + 1 if thread.name == "xid" else 10)
        self.xid_watcher.close()  # its event set freed before NVML shuts down
        try:
            self.monitor.stop()  # every power limit back
        except ClusterctlError as err:
            log.error("could not give every power limit back: %s", err.one_line())
        except Exception as err:
            log.error("could not give every power limit back: %s: %s", type(err).__name__, err)
        self.nvml.shutdown()
        log.info("stopped")


def _signal_of(found: CgroupSignal) -> Signal:
    """A cgroup's signal as the swap policy takes it."""
    cap = found.swap_cap
    detail = found.detail
    if found.kind != "pressure" and found.count > 1:
        detail = f"{detail}, {found.count} times" if detail else f"{found.count} times"
    return Signal(found.kind, found.cgroup, found.unit, detail, found.count,
                  cannot_help=cap.why if cap is not None else None,
                  fix=cap.fix if cap is not None else None)
