"""`clusterctl gpu status|watch|place|release|allocations|trend|health|clear-xid|throttle`."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from clusterctl import config as cfg
from clusterctl.cli.common import Run, command, emit_json
from clusterctl.errors import EXIT_FAILED, HostError, UsageError

if TYPE_CHECKING:
    from clusterctl.gpu.monitor import GpuView
    from clusterctl.host.nvml import GpuSnapshot

app = typer.Typer(help="NVIDIA GPUs through NVML: metrics, states, trends, VRAM placement, "
                  "throttling.", no_args_is_help=True)
throttle_app = typer.Typer(help="The power-limit controller ([gpu] throttle_enabled).",
                           no_args_is_help=True)
app.add_typer(throttle_app, name="throttle")

GpuOpt = Annotated[int | None, typer.Option("--gpu", metavar="N", help="Only GPU N.")]


def _views(config: cfg.Config, *, processes: bool = True
           ) -> tuple[GpuSnapshot, tuple[GpuView, ...]]:
    from clusterctl.gpu import power
    from clusterctl.gpu.monitor import view_now
    from clusterctl.host.nvml import Nvml

    records = power.load(config.paths.state_dir)
    with Nvml() as nvml:
        snapshot = nvml.sample(processes=processes)
    views = tuple(view_now(g, config, records.get(g.uuid or ""), snapshot.sampled_at)
                  for g in snapshot.gpus)
    return snapshot, views


def _no_gpu(snapshot: GpuSnapshot) -> None:
    print(f"no GPU: {snapshot.reason}" + (f"; {snapshot.fix}" if snapshot.fix else ""))


def _fmt(value: object, unit: str = "") -> str:
    return "-" if value is None else f"{value}{unit}"


def _rows(views: tuple[GpuView, ...]) -> list[list[str]]:
    rows = []
    for v in views:
        g = v.sample
        if g.lost:
            rows.append([str(g.index), g.name or "?", "LOST", "", "", "", "", g.error or ""])
            continue
        mem = (f"{g.memory_used_mib}/{g.memory_total_mib} MiB"
               if g.memory_total_mib is not None else "-")
        watts = (f"{g.power_draw_w:.0f}/{g.power_limit_w:.0f} W"
                 if g.power_draw_w is not None and g.power_limit_w is not None else "-")
        reasons = ",".join(r for r in (g.clock_event_reasons or ()) if r != "gpu_idle")
        rows.append([str(g.index), g.name or "?", _fmt(g.temperature_c, " C"),
                     _fmt(g.utilization_gpu_percent, "%"), mem, watts,
                     v.state.value + (" (power limited)" if v.throttled else ""),
                     reasons])
    return rows


HEADER = ["gpu", "name", "temp", "util", "memory", "power", "state", "clocks held by"]


def _print_table(views: tuple[GpuView, ...]) -> None:
    rows = [HEADER, *_rows(views)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@command(app, "status", json=True)
def status_cmd(run: Run, gpu: GpuOpt = None) -> None:
    """Every GPU now: utilization, memory, temperature, power, clocks, state, processes.

    --json gives the agent's /api/v1/monitoring/gpu-metrics shape with
    clusterctl's extra fields; a field the GPU does not report is null.
    """
    from clusterctl.gpu.shapes import fleet_metrics

    snapshot, views = _views(run.config)
    views = tuple(v for v in views if gpu is None or v.sample.index == gpu)
    if run.json:
        emit_json(fleet_metrics(snapshot, views))
        return
    if not snapshot.gpus:
        _no_gpu(snapshot)
        return
    print(f"driver {snapshot.driver_version}")
    _print_table(views)
    for v in views:
        for p in v.sample.processes or ():
            print(f"  gpu {v.sample.index}: pid {p.pid} {p.name or '?'} "
                  f"{_fmt(p.used_mib, ' MiB')}")


@command(app, "watch")
def watch_cmd(
    run: Run,
    interval: Annotated[float | None, typer.Option(
        "--interval", metavar="SECONDS", min=0.1,
        help="Seconds between samples (default [gpu] monitor_interval).")] = None,
    count: Annotated[int | None, typer.Option(
        "--count", metavar="N", min=1, help="Stop after N samples.")] = None,
) -> None:
    """A live table refreshed in place (Ctrl-C to stop); keeps the history `trend` reads."""
    from clusterctl.gpu.monitor import GpuMonitor
    from clusterctl.host.nvml import Nvml

    c = run.config
    every = interval if interval is not None else c.gpu.monitor_interval_s
    with Nvml() as nvml:
        monitor = GpuMonitor(c, nvml, plan_only=True, write_history=True,
                             record_events=False)
        _live(monitor, every, count)


def _live(monitor: Any, every: float, count: int | None) -> None:
    import sys

    from rich.live import Live
    from rich.table import Table

    def table() -> Table:
        t = Table(*HEADER, title=time.strftime("%H:%M:%S"))
        for row in _rows(monitor.views):
            t.add_row(*row)
        return t

    done = 0
    try:
        monitor.step()
        with Live(table(), auto_refresh=False, transient=False,
                  redirect_stdout=False) as live:
            while count is None or done + 1 < count:
                time.sleep(every)
                monitor.step()
                done += 1
                live.update(table(), refresh=True)
    except KeyboardInterrupt:
        print(file=sys.stderr)


@command(app, "place", json=True)
def place_cmd(
    run: Run,
    name: Annotated[str, typer.Argument(help="What the VRAM is for.")],
    vram: Annotated[int, typer.Option("--vram", metavar="MiB",
                                      help="VRAM to hand out, in MiB.")],
    gpu: GpuOpt = None,
) -> None:
    """Hand NAME the VRAM on the least busy GPU that can give it (exit 1 if none can).

    Placing a name again returns its GPU. Concurrent calls never oversubscribe a GPU.
    """
    from clusterctl.gpu import placement
    from clusterctl.host.nvml import Nvml

    c = run.config
    with Nvml() as nvml:
        placed = placement.place(c.paths.state_dir, c.paths.run_dir, nvml.sample, name, vram,
                                 c.gpu.memory_reserve_mb, gpu_index=gpu, now=time.time())
    a, r = placed.allocation, placed.room
    if run.json:
        emit_json({"name": a.name, "gpu": r.index, "uuid": a.gpu_uuid, "vram_mib": a.vram_mib,
                   "already_placed": placed.existing, "available_mib": r.available_mib})
        return
    again = " (already placed)" if placed.existing else ""
    print(f"{a.name} -> GPU {r.index} ({a.gpu_uuid}), {a.vram_mib} MiB{again}; "
          f"{r.explain()}")


@command(app, "release")
def release_cmd(run: Run, name: Annotated[str, typer.Argument(help="A placed name.")]) -> None:
    """Give NAME's VRAM back to the ledger."""
    from clusterctl.gpu import placement

    c = run.config
    released = placement.release(c.paths.state_dir, c.paths.run_dir, name)
    if released is None:
        print(f"{name} was not placed")
    else:
        print(f"released {name}: {released.vram_mib} MiB on GPU {released.gpu_index}")


