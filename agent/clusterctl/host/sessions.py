"""Who is using the node besides the GPUs: SSH sessions and named processes (/proc)."""

from __future__ import annotations

import contextlib
from pathlib import Path


def _processes(root: Path) -> list[tuple[str, bytes]]:
    out = []
    for entry in (root / "proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):  # processes come and go while we look
            comm = (entry / "comm").read_text().strip()
            cmdline = (entry / "cmdline").read_bytes()
            out.append((comm, cmdline))
    return out


def ssh_sessions(root: Path = Path("/")) -> int:
    """Open SSH sessions: sshd's per-session processes ("sshd: user@pts/0", "user@notty")."""
    return sum(1 for comm, cmdline in _processes(root)
               if comm.startswith("sshd") and b"@" in cmdline.split(b"\0", 1)[0])


def running(names: tuple[str, ...], root: Path = Path("/")) -> tuple[str, ...]:
    """Which of ``names`` (process names, as in /proc/PID/comm) are running."""
    if not names:
        return ()
    seen = {comm for comm, _ in _processes(root)}
    return tuple(n for n in names if n[:15] in seen)  # comm is cut at 15 characters
