"""Run a command with stderr on a real pseudo-terminal (progress bars draw only there)."""

from __future__ import annotations

import os
import pty
import subprocess
from collections.abc import Mapping, Sequence


def run_with_terminal_stderr(argv: Sequence[str], env: Mapping[str, str], *,
                             timeout_s: float = 120) -> tuple[int, bytes, str]:
    """The exit status, what reached the terminal, and stdout."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=follower,
                            env={**env, "TERM": "xterm", "COLUMNS": "120"})
    os.close(follower)
    terminal = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        terminal += chunk
    stdout, _ = proc.communicate(timeout=timeout_s)
    os.close(leader)
    return proc.returncode, terminal, stdout.decode()
