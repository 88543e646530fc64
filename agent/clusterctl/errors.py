"""The one error hierarchy of clusterctl.

Every error carries a message that says what went wrong and where, and,
when there is one, the fix. The CLI edge (``clusterctl.cli.common``) turns
them into one stderr line and an exit code; the agent loop decides per class
whether to retry (TemporaryError), degrade, or stop.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class ClusterctlError(Exception):
    """Base class: an action failed (exit 1)."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def one_line(self) -> str:
        """The message and fix as one line for stderr."""
        if self.fix:
            return f"{self.message}; {self.fix}"
        return self.message


class UsageError(ClusterctlError):
    """Bad arguments on the command line (exit 2)."""

    exit_code = EXIT_USAGE


class ConfigError(ClusterctlError):
    """Bad configuration: syntax, unknown key, wrong type, out of range (exit 2).

    ``path`` and ``line`` say where, ``key`` which setting (``section.name``).
    """

    exit_code = EXIT_USAGE

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        key: str | None = None,
        fix: str | None = None,
    ) -> None:
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        what = f"{key}: " if key else ""
        super().__init__(f"{where}{what}{message}", fix=fix)
        self.path = path
        self.line = line
        self.key = key
        self.reason = message


class HostError(ClusterctlError):
    """The host cannot do what was asked (full disk, missing tool, refused syscall)."""


class TemporaryError(ClusterctlError):
    """Worth retrying later: busy lock, unreachable peer, timeout."""
