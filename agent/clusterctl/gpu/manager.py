"""The Python API for programs on the node: GPU status, states, trends, VRAM placement.

    from clusterctl.gpu.manager import get_gpu_manager

    gpu = get_gpu_manager()
    if gpu.is_available():
        status = gpu.get_gpu_status()
        print(status["name"], status["temperature_celsius"], status["state"])
    if gpu.allocate_memory("llm_model", 2048):      # MiB, on the placement ledger
        try:
            ...
        finally:
            gpu.deallocate_memory("llm_model")

Thin over the same core as the CLI and the agent: NVML sampling, states with
hysteresis, the placement ledger under /var/lib/clusterctl (shared with
`clusterctl gpu place`, and locked, so other processes see the same allocations),
and the throttle controller's plan.

It reads and plans: power limits have one owner, the agent (or `clusterctl gpu
throttle reset` by hand). A manager never sets a power limit, never writes or gives
back a saved power limit (originals.json), and records no event, unless it is made with
``plan_only=False``; even then it gives back only the limits it lowered itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from clusterctl import config as cfg
from clusterctl.errors import UsageError
from clusterctl.gpu import placement, shapes
from clusterctl.gpu.monitor import GpuMonitor, GpuView
from clusterctl.host.nvml import Nvml


class GpuManager:
    """GPU status and placement for one program.

    ``plan_only`` (the default): the throttle controller only plans (``GpuView.decision``
    says what the agent would do); no power limit is set and nothing of the agent's is
    undone. ``plan_only=False`` asks this process to act on ``[gpu] throttle_enabled``
    itself: it then lowers limits as the agent would, and ``stop_monitoring()`` /
    ``shutdown()`` give back only the limits THIS process lowered, never a record it
    did not write (the agent's, or one another writer changed since).
    """

    def __init__(self, config: cfg.Config | None = None, *, nvml: Nvml | None = None,
                 plan_only: bool = True) -> None:
        self.config = config if config is not None else cfg.load().config
        self.nvml = nvml if nvml is not None else Nvml()
        self.monitor = GpuMonitor(self.config, self.nvml, plan_only=plan_only,
                                  owns_power_records=False, record_events=not plan_only)
        self._monitoring = False

    # -- reading -------------------------------------------------------------------

    def _views(self) -> tuple[GpuView, ...]:
        if not self._monitoring or self.monitor.snapshot is None:
            return self.monitor.step()
        return self.monitor.views

    def _view(self, gpu_id: int) -> GpuView:
        views = self._views()
        for view in views:
            if view.sample.index == gpu_id:
                return view
        raise UsageError(f"no GPU {gpu_id} (this node has {len(views)})")

    def is_available(self) -> bool:
        return any(not v.sample.lost for v in self._views())

    def get_gpu_status(self, gpu_id: int = 0) -> dict[str, Any]:
        """The status shape (name, temperature, memory, state, throttling), plus the
        placement ledger's allocations on that GPU."""
        view = self._view(gpu_id)
        out = shapes.manager_status(view)
        mine = {a.name: a.vram_mib for a in placement.load(self.config.paths.state_dir)
                if a.gpu_uuid == view.sample.uuid}
        out["memory"]["allocation_stats"] = {"allocations": mine,
                                             "allocated_mb": sum(mine.values())}
        return out

    def get_available_memory(self, gpu_id: int | None = None) -> int:
        """MiB placement could still hand out (on ``gpu_id``, or the best GPU)."""
        allocations = placement.load(self.config.paths.state_dir)
        rooms = [placement.room(v.sample, allocations, self.config.gpu.memory_reserve_mb)
                 for v in self._views() if gpu_id is None or v.sample.index == gpu_id]
        return max((max(0, r.available_mib) for r in rooms if r), default=0)

    def get_temperature_trend(self, duration_minutes: float = 5, gpu_id: int = 0
                              ) -> dict[str, Any]:
        view = self._view(gpu_id)
        history = self.monitor.histories.get(view.sample.uuid or f"index-{gpu_id}")
        trend = history.trend(duration_minutes, time.time()) if history else None
        return shapes.trend_dict(trend, gpu_id)

    def should_throttle_processing(self, gpu_id: int | None = None) -> bool:
        return any(v.state.should_throttle for v in self._views()
                   if gpu_id is None or v.sample.index == gpu_id)

    def get_processing_speed_multiplier(self, gpu_id: int | None = None) -> float:
        speeds = [v.state.speed_multiplier for v in self._views()
                  if gpu_id is None or v.sample.index == gpu_id]
        return min(speeds, default=0.0)

    # -- placement -----------------------------------------------------------------

    def allocate_memory(self, allocation_id: str, required_mb: int,
                        gpu_id: int | None = None) -> bool:
        return self.assign_model_to_gpu(allocation_id, required_mb, gpu_id) is not None

    def assign_model_to_gpu(self, model_name: str, required_vram_mb: int,
                            gpu_id: int | None = None) -> int | None:
        """The GPU index now holding ``model_name``'s VRAM, or None when none fits."""
        try:
            placed = placement.place(self.config.paths.state_dir, self.config.paths.run_dir,
                                     self.nvml.sample, model_name, required_vram_mb,
                                     self.config.gpu.memory_reserve_mb, gpu_index=gpu_id,
                                     now=time.time())
        except placement.NoFit:
            return None
        return placed.room.index

    def deallocate_memory(self, allocation_id: str) -> bool:
        return self.release_model(allocation_id)

    def release_model(self, model_name: str) -> bool:
        return placement.release(self.config.paths.state_dir, self.config.paths.run_dir,
                                 model_name) is not None

    # -- monitoring ----------------------------------------------------------------

    def start_monitoring(self) -> None:
        self.monitor.start()
        self._monitoring = True

    def stop_monitoring(self) -> None:
        self.monitor.stop()
        self._monitoring = False

    def register_callback(self, kind: str, fn: Callable[[GpuView], None]) -> None:
        """``fn(view)`` when a GPU enters 'normal' (or optimal), 'throttle' or 'critical';
        at the first sample after start_monitoring, for the state each GPU is in."""
        if kind not in self.monitor.callbacks:
            raise UsageError(f"unknown callback kind {kind!r}: normal, throttle or critical")
        self.monitor.callbacks[kind].append(fn)

    def update_config(self, changes: Mapping[str, Any]) -> None:
        """Change [gpu] settings (the config file's keys), validated; a bad one changes
        nothing."""
        aliases = {"memory_limit_mb": None}  # a per-card cap: placement reads NVML instead
        unknown = [k for k in changes if k in aliases]
        if unknown:
            raise UsageError(f"{unknown[0]} is not a clusterctl setting: placement reads each "
                             "GPU's memory from NVML; use memory_reserve_mb to keep some back")
        self.config = cfg.with_changes(self.config, "gpu", dict(changes))
        self.monitor.with_config(self.config)

    def shutdown(self) -> None:
        """Stop monitoring (giving back only limits this process lowered), release NVML."""
        try:
            self.stop_monitoring()
        finally:
            self.nvml.shutdown()


_manager: GpuManager | None = None
_manager_lock = threading.Lock()


def get_gpu_manager() -> GpuManager:
    """The process-wide manager (plan-only), made on first use."""
    global _manager  # noqa: PLW0603 - one NVML session per process
    with _manager_lock:
        if _manager is None:
            _manager = GpuManager()
        return _manager