@command(app, "allocations", json=True)
def allocations_cmd(run: Run) -> None:
    """The placement ledger, and what each GPU can still give."""
    from clusterctl.gpu import placement

    c = run.config
    allocations = placement.load(c.paths.state_dir)
    snapshot, _ = _views(c, processes=False)
    rooms = [placement.room(g, allocations, c.gpu.memory_reserve_mb) for g in snapshot.gpus]
    if run.json:
        emit_json({"allocations": [{"name": a.name, "gpu": a.gpu_index, "uuid": a.gpu_uuid,
                                    "vram_mib": a.vram_mib, "placed_at": a.placed_at}
                                   for a in allocations],
                   "gpus": [{"gpu": r.index, "uuid": r.uuid, "free_mib": r.free_mib,
                             "pending_mib": r.pending_mib, "reserve_mib": r.reserve_mib,
                             "available_mib": r.available_mib} for r in rooms if r]})
        return
    for a in allocations:
        print(f"{a.name}: {a.vram_mib} MiB on GPU {a.gpu_index} ({a.gpu_uuid})")
    if not allocations:
        print("no allocations")
    for r in rooms:
        if r:
            print(r.explain())


@command(app, "trend", json=True)
def trend_cmd(
    run: Run,
    gpu: Annotated[int, typer.Option("--gpu", metavar="N")] = 0,
    minutes: Annotated[float, typer.Option("--minutes", min=0.05)] = 5.0,
    sample: Annotated[float | None, typer.Option(
        "--sample", metavar="SECONDS", min=1,
        help="Sample now for this long instead of reading the running monitor's "
        "history.")] = None,
) -> None:
    """Temperature over the last minutes: current, average, min, max, rising/falling/stable."""
    from clusterctl.gpu.history import History
    from clusterctl.gpu.monitor import GpuMonitor, load_history
    from clusterctl.gpu.shapes import trend_dict
    from clusterctl.host.nvml import Nvml
    from clusterctl.system import statefile

    c = run.config
    with Nvml() as nvml:
        if sample:
            monitor = GpuMonitor(c, nvml, plan_only=True, record_events=False)
            deadline = time.monotonic() + sample
            while True:
                monitor.step()
                if time.monotonic() >= deadline:
                    break
                time.sleep(min(c.gpu.monitor_interval_s, sample))
            histories = monitor.histories
        else:
            histories = load_history(c.paths.run_dir, c.gpu.history_size,
                                     record=statefile.events_to(
                                         c.paths.state_dir, cfg.instance_id(c)))
        uuid = next((g.uuid for g in nvml.sample().gpus if g.index == gpu), None)
    history = histories.get(uuid or f"index-{gpu}") or History(1)
    data = trend_dict(history.trend(minutes, time.time()), gpu)
    if run.json:
        emit_json(data)
    elif data["samples"] == 0:
        print(f"no samples of GPU {gpu} in the last {minutes:g} min: run the agent or "
              "`clusterctl gpu watch`, or use --sample SECONDS")
    else:
        print(f"GPU {gpu}: {data['current_temp']} C now, {data['avg_temp']} C average "
              f"({data['min_temp']}-{data['max_temp']}) over {minutes:g} min: {data['trend']} "
              f"({data['slope_c_per_min']:+} C/min, {data['samples']} samples)")


