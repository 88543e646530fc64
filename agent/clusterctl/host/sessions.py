"""Who is using the node besides the GPUs: SSH sessions and named processes (/proc)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from clusterctl.errors import HostError


def _processes(root: Path) -> list[tuple[str, bytes]]:
    """(comm, cmdline) of every process that can be read; HostError when /proc cannot
    be listed at all."""
    proc = root / "proc"
    try:
        names = [entry.name for entry in proc.iterdir()]
    except OSError as err:
        raise HostError(f"cannot list {proc}: {err.strerror or err}",
                        fix="is /proc mounted (and not hidden from this service)?") from err
    out = []
    for name in names:
        if not name.isdigit():
            continue
        # a process that exits meanwhile (ENOENT, ESRCH), or one hidden from us (EACCES
        # under ProtectProc=): skipped, as it is not ours to see
        with contextlib.suppress(OSError):
            comm = (proc / name / "comm").read_text(errors="replace").strip()
            cmdline = (proc / name / "cmdline").read_bytes()
            out.append((comm, cmdline))
    return out


def ssh_sessions(root: Path = Path("/")) -> int | None:
    """Open SSH sessions: sshd's per-session processes ("sshd: user@pts/0", "user@notty");
    None when /proc cannot be listed (uncounted, not zero)."""
    try:
        processes = _processes(root)
    except HostError:
        return None
    return sum(1 for comm, cmdline in processes
               if comm.startswith("sshd") and b"@" in cmdline.split(b"\0", 1)[0])


def running(names: tuple[str, ...], root: Path = Path("/")) -> tuple[str, ...]:
    """Which of ``names`` (process names, as in /proc/PID/comm) are running; HostError
    when /proc cannot be listed (none running would be a guess)."""
    if not names:
        return ()
    seen = {comm for comm, _ in _processes(root)}
    return tuple(n for n in names if n[:15] in seen)  # comm is cut at 15 characters
