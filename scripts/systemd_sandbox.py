#!/usr/bin/env python3
"""A disposable systemd: the real /lib/systemd/systemd as PID 1 of a private namespace.

    scripts/systemd_sandbox.py shell                 boot, open a shell inside, tear down on exit
    scripts/systemd_sandbox.py run -- CMD [ARG...]   boot, run CMD inside, print the journal
                                                      if it fails, tear down
    --bind HOST:TARGET   bind a host directory inside (a loop filesystem for swap files)

The repository is mounted at /srv/clusterctl (an overlay: writes stay in the sandbox).

How it stays off the host (run as root; the kernel is shared):

- PID, mount and UTS namespaces (``unshare --pid --fork --mount --mount-proc --uts``);
  ``/`` is made rprivate so no mount leaks back.
- Overlays over /etc, /opt, /usr/local, /var and /root: everything installed inside
  lands in upper layers under the work directory. /tmp, /run, /var/tmp and
  /var/log/journal are private tmpfs (systemd-tmpfiles would otherwise clean the
  host's /tmp).
- ``container=clusterctl-sandbox`` makes systemd run as in a container: no swap units
  (so it never swaps off the host's swap), no timesyncd, no udev. /sys and /proc/sys
  are read-only, so neither udev rules nor systemd-sysctl can change the host
  (``writable_sysctl`` makes /proc/sys writable once booted, for a test that sets
  sysctls and restores them).
- The host's enabled units (postgres, apt timers, getty...) are disabled inside, and
  it boots basic.target, not multi-user.target.
- PID 1 is killed by its PID at the end; if the process that started it dies first,
  the kernel kills it (PR_SET_PDEATHSIG, and ``unshare --kill-child``).

What it cannot isolate: swap and sysctl are kernel-wide. Swap files made inside must
live on a real filesystem (a loop ext4 bound with ``binds``); on stop every swap area
in a bound directory is swapped off from the host side, even when the sandbox died.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

SYSTEMD = Path("/lib/systemd/systemd")
OVERLAYS = ("/etc", "/opt", "/usr/local", "/var", "/root")
TMPFS = ("/tmp", "/run", "/var/tmp", "/var/log/journal")
SOURCES_AT = "/srv"
REPO = Path(__file__).resolve().parent.parent
# A clean environment for commands inside, as a root shell on a node would have.
INSIDE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}
# Units that could change the host from inside (modules, sysctl) even in container mode.
MASKED = ("systemd-modules-load.service", "systemd-sysctl.service", "systemd-binfmt.service",
          "systemd-timesyncd.service", "systemd-udevd.service", "systemd-udev-trigger.service",
          "getty.target", "console-getty.service")
PR_SET_PDEATHSIG = 1


class SandboxError(RuntimeError):
    """The sandbox could not boot, or a command inside failed (with its output)."""


def unavailable() -> str | None:
    """Why a sandbox cannot run on this machine, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (namespaces, overlay mounts)"
    for tool in ("unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    if not SYSTEMD.exists():
        return f"systemd is not installed ({SYSTEMD} is missing)"
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount", "--mount-proc", "--uts",
                            "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"cannot make PID/mount/UTS namespaces here: {probe.stderr.strip()}"
    return None


def _die_with_parent() -> None:  # runs in the child before exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Sandbox:
    """One booted systemd; use as a context manager, or ``start()`` and ``stop()``."""

    def __init__(self, workdir: Path, *, binds: Mapping[str, Path] | None = None,
                 sources: Mapping[str, Path] | None = None, unit: str = "basic.target",
                 hostname: str = "clusterctl-sandbox", writable_sysctl: bool = False) -> None:
        self.workdir = workdir
        self.binds = dict(binds or {})
        self.sources = dict(sources if sources is not None else {"clusterctl": REPO})
        self.unit = unit
        self.hostname = hostname
        self.writable_sysctl = writable_sysctl
        self.console_log = workdir / "console.log"
        self.pid: int | None = None
        self.boot_s: float | None = None
        self._unshare: subprocess.Popen[bytes] | None = None
        self._host_cgroups: set[Path] = set()

    # -- life ------------------------------------------------------------------
    def boot_script(self) -> str:
        q = shlex.quote
        inside = Path(SOURCES_AT) / ".sandbox"  # the work directory, whatever is overlaid
        lines = ["set -eu", f"exec 3>>{q(str(self.console_log))}", "mount --make-rprivate /",
                 f"mount -t tmpfs -o mode=0755 tmpfs {SOURCES_AT}",
                 f"mkdir {inside} && mount --bind {q(str(self.workdir))} {inside}"]
        for target in OVERLAYS:
            layer = inside / "layers" / target.strip("/").replace("/", "_")
            upper, work = layer / "upper", layer / "work"
            lines.append(f"mkdir -p {q(str(upper))} {q(str(work))}")
            lines.append(f"mount -t overlay overlay -o lowerdir={target},upperdir={upper},"
                         f"workdir={work} {target}")
        for name, host in self.sources.items():
            layer = inside / "sources" / name
            lines.append(f"mkdir -p {q(str(layer / 'upper'))} {q(str(layer / 'work'))} "
                         f"{SOURCES_AT}/{name}")
            lines.append(f"mount -t overlay overlay -o lowerdir={q(str(host))},"
                         f"upperdir={q(str(layer / 'upper'))},workdir={q(str(layer / 'work'))} "
                         f"{SOURCES_AT}/{name}")
        for target, host in self.binds.items():
            lines.append(f"mkdir -p {q(target)} && mount --bind {q(str(host))} {q(target)}")
        for path in ("/proc/sys", "/sys"):
            lines.append(f"mount --bind {path} {path} && mount -o remount,bind,ro {path}")
        for target in TMPFS:
            lines.append(f"mkdir -p {target} && mount -t tmpfs -o mode=1777 tmpfs {target}")
        lines += [
            "chmod 0755 /run /var/log/journal",
            # the host's enabled units stay on the host (whiteouts in the /etc overlay)
            "find /etc/systemd/system -path '*.wants/*' -delete",
            *(f"ln -sfn /dev/null /etc/systemd/system/{unit}" for unit in MASKED),
            ": > /etc/fstab",
            f"echo {q(self.hostname)} > /etc/hostname && hostname {q(self.hostname)}",
            "export container=clusterctl-sandbox",
            f"exec {SYSTEMD} --system --unit={q(self.unit)} </dev/null >&3 2>&3",
        ]
        return "\n".join(lines) + "\n"

    def start(self, timeout_s: float = 60.0) -> None:
        reason = unavailable()
        if reason:
            raise SandboxError(f"cannot start a systemd sandbox: {reason}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._host_cgroups = set(top_cgroups())
        began = time.monotonic()
        self._unshare = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child=SIGKILL", "--mount", "--mount-proc",
             "--uts", "--propagation", "private", "bash", "-c", self.boot_script()],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=self.console_log.open("ab"),
            preexec_fn=_die_with_parent)  # noqa: PLW1509 - prctl only, before exec
        try:
            self.pid = self._find_pid1(began + timeout_s)
            self._wait_running(began + timeout_s)
            if self.writable_sysctl:  # after boot: the caller restores what it changes
                self.run(["mount", "-o", "remount,bind,rw", "/proc/sys"])
        except BaseException:
            self.stop()
            raise
        self.boot_s = time.monotonic() - began

    def _find_pid1(self, deadline: float) -> int:
        assert self._unshare is not None
        children = Path(f"/proc/{self._unshare.pid}/task/{self._unshare.pid}/children")
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                found = children.read_text().split()
                if found:
                    return int(found[0])
            self._check_alive()
            time.sleep(0.01)
        raise SandboxError(f"no PID 1 appeared; {self._console_tail()}")

    def _wait_running(self, deadline: float) -> None:
        state = ""
        while time.monotonic() < deadline:
            self._check_alive()
            if Path(f"/proc/{self.pid}/comm").read_text().strip() == "systemd":
                result = self.run(["systemctl", "is-system-running"], check=False, timeout_s=10)
                state = result.stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.05)
        raise SandboxError(f"systemd did not finish booting (state {state or 'unknown'!r}); "
                           f"{self._console_tail()}")

    def _check_alive(self) -> None:
        assert self._unshare is not None
        if self._unshare.poll() is not None:
            raise SandboxError(f"the sandbox exited with status {self._unshare.returncode}; "
                               f"{self._console_tail()}")

    def _console_tail(self) -> str:
        try:
            tail = self.console_log.read_text(errors="replace").splitlines()[-20:]
        except OSError:
            tail = []
        return "console:\n" + "\n".join(tail) if tail else "the console log is empty"

    def stop(self) -> None:
        """Kill PID 1 (by its PID: the whole namespace dies), swap off bound files."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        if self._unshare is not None:
            if self._unshare.poll() is None and self.pid is None:
                self._unshare.kill()
            try:
                self._unshare.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._unshare.kill()
                self._unshare.wait()
            if self._unshare.stderr:
                self._unshare.stderr.close()
        for host in self.binds.values():
            swapoff_files_under(host)
        remove_empty_cgroups(set(top_cgroups()) - self._host_cgroups)
        self.pid = None
        self._unshare = None

    def __enter__(self) -> Sandbox:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- inside ------------------------------------------------------------------
    def command(self, argv: Sequence[str] | str) -> list[str]:
        """The host command line that runs ``argv`` (a list, or a bash script) inside."""
        if self.pid is None:
            raise SandboxError("the sandbox is not running")
        inner = ["bash", "-c", argv] if isinstance(argv, str) else list(argv)
        env = [f"{k}={v}" for k, v in INSIDE_ENV.items()]
        return ["nsenter", "-t", str(self.pid), "-m", "-p", "-u", "--", "env", "-i", *env,
                *inner]

    def run(self, argv: Sequence[str] | str, *, check: bool = True, timeout_s: float = 600,
            ) -> subprocess.CompletedProcess[str]:
        """Run inside (as root, clean environment); ``check`` raises with the output."""
        result = subprocess.run(self.command(argv), capture_output=True, text=True,
                                timeout=timeout_s, check=False)
        if check and result.returncode != 0:
            shown = argv if isinstance(argv, str) else shlex.join(argv)
            raise SandboxError(f"inside the sandbox, {shown!r} exited {result.returncode}:\n"
                               f"{result.stdout}{result.stderr}")
        return result

    def journal(self, *args: str) -> str:
        """``journalctl --no-pager ARGS`` inside; the whole journal with no arguments."""
        result = self.run(["journalctl", "--no-pager", "-o", "short-monotonic", *args],
                          check=False, timeout_s=60)
        return result.stdout + result.stderr

    def wait_for(self, script: str, timeout_s: float, interval_s: float = 0.25) -> str:
        """Poll a bash condition inside until it succeeds; its stdout, or SandboxError."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.run(script, check=False, timeout_s=timeout_s)
            if result.returncode == 0:
                return result.stdout
            if time.monotonic() > deadline:
                raise SandboxError(f"gave up after {timeout_s:.0f} s waiting for {script!r}:\n"
                                   f"{result.stdout}{result.stderr}")
            time.sleep(interval_s)