@command(app, "health", json=True)
def health_cmd(run: Run) -> None:
    """Healthy when every GPU answers and is below [gpu] temp_critical; exit 1 if not."""
    from clusterctl.gpu.shapes import health

    c = run.config
    snapshot, views = _views(c, processes=False)
    result = health(views, c.gpu.temp_critical_c, snapshot.reason)
    if run.json:
        emit_json(result)
    else:
        print(f"gpu_status: {result['status']}")
        for problem in result["problems"]:
            print(f"  {problem}")
    if result["status"] == "unhealthy":
        raise typer.Exit(EXIT_FAILED)


@command(app, "clear-xid")
def clear_xid_cmd(
    run: Run,
    gpu: Annotated[int | None, typer.Option("--gpu", metavar="N", min=0,
                                            help="The GPU whose fatal XID to clear.")] = None,
    every: Annotated[bool, typer.Option("--all", help="Every GPU's.")] = False,
) -> None:
    """Clear a GPU's unrecovered fatal XID once it has been dealt with (reset, drained).

    /healthz and placement take the GPU back within one agent step; a gpu_xid_cleared
    event records who cleared which XID. An agent restart does not clear one. With
    several GPUs held and neither --gpu nor --all, nothing is cleared.
    """
    import getpass
    import os

    from clusterctl.gpu import xid_ledger
    from clusterctl.system import statefile

    c = run.config
    try:
        who = getpass.getuser()
    except (KeyError, OSError):  # a uid without a name
        who = f"uid {os.getuid()}"
    sudo = os.environ.get("SUDO_USER")
    by = f"{sudo} (sudo)" if sudo and sudo != who else who
    cleared = xid_ledger.clear(c.paths.state_dir, c.paths.run_dir, gpu=gpu, every=every,
                               by=by, now=time.time(),
                               record=statefile.events_to(c.paths.state_dir,
                                                          cfg.instance_id(c)))
    for f in cleared:
        print(f"cleared fatal XID {f.xid} on GPU {f.index} ({f.uuid or 'no UUID'}), "
              f"{f.info.meaning}; placement on it again")
    if cleared:
        return
    if gpu is not None:
        _known_gpu(gpu)
        print(f"GPU {gpu} has no unrecovered fatal XID: nothing to clear")
    else:
        print("no GPU has an unrecovered fatal XID: nothing to clear")


