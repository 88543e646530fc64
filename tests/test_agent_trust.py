"""The agent under attack and under faults, in-process (fake NVML, a real control plane on
127.0.0.1): planted links in the textfile directory, reloads of bad configs, a notifier
that fails, a loop that dies, no PSI, no file descriptors left. Each time the agent goes
on, says why in one line, and gives the power limits back when it stops."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from clusterctl.agent import service
from clusterctl.agent.metrics import Metrics, write_textfile
from clusterctl.agent.service import Agent
from clusterctl.errors import HostError
from clusterctl.host.nvml import Nvml
from tests.conftest import H100, load_fake_nvml, quiet_host, run_as_systemd_would, wait_until
from tests.fakes.control_plane import running
from tests.test_agent import Node, Ticker

GIB = 2**30


@pytest.fixture
def nv(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    fake = load_fake_nvml(monkeypatch)
    fake.configure({"gpus": [{**H100, "uuid": f"GPU-{i}", "pci_bus_id": f"00000000:{i:02x}:00.0",
                              "utilization_gpu": 50, "memory_used": GIB} for i in range(2)]})
    return fake


def loop_errors(n: Node, loop: str) -> float:
    """The count /metrics shows: over the API when the agent runs, else rendered here."""
    if n.agent is not None and n.agent.api_server is None:
        text = Metrics(n.agent.snapshot).text().decode()
    else:
        _, text = n.get("/metrics")
    line = next(x for x in text.splitlines()
                if x.startswith(f'clusterctl_loop_errors_total{{loop="{loop}"}}'))
    return float(line.split()[-1])


def errors_logged(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.ERROR and words in r.getMessage()]


# -- the node_exporter textfile --------------------------------------------------------


def test_the_textfile_write_never_follows_a_planted_link(node: Callable[..., Node],
                                                         tmp_path: Path) -> None:
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$secret\n")
    secret.chmod(0o600)
    textfiles = tmp_path / "textfiles"
    textfiles.mkdir(mode=0o755)
    n = node(api=f'textfile_dir = "{textfiles}"\n')
    agent = n.make()  # its GPU steps run on this thread (Agent.tick)
    # the names prometheus_client's writer would use for this thread, and the file
    # itself: each a link to a root-only file
    (textfiles / f"clusterctl.prom.{os.getpid()}.{threading.get_ident()}").symlink_to(secret)
    for name in ("clusterctl.prom.tmp", ".clusterctl.prom.tmp"):
        (textfiles / name).symlink_to(secret)
    (textfiles / "clusterctl.prom").symlink_to(secret)
    write_textfile(agent.metrics, textfiles)
    Ticker().run_for(agent, 0.5)  # the agent's own writes, every 0.1 s
    assert loop_errors(n, "textfile") == 0
    assert secret.read_text() == "root:$6$secret\n"
    assert (secret.stat().st_mode & 0o777) == 0o600
    prom = textfiles / "clusterctl.prom"
    assert not prom.is_symlink() and "DCGM_FI_DEV_GPU_TEMP" in prom.read_text()
    assert (prom.stat().st_mode & 0o777) == 0o644 and prom.stat().st_uid == os.geteuid()


@pytest.mark.parametrize("how", ["world-writable", "owned by nobody", "a symlink",
                                 "under a parent of nobody's"])
def test_a_textfile_dir_others_control_is_refused_once_with_the_fix(
        node: Callable[..., Node], tmp_path: Path, caplog: pytest.LogCaptureFixture,
        how: str) -> None:
    real = tmp_path / "textfiles"
    real.mkdir(mode=0o755)
    textfiles = real
    if how == "under a parent of nobody's":  # nobody could rename it away and plant a link
        parent = tmp_path / "theirs"
        parent.mkdir()
        real = textfiles = parent / "textfiles"
        real.mkdir(mode=0o755)
        os.chown(parent, 65534, 65534)
        words = "is under a directory another user controls"
        fix = "use a directory whose parents are all root's"
    elif how == "world-writable":
        real.chmod(0o777)
        words, fix = "is writable by group or others (mode 0777)", f"chmod go-w {real}"
    elif how == "owned by nobody":
        os.chown(real, 65534, 65534)
        words, fix = "is owned by uid 65534, not root", f"chown root {real}"
    else:
        textfiles = tmp_path / "link"
        textfiles.symlink_to(real)
        words, fix = "is a symbolic link", "set [api] textfile_dir to the real directory"
    n = node(api=f'textfile_dir = "{textfiles}"\n')
    Ticker().run_for(n.make(), 0.5)  # 0.1 s apart: refused each time
    assert loop_errors(n, "textfile") >= 5
    assert list(real.iterdir()) == []  # nothing written
    logged = errors_logged(caplog, "textfile_dir")  # once, however many cycles
    assert len(logged) == 1, logged
    assert logged[0].startswith(f"the metrics textfile: textfile_dir {textfiles} {words}")
    assert logged[0].endswith(f"; {fix}")
    with pytest.raises(HostError, match=words.replace("(", r"\(").replace(")", r"\)")):
        write_textfile(Metrics(n.agent.snapshot), textfiles)  # type: ignore[union-attr]


# -- reload ---------------------------------------------------------------------------


BAD_CONFIGS = ("a size that overflows", "a link to itself", "a directory", "not UTF-8",
               "nested too deeply", "a wrong type")


def break_config(path: Path, how: str) -> None:
    """Replace the agent's config with a bad one, as an operator's mistake would."""
    text = path.read_text()
    if how == "a size that overflows":
        path.write_text(text.replace("[swap]\n", '[swap]\nmax_size = "' + "9" * 400 + 'T"\n'))
    elif how == "a link to itself":
        path.unlink()
        path.symlink_to(path.name)
    elif how == "a directory":
        path.unlink()
        path.mkdir()
    elif how == "not UTF-8":
        path.write_bytes(text.encode() + b"# \xff\xfe\n")
    elif how == "nested too deeply":
        path.write_text(text + "x = " + "[" * 5000 + "]" * 5000 + "\n")
    else:
        path.write_text(text.replace("monitor_interval = 0.1", 'monitor_interval = "fast"'))


@pytest.mark.parametrize("bad", BAD_CONFIGS)
def test_a_reload_of_a_bad_config_is_refused_and_the_agent_goes_on(
        node: Callable[..., Node], caplog: pytest.LogCaptureFixture, bad: str) -> None:
    with running() as plane:
        n = node(plane.url)
        agent = n.start()
        break_config(n.conf, bad)
        agent.reload()
        assert len(errors_logged(caplog, "reload refused, the running config stays")) == 1
        assert any(x.startswith("STATUS=reload refused: ") for x in n.notes)
        assert agent.config.gpu.monitor_interval_s == 0.1  # the old config runs on
        beats = len(plane.heartbeats)
        wait_until(lambda: len(plane.heartbeats) > beats)
    assert not agent.problems()


def test_a_new_token_file_on_reload_is_sent_with_the_next_heartbeat(
        node: Callable[..., Node], tmp_path: Path) -> None:
    with running() as plane:
        n = node(plane.url)
        n.token.write_text("old-token\n")
        n.token.chmod(0o600)
        agent = n.start()
        wait_until(lambda: "Bearer old-token" in plane.auth)
        rotated = tmp_path / "token-2"
        rotated.write_text("new-token\n")
        rotated.chmod(0o600)
        n.conf.write_text(n.conf.read_text().replace(str(n.token), str(rotated)))
        agent.reload()
        wait_until(lambda: "Bearer new-token" in plane.auth)
        seen = len(plane.auth)
        wait_until(lambda: len(plane.auth) > seen + 1)
    assert plane.auth[-1] == "Bearer new-token"
    sequences = [h["sequence"] for h in plane.heartbeats]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)


# -- the main loop --------------------------------------------------------------------


def test_the_main_loop_survives_its_failures_and_always_gives_back_power_limits(
        node: Callable[..., Node], caplog: pytest.LogCaptureFixture) -> None:
    """SIGHUP with a broken config, a notifier that fails once: still running, still
    pinging; SIGTERM then stops it with the lowered power limit given back."""
    n = node(gpu="throttle_enabled = true\n")
    n.nv.machine.gpus[0].temperature = 88
    notes: list[str] = []
    broke: list[str] = []

    def notify(message: str) -> None:
        if message.startswith("WATCHDOG=1") and not broke:
            broke.append(message)
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        notes.append(message)

    agent = Agent(n.conf, nvml=Nvml(module=n.nv), notify=notify)
    quiet_host(agent, n.tmp)
    def operator(send: Callable[[int], None]) -> None:
        wait_until(lambda: n.nv.machine.gpus[0].power_limit_mw < 700_000)
        wait_until(lambda: bool(broke), 10)
        break_config(n.conf, "a size that overflows")
        send(signal.SIGHUP)
        wait_until(lambda: any(x.startswith("STATUS=reload refused") for x in notes), 10)
        pings = sum(x.startswith("WATCHDOG=1") for x in notes)
        wait_until(lambda: sum(x.startswith("WATCHDOG=1") for x in notes) > pings, 10)
        send(signal.SIGTERM)

    run_as_systemd_would(agent, operator)
    assert n.nv.machine.gpus[0].power_limit_mw == 700_000  # given back
    assert notes[0].startswith("READY=1") and notes[-1].startswith("STOPPING=1")
    assert sum(x.startswith("WATCHDOG=1") for x in notes) >= 2  # after the failed one too
    assert len(errors_logged(caplog, "Connection refused")) == 1


# -- the watchdog ---------------------------------------------------------------------


def test_a_dead_loop_holds_the_watchdog_back_and_is_named(node: Callable[..., Node]) -> None:
    n = node()
    agent = n.start()
    assert not agent.problems()
    agent._main_step()
    assert n.notes[-1].startswith("WATCHDOG=1\nSTATUS=GPUs ")
    dead = threading.Thread(target=lambda: None, name="delivery")
    dead.start()
    dead.join()
    agent.loops["delivery"] = dead  # as if the delivery thread had ended
    assert agent.problems()
    agent._main_step()
    assert n.notes[-1] == "STATUS=delivery loop died: watchdog pings held back"


def test_a_stuck_loop_holds_the_watchdog_back_and_is_named(node: Callable[..., Node]) -> None:
    n = node()
    agent = n.start()
    assert agent.problems() == []
    later = time.monotonic() + 200  # the GPU limit is 30 s, delivery's 1 + 20 + 60 s
    problems = agent.problems(now=later)
    assert "gpu loop stuck for 200 s" in problems and "delivery loop stuck for 200 s" in problems
    assert [p for p in agent.problems(now=time.monotonic() + 25)
            if not p.startswith("pressure")] == []


def test_no_psi_turns_the_trigger_off_and_that_is_healthy(
        tmp_path: Path, nv: ModuleType, caplog: pytest.LogCaptureFixture) -> None:
    """Without PSI the trigger is off, said once; the loop goes on sampling swap use."""
    n = Node(tmp_path, nv)
    agent = Agent(n.conf, nvml=Nvml(module=nv), notify=n.notes.append)
    agent.psi_root = tmp_path / "no-psi"  # a kernel without /proc/pressure
    n.agent = agent
    agent.start()
    wait_until(lambda: agent.progress.pressure_off is not None)
    assert agent.progress.pressure_off == ("this kernel has no PSI (/proc/pressure/memory); "
                                           "boot Linux 4.20+ with psi=1; until then memory "
                                           "pressure does not start swap steps")
    at = agent.progress.pressure_at
    wait_until(lambda: agent.progress.pressure_at != at)
    assert agent.loops["pressure"].is_alive() and not agent.problems()
    n.stop()


def test_the_pressure_loop_survives_a_trigger_that_cannot_be_armed_for_a_while(
        tmp_path: Path, nv: ModuleType, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The pressure loop starts while the process is out of descriptors: arming fails
    (EMFILE), is counted and said once, the loop lives on and is healthy, and once
    descriptors are back the trigger is armed."""
    monkeypatch.setattr(service, "PRESSURE_RETRY_S", 0.1)
    caplog.set_level(logging.INFO, logger="clusterctl.agent")
    psi = tmp_path / "psi/proc/pressure/memory"
    psi.parent.mkdir(parents=True)
    psi.write_text("")  # a file that takes a trigger and never fires
    n = Node(tmp_path, nv)
    agent = Agent(n.conf, nvml=Nvml(module=nv), notify=n.notes.append)
    agent.psi_root = tmp_path / "psi"
    loop = threading.Thread(target=agent._pressure_loop, name="pressure", daemon=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (sum(1 for _ in Path("/proc/self/fd").iterdir()) + 16, hard))
        with contextlib.suppress(OSError):
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        loop.start()
        wait_until(lambda: agent.loop_errors.get("pressure", 0) >= 3)
        alive = loop.is_alive()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert alive and agent.progress.pressure_off is None and psi.read_text() == ""
    assert len(errors_logged(caplog, "the memory pressure trigger failed")) == 1
    wait_until(lambda: "the memory pressure trigger works again" in caplog.text)
    wait_until(lambda: psi.read_text().startswith("some 100000 1000000"))
    assert loop.is_alive() and not agent.problems()
    agent.stopping.set()
    loop.join(5)


