"""`clusterctl check [quick|full]`: the resource checker, rendered."""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from clusterctl.cli.common import Run, emit_json
from clusterctl.errors import EXIT_FAILED
from clusterctl.units import format_size

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from clusterctl.check.report import Finding
    from clusterctl.check.run import Report
    from clusterctl.host import HostFacts

# rich, the host readers and the checker load when `check` runs, not when any
# other command (or --help) starts.


class CheckMode(str, enum.Enum):
    quick = "quick"
    full = "full"


def check(
    run: Run,
    mode: Annotated[
        CheckMode, typer.Argument(help="quick: facts and judgement; full: adds a write test.")
    ] = CheckMode.quick,
    root: Annotated[
        Path, typer.Option("--root", hidden=True, help="Read the host under this directory.")
    ] = Path("/"),
) -> None:
    """Check this node: hardware tier, score, findings and recommendations.

    Exits 1 when the host is below the minimum (fewer than 2 cores, under
    4 GiB RAM, under 10 GiB free for the swap dir, a swap dir that cannot
    hold swap files).
    """
    from rich.console import Console

    from clusterctl.check.run import report_dict, run_check
    from clusterctl.host import Nvml

    config = run.config
    with Nvml() as nvml, _progress(enabled=mode == CheckMode.full) as progress:
        facts, report = run_check(
            config, root=root, mode=mode.value, nvml=nvml, progress=progress
        )
    if run.json:
        emit_json(report_dict(facts, report))
    else:
        render(facts, report, Console(highlight=False))
    if not report.ready:
        raise typer.Exit(EXIT_FAILED)


@contextmanager
def _progress(*, enabled: bool) -> Iterator[Callable[[int], None] | None]:
    """A write-test progress bar on stderr when it is a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from clusterctl.check.run import WRITE_TEST_BYTES

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task("write test", total=WRITE_TEST_BYTES)
        yield lambda done: bar.update(task, completed=done)


_SEVERITY_STYLE = {"fail": "bold red", "warn": "yellow", "info": "cyan"}


def render(facts: HostFacts, report: Report, console: Console) -> None:
    from rich.text import Text

    from clusterctl.cli.optimize_cmd import setting_lines

    hostname = facts.system.hostname or "this host"
    verdict = "[green]ready[/]" if report.ready else "[bold red]below the minimum[/]"
    console.print(
        f"[bold]{hostname}[/]: tier [bold]{report.tier}[/], score [bold]{report.score}[/]/100, "
        f"{verdict}"
    )
    console.print("\n[bold]Facts[/]")
    console.print(_facts_table(facts, report))
    console.print(f"\n[bold]Score {report.score}/100[/]")
    console.print(_score_table(report))
    console.print(f"\n[bold]Recommended for the {report.tier} tier[/]: what `clusterctl "
                  "optimize apply` would set (* differs from now)", soft_wrap=True)
    for line in setting_lines(report.recommendations):
        console.print(Text(line), soft_wrap=True)
    for line in report.recommendations_skipped:
        console.print(Text(f"skipped {line}"), soft_wrap=True)
    if report.findings:
        console.print("\n[bold]Findings[/]")
        for finding in report.findings:
            console.print(_finding_line(finding), soft_wrap=True)


def _facts_table(facts: HostFacts, report: Report) -> Table:
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    cpu, mem = facts.cpu, facts.memory
    physical = f" ({cpu.physical_cores} physical)" if cpu.physical_cores else ""
    busy = f", {cpu.usage_percent:.0f}% busy" if cpu.usage_percent is not None else ""
    load = f", load {cpu.load_1m:.2f}" if cpu.load_1m is not None else ""
    _add(table, "CPU", f"{cpu.logical_cores} cores{physical}{busy}{load}"
                  + (f" - {cpu.model}" if cpu.model else ""))
    _add(table, "Memory", f"{format_size(mem.total_bytes)} total, "
                  f"{format_size(mem.used_bytes)} used ({mem.used_percent or 0:.0f}%)")
    swap = (
        ", ".join(f"{a.path} {format_size(a.size_bytes)} prio {a.priority}" for a in facts.swaps)
        or "none"
    )
    _add(table, "Swap", f"{format_size(mem.swap_used_bytes)} of "
                  f"{format_size(mem.swap_total_bytes)} used; {swap}")
    psi = facts.pressure.memory
    _add(table, "PSI", f"memory some avg10 {psi.some.avg10:.2f}, avg60 {psi.some.avg60:.2f}"
                  if psi else f"unavailable: {facts.pressure.reason}")
    fs = facts.swap_dir
    media = (fs.media or "unknown media").upper()
    free = format_size(fs.available_bytes) if fs.available_bytes is not None else "?"
    _add(table, "Swap dir", f"{fs.path}: {fs.fstype or '?'} on {fs.mountpoint or '?'} "
                  f"({fs.device or 'no block device'}, {media}), {free} free")
    disks = ", ".join(f"{d.name} {format_size(d.size_bytes)} {(d.media or '?').upper()}"
                      for d in facts.disks) or "none found"
    _add(table, "Disks", disks)
    if facts.gpus.available:
        gpus = "; ".join(
            f"{g.index}: {g.name or '?'} "
            f"{format_size(g.memory_total_bytes) if g.memory_total_bytes else '?'}"
            + (" LOST" if g.lost else "")
            for g in facts.gpus.gpus
        )
        _add(table, "GPUs", f"{gpus} (driver {facts.gpus.driver_version or '?'}, "
                      f"CUDA {facts.gpus.cuda_driver_version or '?'})")
    else:
        _add(table, "GPUs", f"none: {facts.gpus.reason}")
    ollama = facts.ollama
    if ollama.running:
        _add(table, "Ollama", f"API {ollama.api_version} at {ollama.api_url}")
    else:
        _add(table, "Ollama", f"installed, not answering ({ollama.binary or ollama.unit})"
                      if ollama.installed else "not installed")
    dask = facts.dask
    _add(table, "Dask", f"{dask.version} ({dask.location})" if dask.version else
                  "not installed")
    system = facts.system
    _add(table, "System", f"kernel {system.kernel or '?'}, PID 1 {system.init or '?'}, "
                  f"systemd {'yes' if system.systemd_booted else 'no'}, "
                  f"cgroup {system.cgroup or '?'}")
    if report.write_test:
        test = report.write_test
        _add(table, "Write test", f"{format_size(test.size_bytes)} in {test.seconds:.2f} s = "
                      f"{test.bytes_per_s / 1e6:.0f} MB/s (fsync'd) in {test.directory}")
    return table


def _add(table: Table, label: str, value: str) -> None:
    from rich.text import Text

    table.add_row(label, Text(value))


def _score_table(report: Report) -> Table:
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False)
    table.add_column("part", style="bold")
    table.add_column("points", justify="right")
    table.add_column("why")
    for part in report.score_parts:
        table.add_row(part.name, f"{part.points:.1f}/{part.max_points:.0f}", Text(part.detail))
    return table


def _finding_line(finding: Finding) -> str:
    from rich.markup import escape

    style = _SEVERITY_STYLE[finding.severity]
    fix = f"\n       fix: {escape(finding.fix)}" if finding.fix else ""
    return f"  [{style}]{finding.severity.upper():4}[/] {escape(finding.message)}{fix}"