def _known_gpu(index: int) -> None:
    """UsageError when NVML lists GPUs and ``index`` is not one of them (without NVML,
    nothing to say)."""
    from clusterctl.host.nvml import Nvml

    with Nvml() as nvml:
        snapshot = nvml.sample(processes=False)
    indices = sorted(g.index for g in snapshot.gpus)
    if indices and index not in indices:
        raise UsageError(f"--gpu {index}: this node has GPUs {indices[0]}-{indices[-1]}")


@command(throttle_app, "status", json=True)
def throttle_status_cmd(run: Run) -> None:
    """Whether throttling is on, and every GPU whose limit clusterctl holds lowered."""
    from clusterctl.gpu import power

    c = run.config
    records = power.load(c.paths.state_dir)
    if run.json:
        emit_json({"enabled": c.gpu.throttle_enabled,
                   "lowered": [{"uuid": r.uuid, "original_limit_w": r.original_limit_w,
                                "limit_w": r.limit_w, "changed_at": r.changed_at}
                               for r in records.values()]})
        return
    print(f"throttling {'on' if c.gpu.throttle_enabled else 'off'} ([gpu] throttle_enabled)")
    for r in records.values():
        print(f"  {r.uuid}: {r.limit_w:.0f} W (original {r.original_limit_w:.0f} W)")
    if not records:
        print("  no power limit lowered by clusterctl")


@command(throttle_app, "plan", json=True)
def throttle_plan_cmd(run: Run) -> None:
    """What the controller would do with each GPU now; changes nothing on any GPU."""
    c = run.config
    _, views = _views(c, processes=False)
    plans = [{"gpu": v.sample.index, "uuid": v.sample.uuid, "state": v.state.value,
              "temperature_c": v.sample.temperature_c, "power_limit_w": v.sample.power_limit_w,
              "move": v.decision.move if v.decision else "hold",
              "limit_w": v.decision.limit_w if v.decision else None,
              "reason": v.decision.reason if v.decision else "lost"} for v in views]
    if run.json:
        emit_json({"enabled": c.gpu.throttle_enabled, "plan": plans})
        return
    for p in plans:
        target = f" -> {p['limit_w']:.0f} W" if p["limit_w"] is not None else ""
        print(f"GPU {p['gpu']}: {p['state']}, {_fmt(p['temperature_c'], ' C')}, "
              f"{_fmt(p['power_limit_w'], ' W')}: {p['move']}{target} ({p['reason']})")
    if not c.gpu.throttle_enabled:
        print("throttling is off: nothing would be applied ([gpu] throttle_enabled = false)")


@command(throttle_app, "reset")
def throttle_reset_cmd(run: Run) -> None:
    """Give every GPU whose limit clusterctl lowered its original limit back now."""
    from clusterctl.gpu import power
    from clusterctl.host.nvml import Nvml

    c = run.config
    if not power.load(c.paths.state_dir):
        print("no power limit lowered by clusterctl: nothing to reset")
        return
    with Nvml() as nvml:
        snapshot = nvml.sample()
        for line in power.restore_all(nvml, c.paths.state_dir,
                                      {g.uuid: g.index for g in snapshot.gpus if g.uuid}):
            print(line)
    left = power.load(c.paths.state_dir)
    if left:
        raise HostError(f"{len(left)} GPU power limit(s) not given back; their originals stay "
                        "on record", fix="see the lines above (run as root?), then `clusterctl "
                        "gpu throttle reset` again")
