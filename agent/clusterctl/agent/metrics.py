"""Prometheus metrics: dcgm-exporter's names and labels for the GPUs, clusterctl_* for
the rest. Built on each scrape from one snapshot of the agent (prometheus_client): a
``Metrics`` is a registry with one collector over a snapshot function.

The textfile for node_exporter is written only into a directory that root alone can
write (not a link, not group- or other-writable), through a fresh temporary name and a
rename: a planted link can neither redirect the write nor receive the file.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from clusterctl import system
from clusterctl.errors import HostError
from clusterctl.gpu import xid_ledger
from clusterctl.host.trust import untrusted_ancestor

if TYPE_CHECKING:
    from clusterctl.agent.service import AgentSnapshot

TEXTFILE = "clusterctl.prom"
GPU_LABELS = ["gpu", "UUID", "modelName", "pci_bus_id", "Hostname"]
STATES = ("optimal", "normal", "throttled", "critical")
# (dcgm-exporter name, help, GpuSample attribute, scale)
DCGM = (
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", "utilization_gpu_percent", 1),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "Memory utilization (in %).", "utilization_memory_percent",
     1),
    ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", "memory_free_mib", 1),
    ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", "memory_used_mib", 1),
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", "temperature_c", 1),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", "power_draw_w", 1),
    ("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", "clock_sm_mhz", 1),
    ("DCGM_FI_DEV_MEM_CLOCK", "Memory clock frequency (in MHz).", "clock_memory_mhz", 1),
    ("DCGM_FI_DEV_POWER_MGMT_LIMIT", "Current power limit (in W).", "power_limit_w", 1),
    ("DCGM_FI_DEV_FAN_SPEED", "Fan speed (in %).", "fan_percent", 1),
    ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "Uncorrectable remapped rows.",
     "remapped_rows_uncorrectable", 1),
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "Total energy consumption since boot (in mJ).",
     "energy_total_mj", 1),
    ("DCGM_FI_DEV_ENC_UTIL", "Encoder utilization (in %).", "encoder_utilization_percent", 1),
    ("DCGM_FI_DEV_DEC_UTIL", "Decoder utilization (in %).", "decoder_utilization_percent", 1),
    ("DCGM_FI_DEV_MEMORY_TEMP", "Memory temperature (in C).", "memory_temperature_c", 1),
    ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "Total number of PCIe retries.", "pcie_replay_count",
     1),
    ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "Number of remapped rows for correctable errors.",
     "remapped_rows_correctable", 1),
    ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "Whether remapping of rows has failed.", "remap_failure",
     1),
    ("DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
     "NVLink bytes sent and received over all links since the driver loaded.",
     "nvlink_bytes_total", 1),
    ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "Ratio of time the graphics engine is active.",
     "gpm_graphics_activity", 1),
    ("DCGM_FI_PROF_SM_ACTIVE", "The ratio of cycles an SM has at least 1 warp assigned.",
     "gpm_sm_activity", 1),
    ("DCGM_FI_PROF_SM_OCCUPANCY", "The ratio of warps resident on an SM to its maximum.",
     "gpm_sm_occupancy", 1),
    ("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "Ratio of cycles the tensor pipes are active.",
     "gpm_tensor_activity", 1),
    ("DCGM_FI_PROF_DRAM_ACTIVE",
     "Ratio of cycles the device memory interface is active sending or receiving data.",
     "gpm_dram_activity", 1),
)


class SnapshotCollector:
    """Every metric, from one ``snapshot()`` per collection."""

    def __init__(self, snapshot: Callable[[], AgentSnapshot]) -> None:
        self.snapshot = snapshot
        self.hostname = socket.gethostname()

    def collect(self) -> Iterator[Any]:
        snap = self.snapshot()
        if snap.memory is None or snap.swap is None or snap.outbox_unsent_bytes is None:
            raise HostError(f"metrics unavailable: {snap.unreadable}")  # a 500, counted
        views = snap.views
        families = {name: GaugeMetricFamily(name, doc, labels=GPU_LABELS)
                    for name, doc, _, _ in DCGM}
        state = GaugeMetricFamily("clusterctl_gpu_state", "1 for the GPU's current state.",
                                  labels=[*GPU_LABELS, "state"])
        speed = GaugeMetricFamily("clusterctl_gpu_speed_multiplier",
                                  "Processing speed advised by the GPU's state (1.0-0.0).",
                                  labels=GPU_LABELS)
        limited = GaugeMetricFamily("clusterctl_gpu_power_limited",
                                    "1 while clusterctl holds the power limit lowered.",
                                    labels=GPU_LABELS)
        lost = GaugeMetricFamily("clusterctl_gpu_lost", "1 when the GPU fell off the bus.",
                                 labels=GPU_LABELS)
        for view in views:
            g = view.sample
            labels = [str(g.index), g.uuid or "", g.name or "", g.pci_bus_id or "",
                      self.hostname]
            for name, _, attribute, scale in DCGM:
                value = getattr(g, attribute)
                if value is not None:  # unsupported: no sample, never a made-up 0
                    families[name].add_metric(labels, float(value) * scale)
            for s in STATES:
                state.add_metric([*labels, s], 1.0 if view.state.value == s else 0.0)
            speed.add_metric(labels, view.state.speed_multiplier)
            limited.add_metric(labels, 1.0 if view.throttled else 0.0)
            lost.add_metric(labels, 1.0 if g.lost else 0.0)
        yield from families.values()
        yield from (state, speed, limited, lost)
        yield from _energy(snap, self.hostname)
        yield from _xids(snap, self.hostname)
        memory, swap = snap.memory, snap.swap
        yield _gauge("clusterctl_memory_used_percent", "RAM in use (total - available).",
                     memory["used_percent"])
        yield _gauge("clusterctl_swap_total_bytes", "Swap configured on the node.",
                     swap["total_bytes"])
        yield _gauge("clusterctl_swap_used_bytes", "Swap in use on the node.",
                     swap["used_bytes"])
        yield _gauge("clusterctl_swap_growth_blocked",
                     "1 while swap needs to grow and cannot (see clusterctl swap status).",
                     1.0 if swap.get("growth_blocked") else 0.0)
        steps = CounterMetricFamily("clusterctl_swap_pressure_steps",
                                    "Swap policy steps run on a memory pressure trigger.")
        steps.add_metric([], snap.progress.swap_steps)
        yield steps
        delivery = snap.delivery
        ok = None if delivery is None else delivery.last_heartbeat_ok
        yield _gauge("clusterctl_heartbeat_ok", "1 if the last heartbeat was acknowledged.",
                     None if ok is None else float(ok))
        at = None if delivery is None else delivery.last_heartbeat_at
        yield _gauge("clusterctl_heartbeat_last_success_timestamp_seconds",
                     "When the control plane last acknowledged a heartbeat.", at)
        sent = CounterMetricFamily("clusterctl_events_sent", "Events the control plane took.")
        sent.add_metric([], 0 if delivery is None else delivery.events_sent)
        yield sent
        yield _gauge("clusterctl_outbox_unsent_bytes", "Event log bytes not yet acknowledged.",
                     snap.outbox_unsent_bytes)
        skipped = CounterMetricFamily("clusterctl_outbox_skipped_lines",
                                      "Lines in the event log that are not events, passed over.")
        skipped.add_metric([], snap.outbox_skipped_lines)
        yield skipped
        errors = CounterMetricFamily("clusterctl_loop_errors",
                                     "Unexpected failures in the agent's loops (each retried).",
                                     labels=["loop"])
        for loop, count in sorted(snap.loop_errors.items()):
            errors.add_metric([loop], count)
        yield errors
        yield _gauge("clusterctl_agent_start_time_seconds", "When the agent started.",
                     snap.started_at)


def _energy(snap: AgentSnapshot, hostname: str) -> tuple[Any, ...]:
    """Per GPU, the joules spent busy and idle since boot, and the mean idle draw."""
    joules = CounterMetricFamily(
        "clusterctl_gpu_energy_joules", "Energy the GPU used since boot, busy and idle "
        "(idle: utilization under [hibernate] gpu_usage_threshold).",
        labels=[*GPU_LABELS, "state"])
    idle_power = GaugeMetricFamily("clusterctl_gpu_idle_power_watts",
                                   "The GPU's mean power draw while idle.", labels=GPU_LABELS)
    for view in snap.views:
        g = view.sample
        spent = None if snap.energy is None else snap.energy.of(g)
        if spent is None or spent.source is None:
            continue  # nothing measured yet: no sample, never a made-up 0
        labels = [str(g.index), g.uuid or "", g.name or "", g.pci_bus_id or "", hostname]
        joules.add_metric([*labels, "busy"], spent.busy_j)
        joules.add_metric([*labels, "idle"], spent.idle_j)
        if spent.idle_power_w is not None:
            idle_power.add_metric(labels, spent.idle_power_w)
    return joules, idle_power


def _gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc)
    if value is not None:
        family.add_metric([], float(value))
    return family


def _xids(snap: AgentSnapshot, hostname: str) -> tuple[Any, ...]:
    """Per GPU: the last XID code (dcgm-exporter's gauge: 0 on a watched GPU that had none,
    absent where XIDs are not watched), XIDs by code since the agent started, and the
    fatal XID the GPU is held for (a series only while it is)."""
    last = GaugeMetricFamily("DCGM_FI_DEV_XID_ERRORS",
                             "Value of the last XID error encountered.", labels=GPU_LABELS)
    total = CounterMetricFamily("clusterctl_gpu_xid_errors", "XID errors seen, by code.",
                                labels=[*GPU_LABELS, "xid"])
    unrecovered = GaugeMetricFamily(
        "clusterctl_gpu_xid_unrecovered", "1 while the GPU is held out of placement for a "
        "fatal XID (absent otherwise): until it recovers or clusterctl gpu clear-xid",
        labels=[*GPU_LABELS, "xid"])
    for view in snap.views:
        g = view.sample
        labels = [str(g.index), g.uuid or "", g.name or "", g.pci_bus_id or "", hostname]
        seen = snap.xids.of(g.index, g.uuid)
        if seen is not None and seen.last is not None:
            last.add_metric(labels, float(seen.last))
        elif g.index in snap.xids.watched:
            last.add_metric(labels, 0.0)
        for code, count in () if seen is None else seen.counts:
            total.add_metric([*labels, "other" if code == xid_ledger.OTHER else str(code)],
                             count)
        held = None if seen is None else seen.fatal
        if held is not None:
            unrecovered.add_metric([*labels, str(held.xid)], 1.0)
    return last, total, unrecovered


class Metrics:
    """The agent's metrics: a registry of its own with one collector over ``snapshot``.

    The values change once per GPU sample, so the agent renders them once per sample
    (``refresh``) and every scrape and the textfile get those bytes; before the first
    refresh, or after one failed, a scrape renders them itself."""

    def __init__(self, snapshot: Callable[[], AgentSnapshot]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(snapshot))
        self._kept: bytes | None = None
        self._rendering = threading.Lock()  # the GPU step and the XID thread both refresh

    def refresh(self) -> bytes:
        """Render now and keep the bytes for the scrapes until the next refresh (one render
        at a time, so an older, slower one never replaces a newer one)."""
        with self._rendering:
            self._kept = None  # a failed render is not answered with the last good one
            self._kept = text = generate_latest(self.registry)
            return text

    def text(self) -> bytes:
        kept = self._kept
        return kept if kept is not None else generate_latest(self.registry)

    def render(self) -> tuple[bytes, str]:
        """The body and Content-Type of a scrape."""
        return self.text(), CONTENT_TYPE_LATEST


def check_textfile_dir(directory: Path) -> None:
    """HostError unless ``directory`` is a real directory that only root (or we) can write."""
    try:
        st = directory.lstat()
    except FileNotFoundError as err:
        raise HostError(f"textfile_dir {directory} does not exist",
                        fix=f"create it (install -d -m 0755 {directory}) or fix [api] "
                        "textfile_dir") from err
    except OSError as err:
        raise HostError(f"cannot use textfile_dir {directory}: {err.strerror}") from err
    if stat.S_ISLNK(st.st_mode):
        raise HostError(f"textfile_dir {directory} is a symbolic link: whoever can change it "
                        "could redirect the metrics file", fix="set [api] textfile_dir to the "
                        "real directory")
    if not stat.S_ISDIR(st.st_mode):
        raise HostError(f"textfile_dir {directory} is not a directory",
                        fix="fix [api] textfile_dir")
    if st.st_uid not in (0, os.geteuid()):
        raise HostError(f"textfile_dir {directory} is owned by uid {st.st_uid}, not root: "
                        "its owner could redirect the metrics file", fix=f"chown root {directory}")
    if st.st_mode & 0o022:
        raise HostError(f"textfile_dir {directory} is writable by group or others (mode "
                        f"{stat.S_IMODE(st.st_mode):04o}): they could redirect the metrics file",
                        fix=f"chmod go-w {directory}")
    above = untrusted_ancestor(directory.parent)
    if above:
        raise HostError(f"textfile_dir {directory} is under a directory another user controls: "
                        f"{above}", fix="use a directory whose parents are all root's")


def write_textfile(metrics: Metrics, directory: Path) -> None:
    """For node_exporter's textfile collector (it reads *.prom): atomically, 0644, and only
    into a directory that passes ``check_textfile_dir``; HostError otherwise."""
    check_textfile_dir(directory)
    text = metrics.text().decode()
    system.atomic_write_text(directory / TEXTFILE, text, mode=0o644, keep_owner=False,
                             durable=False)  # each GPU sample: no fsync on the hot path
