from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from clusterctl import config as cfg

TESTS = Path(__file__).parent
FAKE_NVML_DIR = TESTS / "fakes" / "nvml"
HOSTS = TESTS / "fixtures" / "hosts"
REPO = TESTS.parent


def load_fake_nvml(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A fresh copy of the fake pynvml (its own machine state)."""
    spec = importlib.util.spec_from_file_location("fake_pynvml", FAKE_NVML_DIR / "pynvml.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "fake_pynvml", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The fake, installed as ``pynvml`` for code that imports it (the CLI)."""
    module = load_fake_nvml(monkeypatch)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return module


@pytest.fixture(autouse=True)
def _no_host_config(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
                    ) -> Iterator[None]:
    """Tests never read this machine's /etc/clusterctl or an inherited CLUSTERCTL_CONFIG."""
    monkeypatch.delenv("CLUSTERCTL_CONFIG", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.setattr(cfg, "DEFAULT_PATH", tmp_path_factory.mktemp("etc") / "absent.toml")
    yield


HOST_PATHS = (Path("/etc/clusterctl"), Path("/var/lib/clusterctl"), Path("/run/clusterctl"))


@pytest.fixture(scope="session", autouse=True)
def _host_left_as_it_was() -> Iterator[None]:
    """No test writes clusterctl's real directories on this machine, nor empties /etc: a
    test that uses the default paths (or a product bug that ignores the configured ones)
    fails the run here, naming what appeared."""
    existed = {path: path.exists() for path in HOST_PATHS}
    etc = {entry.name for entry in Path("/etc").iterdir()}
    yield
    appeared = [str(path) for path, was in existed.items() if not was and path.exists()]
    gone = sorted(etc - {entry.name for entry in Path("/etc").iterdir()})
    assert not appeared and not gone, (
        f"the tests changed this machine: created {appeared or 'nothing'}, removed from /etc "
        f"{gone or 'nothing'}")


@pytest.fixture(autouse=True)
def _no_swap_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """Swap a test's agent turned on under its tmp_path is swapped off when the test ends,
    pass or fail: an in-process agent runs a swap step whenever the kernel reports memory
    pressure, and its swap dir is the test's own."""
    if "tmp_path" not in request.fixturenames:
        yield
        return
    tmp = request.getfixturevalue("tmp_path")
    yield
    swapoff_under(tmp)


def swapoff_under(tmp: Path) -> None:
    """Swap areas under ``tmp`` swapped off (an agent the test started turned them on)."""
    if not Path("/proc/swaps").exists():
        return
    for line in Path("/proc/swaps").read_text().splitlines()[1:]:
        path = line.split()[0].replace("\\040", " ")
        if path.startswith(f"{tmp}/"):
            subprocess.run(["swapoff", path], check=False, capture_output=True)


def quiet_psi(tmp_path: Path) -> Path:
    """A root whose /proc/pressure/memory takes a trigger and never fires (``Agent.psi_root``):
    an in-process agent then makes no swap step on this machine's memory pressure."""
    root = tmp_path / "quiet-psi"
    (root / "proc/pressure").mkdir(parents=True, exist_ok=True)
    (root / "proc/pressure/memory").touch()
    return root


def quiet_host(agent: Any, tmp_path: Path) -> None:
    """Keep an in-process agent off this machine's memory pressure and cgroups: PSI that
    never fires (``quiet_psi``) and a cgroup root with no hierarchy under it, so no cgroup
    that other tests or systemd sandboxes leave on the host is watched or acted on."""
    agent.psi_root = quiet_psi(tmp_path)
    empty = tmp_path / "no-cgroups"
    empty.mkdir(exist_ok=True)
    agent.cgroup_root = empty


@pytest.fixture
def node(tmp_path: Path, nv: ModuleType) -> Iterator[Callable[..., Any]]:
    """Agents in-process (tests.test_agent.Node) on the test module's ``nv`` fake GPUs,
    stopped at the end."""
    from tests.test_agent import Node

    made: list[Node] = []

    def make(control_url: str = "", **extra: str) -> Node:
        n = Node(tmp_path, nv, control_url, **extra)
        made.append(n)
        return n

    yield make
    for n in made:
        n.stop()


@pytest.fixture
def idle_gpu(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """One H100 at 1 % utilization: idle as hibernation sees it."""
    nv = load_fake_nvml(monkeypatch)
    nv.configure({"gpus": [{**H100, "uuid": "GPU-0", "utilization_gpu": 1}]})
    return nv


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """One throwaway PostgreSQL server for the run (tests.postgres): its URL,
    ``postgresql://USER:PASS@127.0.0.1:PORT/``. Without PostgreSQL the tests that need it
    fail: CI must really run it."""
    from tests.postgres import PostgresServer, PostgresUnavailable

    try:
        server = PostgresServer()
        server.start()
    except PostgresUnavailable as e:
        pytest.fail(f"no PostgreSQL for the tests: {e}", pytrace=False)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh database of its own for the test, dropped after:
    ``postgresql://USER:PASS@127.0.0.1:PORT/t_<random>``."""
    from tests.postgres import fresh_database

    with fresh_database(postgres_server) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The test once on SQLite (a file under tmp_path) and once on a fresh PostgreSQL
    database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/fleet.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


CLOSED = "http://127.0.0.1:9"  # nothing listens there


def agent_config(tmp_path: Path, hibernate: str, *, port: int, control_url: str = "",
                 interval_s: int = 1, ollama_url: str = CLOSED) -> str:
    """An agent's config: ``[hibernate]`` as given, everything it writes under tmp_path,
    its API on ``port`` (which a reload must keep), GPU samples every 0.2 s."""
    return (f"[hibernate]\n{hibernate}"
            f'[heartbeat]\ncontrol_url = "{control_url}"\ninterval = {interval_s}\n'
            f'instance_id = "vast_12345"\ntoken_file = "{tmp_path / "none"}"\n'
            "[gpu]\nmonitor_interval = 0.2\n"
            f'[api]\nlisten = "127.0.0.1:{port}"\n'
            f'[paths]\nstate_dir = "{tmp_path / "state"}"\nrun_dir = "{tmp_path / "run"}"\n'
            f'[swap]\ndir = "{tmp_path / "swap"}"\n'
            f'[ollama]\nurl = "{ollama_url}"\n')


@pytest.fixture
def start_agent(tmp_path: Path, idle_gpu: ModuleType
                ) -> Iterator[Callable[..., tuple[Any, list[str]]]]:
    """Start an agent on a config file (and its notifications, as systemd would get
    them); this machine's logind is not asked, PSI never fires; stopped at the end."""
    from clusterctl.agent.service import Agent
    from clusterctl.host.nvml import Nvml

    made: list[Agent] = []

    def start(path: Path) -> tuple[Agent, list[str]]:
        notes: list[str] = []
        agent = Agent(path, nvml=Nvml(module=idle_gpu), notify=notes.append)
        agent.hibernation.logind = False
        quiet_host(agent, tmp_path)
        made.append(agent)
        agent.start()
        return agent, notes

    yield start
    for agent in made:
        agent.stop()


@pytest.fixture
def agent_with(tmp_path: Path, start_agent: Callable[..., tuple[Any, list[str]]]
               ) -> Callable[..., Any]:
    """Agents in-process on one idle GPU, hibernation on after 6 s, ``[hibernate]`` lines
    and the control plane given."""
    from tests.fakes.control_plane import free_port

    def make(control_url: str, hibernate: str) -> Any:
        path = tmp_path / "clusterctl.toml"
        path.write_text(agent_config(
            tmp_path, f"enabled = true\npause_after_minutes = 0.1\n{hibernate}",
            port=free_port(), control_url=control_url))
        return start_agent(path)[0]

    return make


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    """A config whose Ollama probe points at a closed port (no Ollama on test hosts)."""
    path = tmp_path / "clusterctl.toml"
    path.write_text('[ollama]\nurl = "http://127.0.0.1:9"\n')
    return path


def write_scenario(path: Path, scenario: dict[str, Any]) -> Path:
    path.write_text(json.dumps(scenario))
    return path


H100 = {
    "name": "NVIDIA H100 80GB HBM3",
    "uuid": "GPU-3c1e4f0a-5b7d-4c1e-9a2b-8f0e6d4c2a10",
    "pci_bus_id": "00000000:19:00.0",
    "memory_total": 85_520_809_984,
    "memory_used": 4_194_304_000,
}
A100 = {
    "name": "NVIDIA A100-SXM4-80GB",
    "memory_total": 85_899_345_920,
}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failing test that used a systemd sandbox gets that sandbox's journal in its report."""
    from scripts.systemd_sandbox import Sandbox

    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when != "call" or not report.failed:
        return
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, Sandbox) and value.pid is not None:
            report.sections.append(("systemd sandbox journal", value.journal("-n", "300")))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Each unit's `systemd-analyze security` exposure, when the unit tests measured it."""
    units = sys.modules.get("tests.test_systemd_units")
    measured = getattr(units, "MEASURED_EXPOSURE", {})
    if measured:
        terminalreporter.section("systemd-analyze security --offline=yes")
        for name, score in sorted(measured.items()):
            recorded = units.RECORDED_EXPOSURE[name]  # type: ignore[union-attr]
            terminalreporter.write_line(f"{name}: exposure {score} (recorded {recorded})")


def wait_until(condition: Callable[[], object], timeout_s: float = 15.0) -> None:
    """Poll ``condition`` every 50 ms; AssertionError when it is still false at the end."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s")
        time.sleep(0.05)


def run_as_systemd_would(agent: Any, operator: Callable[[Callable[[int], None]], None]
                         ) -> None:
    """``agent.run()`` on this (the main) thread, as under systemd, while ``operator(send)``
    acts from another thread: ``send`` signals the agent only while run() holds its handlers
    (never pytest itself); the handlers are put back and the agent stopped whatever happens."""
    import os
    import signal
    import threading

    in_run = threading.Event()

    def send(sig: int) -> None:
        if in_run.is_set():
            os.kill(os.getpid(), sig)

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    helper = threading.Thread(target=operator, args=(send,), daemon=True)
    helper.start()
    in_run.set()
    try:
        assert agent.run() == 0
    finally:
        in_run.clear()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        agent.stop()
    helper.join(5)


@pytest.fixture
def clock() -> Any:
    """A wall and monotonic clock the test moves by hand (tests.fleet.Clock)."""
    from tests.fleet import Clock

    return Clock()


@pytest.fixture
def server(tmp_path: Path, database_url: str, clock: Any) -> Iterator[Any]:
    """A real control plane on 127.0.0.1 (tests.fleet.FleetServer) on ``database_url``
    (SQLite, then PostgreSQL), on ``clock``."""
    from tests.fleet import FleetServer

    with FleetServer(tmp_path, database_url, clock=clock) as srv:
        yield srv
