"""The agent's swap policy: a real memory pressure trigger (a process thrashing in a small
memory cgroup makes the kernel's PSI trigger fire, and the agent answers with a swap
policy step), the steady step of the agent that owns the policy, and the trigger armed
again at a reloaded threshold."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from types import ModuleType

import pytest

from clusterctl.agent.service import Agent
from clusterctl.host.nvml import Nvml
from clusterctl.system.systemd import AGENT_UNIT, own_unit
from tests.cgroups import memory_cgroup, run_in
from tests.conftest import load_fake_nvml, quiet_host, quiet_psi, wait_until
from tests.fakes.control_plane import free_port
from tests.loopfs import active_swaps_under, loop_mount

pytestmark = pytest.mark.integration
HOG = ("b = bytearray(128 * 2**20)\n"
       "while True:\n"
       "    for i in range(0, len(b), 4096): b[i] = (b[i] + 1) % 256\n")


def test_memory_pressure_runs_a_swap_step_within_seconds(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    if not Path("/proc/pressure/memory").exists():
        pytest.skip("this kernel has no PSI")
    nv: ModuleType = load_fake_nvml(monkeypatch)
    nv.configure({"gpus": []})
    with loop_mount(tmp_path, "ext4", size_mib=1024) as mount, \
            memory_cgroup("psi") as (group, set_limit):
        # the thrashing process needs swap of its own to thrash into (the test's file)
        hog_swap = mount / "hog-swap"
        subprocess.run(["fallocate", "-l", "256M", str(hog_swap)], check=True)
        hog_swap.chmod(0o600)
        subprocess.run(["mkswap", "-q", str(hog_swap)], check=True)
        subprocess.run(["swapon", str(hog_swap)], check=True)
        conf = tmp_path / "clusterctl.toml"
        conf.write_text(
            f'[swap]\ndir = "{mount / "swap"}"\nmin_size = "64M"\nmax_size = "128M"\n'
            'increment = "64M"\n'
            f'pressure_threshold = 1.0\n[api]\nlisten = "127.0.0.1:{free_port()}"\n'
            f'[paths]\nstate_dir = "{tmp_path / "state"}"\nrun_dir = "{tmp_path / "run"}"\n'
            '[ollama]\nurl = "http://127.0.0.1:9"\n')
        agent = Agent(conf, nvml=Nvml(module=nv), notify=lambda _: None)
        hog = None
        try:
            agent.start()
            deadline = time.monotonic() + 10
            while agent.progress.pressure_at is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert agent.progress.pressure_at is not None, "the trigger was not armed"
            assert active_swaps_under(mount / "swap") == []
            set_limit(32)
            started = time.monotonic()
            hog = run_in(group, HOG)
            while not active_swaps_under(mount / "swap"):
                assert time.monotonic() - started < 30, (
                    f"no swap step within 30 s: {agent.progress}")
                time.sleep(0.05)
            took = time.monotonic() - started
            print(f"pressure to an active swap file: {took:.2f} s")
            while agent.progress.swap_steps < 1:  # the step returns after its swapon
                assert time.monotonic() - started < 30
                time.sleep(0.05)
            assert active_swaps_under(mount / "swap") == [str(mount / "swap/swap-0001")]
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
            agent.stop()
            subprocess.run(["swapoff", str(hog_swap)], check=False)


def _config(tmp_path: Path, swap: str) -> Path:
    conf = tmp_path / "clusterctl.toml"
    conf.write_text(f"[swap]\n{swap}[api]\nlisten = \"127.0.0.1:{free_port()}\"\n"
                    f'[paths]\nstate_dir = "{tmp_path / "state"}"\nrun_dir = "{tmp_path / "run"}"\n'
                    '[ollama]\nurl = "http://127.0.0.1:9"\n')
    return conf


def test_the_agent_that_owns_the_swap_policy_steps_every_check_interval_without_pressure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run as its unit the agent is the only scheduler (the timer stands down): its own
    steady step grows swap once memory use is over the threshold, with no PSI event
    (a trigger that never fires) and on its clock's check_interval, not before."""
    nv: ModuleType = load_fake_nvml(monkeypatch)
    nv.configure({"gpus": []})
    with loop_mount(tmp_path, "ext4", size_mib=1024) as mount:
        swap_dir = mount / "swap"
        conf = _config(tmp_path, f'dir = "{swap_dir}"\nmin_size = "64M"\nmax_size = "256M"\n'
                       'increment = "64M"\nmemory_threshold = 1\ncheck_interval = 30\n')
        agent = Agent(conf, nvml=Nvml(module=nv), notify=lambda _: None,
                      owns_swap_policy=True)
        quiet_host(agent, tmp_path)
        try:  # its loops driven by Agent.tick on the test's clock
            agent.tick(1000.0)  # the first step at once, as the timer's at boot: min_size
            assert agent.progress.swap_steps == 1
            assert active_swaps_under(swap_dir) == [f"{swap_dir}/swap-0001"]
            for now in (1001.0, 1010.0, 1029.0):
                agent.tick(now)
            assert agent.progress.swap_steps == 1  # no step is due before check_interval
            agent.tick(1030.0)
            assert agent.progress.swap_steps == 2
            assert active_swaps_under(swap_dir) == [f"{swap_dir}/swap-0001",
                                                    f"{swap_dir}/swap-0002"]
            assert agent.progress.last_swap is not None
            assert "memory_threshold 1%" in agent.progress.last_swap
        finally:
            agent.stop()


