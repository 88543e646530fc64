"""Whether root may trust a directory on this host: read-only checks, nothing changes.

A directory where clusterctl keeps swap files, state or locks is only as safe as
every directory above it: a user who owns one of them, or may write in one that
has no sticky bit, can rename it away and put a symlink in its place between our
check and our use. ``untrusted_ancestor`` names the first such directory.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path


def untrusted_ancestor(path: Path) -> str | None:
    """Why ``path`` is unsafe for root to keep files in, or None when it is safe.

    Looks at ``path`` itself and each of its existing parents, both as written
    and with symlinks resolved (``lstat``, never following): each must be owned
    by root or by the current user, and a directory writable by group or others
    must have the sticky bit (like /tmp): the rule the swap step applies when it acts.
    Parents that do not exist yet are left to whoever creates them.
    """
    euid = os.geteuid()
    written = Path.cwd() / path
    for candidate in (*_chain(written), *_chain(Path(os.path.realpath(written)))):
        try:
            st = os.lstat(candidate)
        except OSError:  # absent (or under a file): nothing there to trust or distrust
            continue
        if st.st_uid not in (0, euid):
            return f"{candidate} is owned by {_user(st.st_uid)}, not root"
        if not stat.S_ISDIR(st.st_mode) or st.st_mode & stat.S_ISVTX:
            continue
        if st.st_mode & (stat.S_IWOTH | stat.S_IWGRP):
            return (f"{candidate} may be written by others (mode "
                    f"{stat.S_IMODE(st.st_mode):04o}, no sticky bit)")
    return None


def _chain(path: Path) -> tuple[Path, ...]:
    """``path`` and its parents, the root last."""
    return (path, *path.parents)


def _user(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"