# -- out of file descriptors ----------------------------------------------------------


def test_every_loop_survives_running_out_of_file_descriptors(
        node: Callable[..., Node], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    textfiles = tmp_path / "textfiles"
    textfiles.mkdir(mode=0o755)
    with running() as plane:
        n = node(plane.url, api=f'textfile_dir = "{textfiles}"\n')
        agent = n.start()
        wait_until(lambda: len(plane.heartbeats) >= 1)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        held: list[int] = []
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (sum(1 for _ in Path("/proc/self/fd").iterdir()) + 32, hard))
            with pytest.raises(OSError) as full:
                while True:
                    held.append(os.open("/dev/null", os.O_RDONLY))
            assert full.value.errno == errno.EMFILE
            exhausted_at = time.monotonic()
            time.sleep(2.5)  # 25 GPU cycles, two heartbeat intervals
            alive = {name: thread.is_alive() for name, thread in agent.loops.items()}
        finally:
            for fd in held:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert alive == {"gpu": True, "delivery": True, "pressure": True, "xid": True}
        beats = len(plane.heartbeats)
        wait_until(lambda: len(plane.heartbeats) > beats + 1)  # heartbeats resume
        wait_until(lambda: (textfiles / "clusterctl.prom").stat().st_mtime > time.time() - 1)
        assert (agent.progress.gpu_at or 0) > exhausted_at + 2.5
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("Too many open files" in e for e in errors)
        # once per distinct cause (again only after a success), not every cycle
        assert max(Counter(errors).values()) <= 3
        assert loop_errors(n, "textfile") >= 10  # each failed write counted
        assert agent.problems() == []