def test_a_reload_that_changes_the_pressure_threshold_arms_the_trigger_at_the_new_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the kernel watches is the last trigger written to /proc/pressure/memory
    ("some STALL_US WINDOW_US"): after `systemctl reload` (SIGHUP: Agent.reload) with
    a new [swap] pressure_threshold, the agent writes one at the new threshold."""
    nv: ModuleType = load_fake_nvml(monkeypatch)
    nv.configure({"gpus": []})
    conf = _config(tmp_path, f'dir = "{tmp_path / "swap"}"\npressure_threshold = 10.0\n')
    agent = Agent(conf, nvml=Nvml(module=nv), notify=lambda _: None, owns_swap_policy=False)
    quiet_host(agent, tmp_path)
    trigger = agent.psi_root / "proc/pressure/memory"
    try:
        agent.start()
        wait_until(lambda: trigger.read_text() == "some 100000 1000000\n")  # 10 % of 1 s
        trigger.write_text("")
        conf.write_text(conf.read_text().replace("pressure_threshold = 10.0",
                                                 "pressure_threshold = 2.5"))
        agent.reload()
        wait_until(lambda: trigger.read_text() == "some 25000 1000000\n", timeout_s=5)
        assert agent.loops["pressure"].is_alive() and agent.problems() == []
    finally:
        agent.stop()


def test_only_an_agent_that_runs_as_its_unit_owns_the_swap_policy(tmp_path: Path) -> None:
    """The timer stands down exactly while clusterctl-agent.service is active, so that
    unit's agent, and no other (by hand, in a test), takes the steady steps."""
    cases = {"0::/system.slice/clusterctl-agent.service\n": AGENT_UNIT,
             "12:pids:/system.slice/x.service\n1:name=systemd:/system.slice/"
             "clusterctl-agent.service\n0::/\n": AGENT_UNIT,
             "0::/user.slice/user-0.slice/session-3.scope\n": None,
             "0::/system.slice/ssh.service\n": "ssh.service"}
    for i, (text, unit) in enumerate(cases.items()):
        root = tmp_path / str(i)
        (root / "proc/self").mkdir(parents=True)
        (root / "proc/self/cgroup").write_text(text)
        assert own_unit(root) == unit, text
    assert own_unit(tmp_path / "nothing") is None


def test_a_cgroup_swap_cannot_help_is_named_in_an_event_and_grows_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A watched cgroup whose swap is capped (v1: memsw limit = memory limit; v2:
    memory.swap.max 0) loses a process to the OOM killer: the agent says which cgroup,
    that swap cannot help it and the fix, once, and adds no swap for it."""
    nv: ModuleType = load_fake_nvml(monkeypatch)
    nv.configure({"gpus": []})
    with loop_mount(tmp_path, "ext4", size_mib=512) as mount, \
            memory_cgroup("capped") as (group, set_limit):
        set_limit(32)
        capped = group / ("memory.memsw.limit_in_bytes" if (group / "memory.memsw.limit_in_bytes"
                                                            ).exists() else "memory.swap.max")
        if not capped.exists():
            pytest.skip("no swap accounting in this memory cgroup controller")
        capped.write_text(f"{32 * 2**20}\n" if capped.name.startswith("memory.memsw") else "0\n")
        swap_dir = mount / "swap"
        conf = _config(tmp_path, f'dir = "{swap_dir}"\nmin_size = "64M"\nmax_size = "256M"\n'
                       f'increment = "64M"\nwatch_cgroups = ["{group.name}"]\n')
        agent = Agent(conf, nvml=Nvml(module=nv), notify=lambda _: None, owns_swap_policy=True)
        agent.psi_root = quiet_psi(tmp_path)  # the real cgroups: it watches one
        hogs = []
        try:
            agent.start()
            wait_until(lambda: active_swaps_under(swap_dir) == [f"{swap_dir}/swap-0001"])
            for _ in range(2):  # two kills: said once
                hog = run_in(group, "b = bytearray(96 * 2**20)\n"
                                    "for i in range(0, len(b), 4096): b[i] = 1\n")
                hogs.append(hog)
                assert hog.wait(timeout=60) == -9  # SIGKILL: the OOM killer
            events = tmp_path / "state/events.jsonl"

            def said() -> list[dict[str, object]]:
                return [e for e in map(json.loads, events.read_text().splitlines())
                        if e["event_type"] == "swap_cannot_help"] if events.exists() else []

            wait_until(lambda: said() != [], timeout_s=15)
            time.sleep(1.5)  # a second kill's signal would be recorded by now
        finally:
            for hog in hogs:
                if hog.poll() is None:
                    hog.kill()
                    hog.wait()
            agent.stop()
        [event] = said()
        assert event["cgroup"] == group.name
        assert str(event["reason"]).startswith(f"cgroup {group.name} is ")
        assert "swap cannot help it" in str(event["reason"])
        assert event["fix"] and event["why"]
        assert active_swaps_under(swap_dir) == [f"{swap_dir}/swap-0001"]  # nothing grown
