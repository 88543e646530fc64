"""Logging set-up: journald priorities under systemd, plain lines at a terminal.

Under systemd, stderr is a stream to journald (``JOURNAL_STREAM`` names its
device and inode); a ``<N>`` prefix on each line sets the syslog priority, so
``journalctl -u clusterctl-agent -p warning`` filters as expected. Elsewhere
lines read ``clusterctl: warning: ...``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

# logging level -> syslog priority (sd-daemon.h)
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def _priority(levelno: int) -> int:
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


class JournalFormatter(logging.Formatter):
    """``<N>message``, one prefix per line so multi-line messages keep their level."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_priority(record.levelno)}>"
        text = super().format(record)
        return "\n".join(prefix + line for line in text.splitlines() or [""])


class TerminalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"clusterctl: {record.levelname.lower()}: {text}"
        if record.levelno <= logging.DEBUG:
            return f"clusterctl: debug: {text}"
        return f"clusterctl: {text}"


def stderr_is_journal(stream: TextIO, env: Mapping[str, str]) -> bool:
    """True when ``stream`` is the journald stream systemd connected us to."""
    value = env.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return st.st_dev == int(device) and st.st_ino == int(inode)


def setup(
    verbosity: int = 0,
    *,
    stream: TextIO | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Configure the root logger once per process.

    ``verbosity``: -1 quiet (errors only), 0 default (warnings at a terminal,
    info under journald), 1 info, 2 or more debug.
    """
    stream = sys.stderr if stream is None else stream
    env = os.environ if env is None else env
    journal = stderr_is_journal(stream, env)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter() if journal else TerminalFormatter())
    if verbosity < 0:
        level = logging.ERROR
    elif verbosity == 0:
        level = logging.INFO if journal else logging.WARNING
    elif verbosity == 1:
        level = logging.INFO
    else:
        level = logging.DEBUG
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