def test_a_backlog_to_a_slow_control_plane_never_holds_heartbeats_or_the_watchdog_back(
        tmp_path: Path) -> None:
    """A delivery pass stops after its budget (the heartbeat interval), so heartbeats go
    on while a long backlog drains, and every event still arrives once, in order."""
    from clusterctl import config as cfg
    from clusterctl.agent.control import ControlClient
    from clusterctl.agent.heartbeat import Delivery
    from clusterctl.events.log import EventLog
    from clusterctl.events.outbox import Outbox

    state = tmp_path / "state"
    log_ = EventLog(state, "node-1")
    for n in range(900):  # five batches of at most 200
        log_.record("swap_expanded", f"event {n}", {"n": n}, now=time.time())
    with running() as plane:
        plane.delay_s = 0.3  # each request
        config = cfg.with_changes(cfg.Config(), "heartbeat", {"control_url": plane.url,
                                                             "token_file": str(tmp_path / "t")})
        outbox = Outbox(state)
        delivery = Delivery(ControlClient(config.heartbeat), outbox, state)
        started = time.monotonic()
        assert delivery.flush(max_batches=50, budget_s=1.0) is True
        took = time.monotonic() - started
        assert took < 1.0 + 0.3 + 0.5  # the budget, one request in flight, slack
        assert delivery.more  # events are left for the next pass
        for _ in range(40):
            if not delivery.more:
                break
            delivery.flush(max_batches=50, budget_s=1.0)
        with plane.lock:
            got = [e["n"] for e in plane.events]
    assert got == list(range(900))


