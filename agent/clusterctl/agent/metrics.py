"""Prometheus metrics: dcgm-exporter's names and labels for the GPUs, clusterctl_* for
the rest. Built on each scrape from the agent's latest sample (prometheus_client).

The textfile for node_exporter is written only into a directory that root alone can
write (not a link, not group- or other-writable), through a fresh temporary name and a
rename: a planted link can neither redirect the write nor receive the file.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from clusterctl import system
from clusterctl.errors import HostError
from clusterctl.host.trust import untrusted_ancestor

if TYPE_CHECKING:
    from clusterctl.agent.service import Agent

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
)


class AgentCollector:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.hostname = socket.gethostname()

    def collect(self) -> Iterator[Any]:
        agent = self.agent
        views = agent.monitor.views
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
        memory, swap = agent.summaries()
        yield _gauge("clusterctl_memory_used_percent", "RAM in use (total - available).",
                     memory["used_percent"])
        yield _gauge("clusterctl_swap_total_bytes", "Swap configured on the node.",
                     swap["total_bytes"])
        yield _gauge("clusterctl_swap_used_bytes", "Swap in use on the node.",
                     swap["used_bytes"])
        steps = CounterMetricFamily("clusterctl_swap_pressure_steps",
                                    "Swap policy steps run on a memory pressure trigger.")
        steps.add_metric([], agent.progress.swap_steps)
        yield steps
        delivery = agent.delivery
        ok = None if delivery is None else delivery.state.last_heartbeat_ok
        yield _gauge("clusterctl_heartbeat_ok", "1 if the last heartbeat was acknowledged.",
                     None if ok is None else float(ok))
        at = None if delivery is None else delivery.state.last_heartbeat_at
        yield _gauge("clusterctl_heartbeat_last_success_timestamp_seconds",
                     "When the control plane last acknowledged a heartbeat.", at)
        sent = CounterMetricFamily("clusterctl_events_sent", "Events the control plane took.")
        sent.add_metric([], 0 if delivery is None else delivery.state.events_sent)
        yield sent
        yield _gauge("clusterctl_outbox_unsent_bytes", "Event log bytes not yet acknowledged.",
                     agent.outbox.unsent_bytes() if agent.config.heartbeat.control_url else 0)
        skipped = CounterMetricFamily("clusterctl_outbox_skipped_lines",
                                      "Lines in the event log that are not events, passed over.")
        skipped.add_metric([], agent.outbox.skipped_lines)
        yield skipped
        errors = CounterMetricFamily("clusterctl_loop_errors",
                                     "Unexpected failures in the agent's loops (each retried).",
                                     labels=["loop"])
        for loop, count in sorted(agent.loop_errors.items()):
            errors.add_metric([loop], count)
        yield errors
        yield _gauge("clusterctl_agent_start_time_seconds", "When the agent started.",
                     time.time() - (time.monotonic() - agent.started_monotonic))


def _gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc)
    if value is not None:
        family.add_metric([], float(value))
    return family


def registry_for(agent: Agent) -> CollectorRegistry:
    cached = getattr(agent, "_registry", None)
    if cached is None:
        cached = CollectorRegistry(auto_describe=False)
        cached.register(AgentCollector(agent))
        agent._registry = cached  # type: ignore[attr-defined]
    return cached


def render(agent: Agent) -> tuple[bytes, str]:
    return generate_latest(registry_for(agent)), CONTENT_TYPE_LATEST


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


def write_textfile(agent: Agent, directory: Path) -> None:
    """For node_exporter's textfile collector (it reads *.prom): atomically, 0644, and only
    into a directory that passes ``check_textfile_dir``; HostError otherwise."""
    check_textfile_dir(directory)
    text = generate_latest(registry_for(agent)).decode()
    system.atomic_write_text(directory / TEXTFILE, text, mode=0o644, keep_owner=False,
                             durable=False)  # each GPU sample: no fsync on the hot path
