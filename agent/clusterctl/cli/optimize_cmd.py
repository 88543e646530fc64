"""`clusterctl optimize plan|apply|verify|revert`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

import typer

from clusterctl.cli.common import DryRunOpt, Run, command, emit_json
from clusterctl.errors import EXIT_FAILED

if TYPE_CHECKING:
    from clusterctl.optimize.plan import OptimizeFacts, OptimizePlan, Setting

app = typer.Typer(help="sysctl, Dask and Ollama settings chosen from the hardware; revertible.",
                  no_args_is_help=True)


def plan_dict(facts: OptimizeFacts, plan: OptimizePlan) -> dict[str, Any]:
    """The `optimize plan --json` object; `check --json` lists the same settings."""
    from clusterctl.optimize.plan import setting_dict

    return {
        "tier": plan.tier,
        "settings": [setting_dict(s) for s in plan.settings],
        "files": [{"path": f.path, "changes": facts.files_now.get(f.path) != f.content,
                   "restarts": f.restarts} for f in plan.files],
        "skipped": list(plan.skipped),
        "overridden": [{"key": o.key, "file": o.path, "value": o.value}
                       for o in plan.overridden],
    }


def setting_lines(settings: Sequence[Setting]) -> list[str]:
    """One line per setting, * where it would change: `optimize plan` and `check` alike."""
    width = max((len(s.key) for s in settings), default=10)
    lines = []
    for s in settings:
        now = "not set" if s.current is None else s.current
        mark = "*" if s.changes else " "
        advice = "" if s.applied_by else " (advice)"
        lines.append(f"{mark} {s.key:<{width}}  {s.value:<22} now {now:<22} {s.reason}{advice}")
    return lines


def _print_plan(facts: OptimizeFacts, plan: OptimizePlan) -> None:
    gpus = len(facts.gpu_vram_bytes)
    print(f"{plan.tier} tier: {facts.logical_cores} cores, "
          f"{facts.ram_bytes / 2**30:.1f}G RAM, {gpus} GPU{'s' if gpus != 1 else ''}")
    for line in setting_lines(plan.settings):
        print(line)
    for f in plan.files:
        state = "to write" if facts.files_now.get(f.path) != f.content else "up to date"
        print(f"file {f.path}: {state}")
    for line in plan.skipped:
        print(f"skipped {line}")
    if not any(s.changes for s in plan.settings):
        print("nothing to change")


@command(app, "plan", json=True)
def plan_cmd(run: Run) -> None:
    """The settings for this hardware, the value of each now, and why (changes nothing).

    Lines marked * would change. A sysctl set by a later file in /etc/sysctl.d
    is reported and left to that file (it wins at boot).
    """
    from clusterctl.host import Nvml
    from clusterctl.optimize import executor as optimize

    config = run.config
    with Nvml() as nvml:
        facts, plan = optimize.plan_now(config, nvml=nvml)
    if run.json:
        emit_json(plan_dict(facts, plan))
    else:
        _print_plan(facts, plan)


@command(app, "apply", json=True)
def apply_cmd(run: Run, dry_run: DryRunOpt = False) -> None:
    """Write the files, set the sysctls live, restart Ollama/Dask only if they run and changed.

    The first change saves every original value under the state dir;
    `clusterctl optimize revert` puts them back.
    """
    from clusterctl.host import Nvml
    from clusterctl.optimize import executor as optimize

    config = run.config
    with Nvml() as nvml:
        result = optimize.apply(config, nvml=nvml, dry_run=dry_run)
    if run.json:
        emit_json({"dry_run": dry_run, "written": list(result.written),
                   "sysctl": result.set_live, "restarted": list(result.restarted),
                   "notes": list(result.notes), "skipped": list(result.plan.skipped)})
        return
    verb = "would " if dry_run else ""
    for path in result.written:
        print(f"{verb}write {path}")
    for key, value in result.set_live.items():
        print(f"{verb}set {key} = {value}")
    for unit in result.restarted:
        print(f"restarted {unit}")
    for note in result.notes:
        print(note)
    if not result.written and not result.set_live:
        print("nothing to change")


@command(app, "verify", json=True)
def verify_cmd(run: Run) -> None:
    """Drift between what apply set and what is live now; exit 1 if any."""
    from clusterctl.optimize import executor as optimize

    drift = optimize.verify(run.config)
    if run.json:
        emit_json({"drift": [{"what": d.what, "applied": d.applied, "now": d.now}
                             for d in drift]})
    else:
        for d in drift:
            print(f"drift: {d.what}: applied {d.applied}, now {d.now or 'missing'}")
        if not drift:
            print("no drift: everything apply set is still in effect")
    if drift:
        raise typer.Exit(EXIT_FAILED)


@command(app, "revert", json=True)
def revert_cmd(run: Run, dry_run: DryRunOpt = False) -> None:
    """Put back every original value, remove the files apply created, restart what it touched."""
    from clusterctl.optimize import executor as optimize

    result = optimize.revert(run.config, dry_run=dry_run)
    if run.json:
        emit_json({"dry_run": dry_run, "sysctl": result.restored_sysctl,
                   "restored": list(result.restored_files),
                   "removed": list(result.removed_files),
                   "restarted": list(result.restarted), "notes": list(result.notes)})
        return
    if not (result.restored_sysctl or result.restored_files or result.removed_files):
        print("nothing to revert: optimize apply has changed nothing here")
        return
    verb = "would " if dry_run else ""
    for key, value in result.restored_sysctl.items():
        print(f"{verb}restore {key} = {value}")
    for path in result.restored_files:
        print(f"{verb}restore {path}")
    for path in result.removed_files:
        print(f"{verb}remove {path}")
    for unit in result.restarted:
        print(f"restarted {unit}")
    for note in result.notes:
        print(note)


@command(app, "free-memory", json=True)
def free_memory_cmd(run: Run, dry_run: DryRunOpt = False) -> None:
    """Drop the page cache, compact memory, unload Ollama's models; report MiB freed.

    Models are unloaded from memory (keep_alive 0), never deleted from disk.
    """
    from clusterctl.optimize.emergency import free_memory

    result = free_memory(run.config, dry_run=dry_run)
    mib = 2**20
    before, after = result.available_before_bytes // mib, result.available_after_bytes // mib
    if run.json:
        emit_json({"dry_run": dry_run, "freed_mib": after - before,
                   "available_before_mib": before, "available_after_mib": after,
                   "steps": list(result.steps),
                   "unloaded": [{"name": m.name, "size_bytes": m.size_bytes,
                                 "vram_bytes": m.vram_bytes} for m in result.unloaded],
                   "notes": list(result.notes)})
        return
    for step in result.steps:
        print(step)
    for note in result.notes:
        print(f"note: {note}")
    if not dry_run:
        vram = sum(m.vram_bytes for m in result.unloaded) // mib
        print(f"freed {after - before} MiB of RAM (available {before} -> {after} MiB)"
              + (f" and {vram} MiB of VRAM" if vram else ""))


@command(app, "monitor", json=True)
def monitor_cmd(
    run: Run,
    once: Annotated[bool, typer.Option("--once", help="One sample and its actions, then exit."
                                       )] = False,
    interval: Annotated[float, typer.Option("--interval", metavar="SECONDS", min=1,
                                            help="Seconds between samples.")] = 10.0,
    dry_run: DryRunOpt = False,
) -> None:
    """The emergency measures: fewer Dask workers under sustained CPU load, more swap and
    freed memory over memory_threshold, clusterctl's old files (and the caches you listed)
    removed when the disk is full. Every action is an event; see [optimize] in the config.
    """
    import time

    from clusterctl.optimize.monitor import run_once, sample_dict

    while True:
        sample, actions, done = run_once(run.config, dry_run=dry_run)
        if run.json:
            emit_json({"sample": sample_dict(sample),
                       "actions": [{"action": a.kind, "reason": a.reason} for a in actions],
                       "done": [{"action": d.action.kind, "did": list(d.did),
                                 "notes": list(d.notes)} for d in done]})
        else:
            cpu, mem, disk = (f"{v:.0f}%" if v is not None else "?" for v in
                              (sample.cpu_percent, sample.memory_percent, sample.disk_percent))
            print(f"cpu {cpu}, memory {mem}, disk {disk}, dask workers "
                  f"{sample.dask_workers if sample.dask_workers is not None else '-'}")
            for action in actions:
                print(f"{'would ' if dry_run else ''}{action.kind}: {action.reason}")
            for item in done:
                for line in item.did:
                    print(f"  {line}")
                for note in item.notes:
                    print(f"  note: {note}")
        if once:
            return
        time.sleep(interval)
