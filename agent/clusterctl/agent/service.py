"""The agent: one process, a few threads that never wait on each other.

- GPU: a sample every ``[gpu] monitor_interval`` (states, history, throttle).
- Delivery: a heartbeat every ``[heartbeat] interval``, then the outbox drained, with
  backoff when the control plane is down.
- Pressure: a PSI trigger on /proc/pressure/memory; when it fires, one `swap auto`
  step (same lock and code as the timer's), at most every few seconds.
- API: the local HTTP API and /metrics.
- Main: READY=1 after the first GPU cycle, STATUS lines, WATCHDOG=1 while the loops
  make progress; SIGTERM stops (power limits given back, outbox on disk), SIGHUP
  reloads a validated config.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sdnotify

from clusterctl import config as cfg
from clusterctl import swap
from clusterctl.agent.api import serve
from clusterctl.agent.control import ControlClient
from clusterctl.agent.heartbeat import Delivery, status_payload
from clusterctl.agent.metrics import write_textfile
from clusterctl.agent.outbox import Outbox
from clusterctl.errors import ClusterctlError
from clusterctl.events import EventLog
from clusterctl.gpu.monitor import GpuMonitor
from clusterctl.gpu.shapes import fleet_metrics
from clusterctl.hibernate.controller import Hibernation
from clusterctl.host.nvml import Nvml
from clusterctl.host.procfs import read_boot_id, read_memory
from clusterctl.host.psi import PressureTrigger
from clusterctl.host.software import read_loaded_models
from clusterctl.system.memory import unload_model

log = logging.getLogger("clusterctl.agent")
SWAP_STEP_MIN_GAP_S = 5.0  # a pressure storm runs at most one swap step this often
STALL_S = 300.0  # a loop silent this long (or 10 samples) stops the watchdog pings


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
    gpu_at: float | None = None
    delivery_at: float | None = None
    pressure_at: float | None = None
    swap_steps: int = 0
    last_swap: str | None = None


class Agent:
    def __init__(self, config_path: Path | None, *, nvml: Nvml | None = None,
                 notify: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config_path = config_path
        loaded = cfg.load(config_path)
        self.config = loaded.config
        self.nvml = nvml if nvml is not None else Nvml()
        self.notify = notify if notify is not None else Notifier()
        self.clock = clock
        self.monitor = GpuMonitor(self.config, self.nvml, write_history=True)
        self.outbox = Outbox(self.config.paths.state_dir)
        self.progress = Progress()
        self.stopping = threading.Event()
        self.first_cycle = threading.Event()
        self.started_monotonic = time.monotonic()
        self.delivery: Delivery | None = None
        self.api_server: Any = None
        self._threads: list[threading.Thread] = []
        self._reload = threading.Event()
        self._textfile_failed = False
        self.hibernation = Hibernation(self.config, instance_id=swap.instance_id(self.config),
                                       record=self._record, drain=self._drain,
                                       control=self._control_client, clock=clock)

    # -- helpers shared with the API -------------------------------------------------

    def gpu_metrics(self) -> dict[str, Any]:
        snapshot = self.monitor.snapshot
        if snapshot is None:
            return {"timestamp": None, "gpus": [], "reason": "no sample yet"}
        return fleet_metrics(snapshot, self.monitor.views)

    def summaries(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(memory, swap) for heartbeats and metrics, from one read of /proc/meminfo."""
        memory = read_memory(Path("/"))
        return ({"total_bytes": memory.total_bytes, "available_bytes": memory.available_bytes,
                 "used_percent": None if memory.used_percent is None
                 else round(memory.used_percent, 1)},
                {"total_bytes": memory.swap_total_bytes, "used_bytes": memory.swap_used_bytes,
                 "last_step": self.progress.last_swap, "steps": self.progress.swap_steps})

    # -- the loops -------------------------------------------------------------------

    def _gpu_loop(self) -> None:
        self.monitor.restore()  # limits a crashed run left lowered go back first
        while not self.stopping.is_set():
            try:
                self.monitor.step()
            except Exception:  # a bad sample must not end monitoring
                log.exception("GPU sampling failed")
            self.progress.gpu_at = time.monotonic()
            self.first_cycle.set()
            try:
                self.hibernation.observe(tuple(
                    None if v.sample.lost else v.sample.utilization_gpu_percent
                    for v in self.monitor.views))
            except Exception:  # idle detection must not stop sampling
                log.exception("idle detection failed")
            if self.config.api.textfile_dir:
                self._write_textfile(Path(self.config.api.textfile_dir))
            self.stopping.wait(self.monitor.config.gpu.monitor_interval_s)

    def _write_textfile(self, directory: Path) -> None:
        try:
            write_textfile(self, directory)
        except OSError as err:
            if not self._textfile_failed:
                log.error("cannot write metrics to %s: %s", directory, err)
            self._textfile_failed = True
        else:
            self._textfile_failed = False

    def _delivery_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                wait = self._deliver_once()
            except Exception:  # e.g. a full disk for the sequence file: retry, do not die
                log.exception("heartbeat/event delivery failed")
                wait = float(self.config.heartbeat.interval_s)
            self.progress.delivery_at = time.monotonic()
            self.stopping.wait(wait)

    def _deliver_once(self) -> float:
        """One heartbeat and a drain of the outbox; seconds until the next."""
        config = self.config
        if not config.heartbeat.control_url:
            return float(config.heartbeat.interval_s)
        if self.delivery is None or self.delivery.client.base != \
                config.heartbeat.control_url.rstrip("/"):
            try:
                self.delivery = Delivery(ControlClient(config.heartbeat), self.outbox,
                                         config.paths.state_dir)
            except ClusterctlError as err:
                log.error("heartbeats off: %s", err.one_line())
                return float(config.heartbeat.interval_s)
        delivery = self.delivery
        ok = delivery.heartbeat(self._payload(delivery.next_sequence()))
        dropped = self.outbox.bound()
        if dropped:
            self._record("outbox_overflow", f"{dropped} unsent events dropped",
                         {"dropped": dropped})
        ok = delivery.flush() and ok
        if ok:
            return float(config.heartbeat.interval_s)
        return min(float(config.heartbeat.interval_s), delivery.backoff.failed())

    def _payload(self, sequence: int) -> dict[str, Any]:
        metrics = self.gpu_metrics()
        state = self.hibernation.state
        memory, swap_ = self.summaries()
        return status_payload(
            instance_id=swap.instance_id(self.config), boot_id=read_boot_id(Path("/")),
            sequence=sequence, now=self.clock(),
            monotonic_s=time.monotonic() - self.started_monotonic, status=state.status,
            idle_since=state.idle_since, gpus=metrics["gpus"], memory=memory, swap=swap_,
            schedule=self.hibernation.next_times(self.clock()))

    def _control_client(self) -> ControlClient | None:
        if not self.config.heartbeat.control_url:
            return None
        return ControlClient(self.config.heartbeat)

    def _drain(self) -> None:
        """Before the action: a last heartbeat (hibernating), Ollama's models unloaded,
        the outbox sent."""
        if self.delivery is not None:
            self.delivery.heartbeat(self._payload(self.delivery.next_sequence()))
        try:
            models = read_loaded_models(self.config.ollama.url, timeout_s=2.0)
        except ClusterctlError:
            models = ()
        for model in models:
            try:
                unload_model(self.config.ollama.url, model.name)
                log.info("unloaded %s before hibernating", model.name)
            except ClusterctlError as err:
                log.warning("%s", err.one_line())
        if self.delivery is not None:
            self.delivery.flush()

    def _pressure_loop(self) -> None:
        trigger = PressureTrigger(self.config.swap.pressure_threshold_percent)
        try:
            window = trigger.arm()
        except ClusterctlError as err:
            log.warning("memory pressure trigger off: %s", err.one_line())
            return
        log.info("memory pressure trigger armed (%g s window)", window)
        last = 0.0
        try:
            while not self.stopping.is_set():
                self.progress.pressure_at = time.monotonic()
                if not trigger.wait(1.0):
                    continue
                if time.monotonic() - last < SWAP_STEP_MIN_GAP_S:
                    continue
                last = time.monotonic()
                self._swap_step()
        finally:
            trigger.close()

    def _swap_step(self) -> None:
        try:
            result = swap.run(self.config, "auto", lock_wait_s=1.0)
        except ClusterctlError as err:
            self.progress.last_swap = f"failed: {err.message}"
            log.warning("swap step on memory pressure: %s", err.one_line())
            return
        self.progress.swap_steps += 1
        self.progress.last_swap = result.plan.summary
        for action in result.applied:
            log.warning("memory pressure: %s %s", action.kind, action.name)

    def _record(self, kind: str, reason: str, details: dict[str, Any]) -> None:
        try:
            EventLog(self.config.paths.state_dir, swap.instance_id(self.config)).record(
                kind, reason, details, now=self.clock())
        except ClusterctlError as err:
            log.error("cannot record %s: %s", kind, err.one_line())

    # -- life ------------------------------------------------------------------------

    def status_line(self) -> str:
        views = self.monitor.views
        if not views:
            reason = self.monitor.snapshot.reason if self.monitor.snapshot else "starting"
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
        return f"{gpus}; swap {swap_used} MiB in use; {beat}"

    def _healthy(self) -> bool:
        now = time.monotonic()
        limit = max(STALL_S, 10 * self.monitor.config.gpu.monitor_interval_s)
        return self.progress.gpu_at is not None and now - self.progress.gpu_at < limit

    def reload(self) -> None:
        try:
            loaded = cfg.load(self.config_path)
        except ClusterctlError as err:
            log.error("reload refused, the running config stays: %s", err.one_line())
            self.notify(f"STATUS=reload refused: {err.message}")
            return
        self.config = loaded.config
        self.monitor.config = loaded.config
        self.monitor.with_config(loaded.config)
        log.info("config reloaded from %s", loaded.path)

    def start(self) -> None:
        for name, target in (("gpu", self._gpu_loop), ("delivery", self._delivery_loop),
                             ("pressure", self._pressure_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self.api_server = serve(self)

    def run(self) -> int:
        """Until SIGTERM; the exit status."""
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())
        self.start()
        self.first_cycle.wait(timeout=60)
        self.notify(f"READY=1\nSTATUS={self.status_line()}")
        log.info("ready: %s", self.status_line())
        while not self.stopping.is_set():
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            if self._healthy():
                self.notify(f"WATCHDOG=1\nSTATUS={self.status_line()}")
            else:
                self.notify("STATUS=GPU loop stalled; watchdog pings held back")
            self.stopping.wait(2.0)
        self.stop()
        return 0

    def stop(self) -> None:
        self.notify("STOPPING=1\nSTATUS=stopping: giving back power limits")
        self.stopping.set()
        if self.api_server is not None:
            self.api_server.shutdown()
            self.api_server.server_close()
        for thread in self._threads:
            # a request in flight may take its 10 s; its thread is a daemon and the
            # outbox is on disk already, so stopping does not wait for the network
            thread.join(timeout=2 if thread.name == "delivery" else 10)
        try:
            self.monitor.stop()  # every power limit back
        except ClusterctlError as err:
            log.error("could not give every power limit back: %s", err.one_line())
        self.nvml.shutdown()
        log.info("stopped")