def top_cgroups(root: Path = Path("/sys/fs/cgroup")) -> list[Path]:
    """The cgroups just under each hierarchy's root (init.scope, system.slice...)."""
    roots = [root] if (root / "cgroup.procs").exists() else []
    with contextlib.suppress(OSError):
        roots += [h for h in root.iterdir() if (h / "cgroup.procs").exists()]
    found: list[Path] = []
    for hierarchy in roots:
        with contextlib.suppress(OSError):
            found += [c for c in hierarchy.iterdir() if (c / "cgroup.procs").exists()]
    return found


def remove_empty_cgroups(created: set[Path]) -> None:
    """Remove the cgroups the sandbox's systemd made on the host (there is no cgroup
    namespace), deepest first; one that still holds a process stays (rmdir refuses)."""
    for top in created:
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
            with contextlib.suppress(OSError):
                Path(dirpath).rmdir()


def swapoff_files_under(directory: Path) -> list[Path]:
    """Swap off every regular file under ``directory`` that is an active swap area.

    swapoff(2) finds the area by the file, not by the path it was enabled with, so this
    works from the host for files activated inside a sandbox, even a dead one.
    """
    done: list[Path] = []
    if not directory.is_dir():
        return done
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            result = subprocess.run(["swapoff", str(path)], capture_output=True, check=False)
            if result.returncode == 0:
                done.append(path)
    return done


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bind", action="append", default=[], metavar="HOST:TARGET")
    parser.add_argument("--workdir", type=Path, help="overlay layers and console log "
                        "(default: a new directory in /var/tmp, kept for inspection)")
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("shell", help="a shell inside")
    run = sub.add_parser("run", help="run a command inside")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    binds = {}
    for item in args.bind:
        host, sep, target = item.partition(":")
        if not sep or not target.startswith("/"):
            parser.error(f"--bind {item}: expected HOST:TARGET with an absolute TARGET")
        binds[target] = Path(host).resolve()
    workdir = args.workdir or Path(
        subprocess.run(["mktemp", "-d", "/var/tmp/systemd-sandbox.XXXXXX"], check=True,
                       capture_output=True, text=True).stdout.strip())
    try:
        with Sandbox(workdir, binds=binds) as sandbox:
            print(f"systemd-sandbox: booted in {sandbox.boot_s:.2f} s, PID 1 is {sandbox.pid} "
                  f"on the host; work in {workdir}", file=sys.stderr)
            if args.what == "shell":
                return subprocess.run(sandbox.command(["bash", "-l"]), check=False).returncode
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if not cmd:
                parser.error("run: which command?")
            result = subprocess.run(sandbox.command(cmd), check=False)
            if result.returncode != 0:
                print(sandbox.journal("-n", "200"), file=sys.stderr)
            return result.returncode
    except SandboxError as err:
        print(f"systemd-sandbox: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