# -- found by a second review ------------------------------------------------------------


def test_clients_that_hang_up_are_not_failures_of_the_api(
        node: Callable[..., Node], caplog: pytest.LogCaptureFixture) -> None:
    """Any local user may connect and hang up (or reset) before the answer: that is not
    logged as an error, nor counted as one."""
    import socket
    import struct

    n = node()
    n.start()
    with caplog.at_level("ERROR"):
        for i in range(60):
            with socket.create_connection(("127.0.0.1", n.port), timeout=5) as sock:
                if i % 2:  # a reset rather than a close
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.5)
    assert loop_errors(n, "api") == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_reload_to_shorter_intervals_takes_effect_at_once_and_the_watchdog_stays_quiet(
        node: Callable[..., Node]) -> None:
    with running() as plane:
        n = node(plane.url)
        slow = n.conf.read_text().replace("monitor_interval = 0.1", "monitor_interval = 60")
        n.conf.write_text(slow.replace("interval = 1\n", "interval = 3600\n"))
        agent = n.start()
        wait_until(lambda: len(plane.heartbeats) >= 1)
        n.conf.write_text(slow.replace("monitor_interval = 60", "monitor_interval = 0.1"))
        reloaded = time.monotonic()
        agent.reload()
        wait_until(lambda: (agent.progress.gpu_at or 0) > reloaded, 3)  # not in 60 s
        beats = len(plane.heartbeats)
        n.conf.write_text(n.conf.read_text().replace("interval = 3600\n", "interval = 1\n"))
        agent.reload()
        wait_until(lambda: len(plane.heartbeats) >= beats + 2, 5)  # not in an hour
        assert agent.problems() == []


def test_a_reload_that_moves_the_state_dir_or_the_api_is_refused(
        node: Callable[..., Node], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The outbox, the power records and the API's socket stay where the agent started;
    a reload that would split them asks for a restart and changes nothing."""
    n = node()
    agent = n.start()
    good = n.conf.read_text()
    for change in (good.replace(f'state_dir = "{n.state}"', f'state_dir = "{tmp_path}/s2"'),
                   good.replace(f"127.0.0.1:{n.port}", "127.0.0.1:1")):
        n.conf.write_text(change.replace("[gpu]\n", "[gpu]\ntemp_optimal = 60\n"))
        with caplog.at_level("ERROR"):
            agent.reload()
        assert agent.config.gpu.temp_optimal_c == 65  # nothing of it was taken
        assert "take a restart" in errors_logged(caplog, "reload refused")[-1]
    assert agent.config.paths.state_dir == n.state


def test_two_flushes_at_once_send_each_event_once(tmp_path: Path) -> None:
    """The delivery loop and a hibernation's drain may flush together."""
    from clusterctl import config as cfg
    from clusterctl.agent.control import ControlClient
    from clusterctl.agent.heartbeat import Delivery
    from clusterctl.events.log import EventLog
    from clusterctl.events.outbox import Outbox

    state = tmp_path / "state"
    log_ = EventLog(state, "node-1")
    for n in range(450):
        log_.record("swap_expanded", f"event {n}", {"n": n}, now=time.time())
    with running() as plane:
        plane.delay_s = 0.2
        config = cfg.with_changes(cfg.Config(), "heartbeat", {"control_url": plane.url,
                                                             "token_file": str(tmp_path / "t")})
        delivery = Delivery(ControlClient(config.heartbeat), Outbox(state), state)
        flushes = [threading.Thread(target=delivery.flush) for _ in range(2)]
        for thread in flushes:
            thread.start()
        for thread in flushes:
            thread.join(30)
        with plane.lock:
            got = [e["n"] for e in plane.events]
    assert got == list(range(450))
