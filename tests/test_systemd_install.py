"""install.sh on a node with a real systemd (a sandbox), end to end, in order.

A fresh install enables the timers; the swap timer fires and makes min_size of swap in
a real ext4 (a loop filesystem mounted at the default swap dir); its logs reach the
journal with priorities; a second install changes nothing; --uninstall takes the units
and the swap away and keeps the config; --purge leaves nothing of clusterctl's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from scripts.systemd_sandbox import Sandbox, unavailable
from tests.conftest import REPO
from tests.loopfs import active_swaps_under, loop_mount, require_loop

pytestmark = pytest.mark.integration

SWAP_DIR = "/var/lib/clusterctl/swap"
INSTALL = "/srv/clusterctl/install.sh"
TIMERS = sorted(p.name for p in (REPO / "units").glob("*.timer"))
UNITS = sorted(p.name for p in (REPO / "units").iterdir() if p.suffix in (".service", ".timer"))
GIB = 2**30
SYSCTLS = (Path("/proc/sys/vm/swappiness"), Path("/proc/sys/vm/vfs_cache_pressure"))
OLLAMA_STANDIN = """[Unit]
Description=a stand-in for Ollama that counts its starts
[Service]
ExecStart=/bin/sh -c 'echo "$OLLAMA_MAX_LOADED_MODELS" >> /var/lib/ollama-starts; \\
  exec sleep infinity'
"""


class Node:
    def __init__(self, sandbox: Sandbox, swap_fs: Path) -> None:
        self.sandbox = sandbox
        self.swap_fs = swap_fs  # the swap dir's filesystem, as the host sees it

    def run(self, script: str) -> str:
        return self.sandbox.run(script).stdout

    def swap_files(self) -> list[str]:
        return sorted(p.name for p in self.swap_fs.iterdir() if p.name.startswith("swap-"))

    def installed(self) -> dict[str, str]:
        """Everything install.sh owns, with mode, size and mtime."""
        out = self.run("find /opt/clusterctl /etc/clusterctl /usr/local/bin/clusterctl "
                       "/etc/systemd/system -path '*clusterctl*' -printf '%p %m %s %T@\\n' "
                       "2>/dev/null | sort")
        return dict(line.split(" ", 1) for line in out.splitlines())


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    reason = unavailable()
    if reason:
        pytest.skip(f"no systemd sandbox here: {reason}")
    require_loop("ext4")
    work = tmp_path_factory.mktemp("node")
    sysctls = {p: p.read_text() for p in SYSCTLS}  # kernel-wide: optimize apply sets them
    try:
        # 8 GiB, sparse: min_size (2G) fallocated plus the free-space floor
        with loop_mount(work / "disk", "ext4", size_mib=8192) as swap_fs, \
                Sandbox(work / "sandbox", binds={SWAP_DIR: swap_fs},
                        writable_sysctl=True) as sandbox:
            print(f"sandbox booted in {sandbox.boot_s:.2f} s")
            yield Node(sandbox, swap_fs)
        assert active_swaps_under(swap_fs) == []
    finally:
        for path, value in sysctls.items():
            path.write_text(value)


@pytest.fixture
def sandbox(node: Node) -> Sandbox:
    """The node's sandbox, named so that a failing test's report carries its journal."""
    return node.sandbox


def test_fresh_install_enables_and_starts_the_timers(node: Node, sandbox: Sandbox) -> None:
    out = node.run(f"{INSTALL}")
    assert f"enabled {' '.join(TIMERS)}" in out or all(t in out for t in TIMERS), out
    assert "running clusterctl check quick" in out
    timers = node.run("systemctl list-timers --all --no-legend --plain")
    for timer in TIMERS:
        assert timer in timers
        assert node.run(f"systemctl is-enabled {timer}") == "enabled\n"
        assert node.run(f"systemctl is-active {timer}") == "active\n"
    for unit in UNITS:
        assert node.run(f"systemctl show -P LoadState {unit}") == "loaded\n", unit
    if (REPO / "units/clusterctl-agent.service").exists():
        assert node.run("systemctl is-enabled clusterctl-agent.service") == "enabled\n"
        assert node.run("systemctl is-active clusterctl-agent.service") == "active\n"


def test_the_swap_timer_makes_min_size_in_the_swap_filesystem(node: Node,
                                                              sandbox: Sandbox) -> None:
    # OnBootSec=10s is counted from the sandbox's start (systemd maps it to OnStartupSec
    # in a container); nothing here starts the service by hand
    # the agent runs the policy (the timer's service stands down while it is active; a
    # timer run before the agent was up may have made them): either way, min_size
    sandbox.wait_for(f"test -e {SWAP_DIR}/swap-0002", timeout_s=60)
    # the timer fires all the same (10 s after start), and its service stands down
    sandbox.wait_for("[ \"$(systemctl show -P LastTriggerUSecMonotonic clusterctl-swap.timer)\""
                     " != 0 ]", timeout_s=30)
    assert node.swap_files() == ["swap-0001", "swap-0002"]  # 2 x 1G increments
    assert sum((node.swap_fs / f).stat().st_size for f in node.swap_files()) == 2 * GIB
    # the kernel names them by the unit's own mounts, gone once it exited ("/swap-0001");
    # clusterctl still knows them for what they are
    assert len(node.run("swapon --show=NAME --noheadings").split()) == 2
    status = json.loads(node.run("clusterctl swap status --json"))
    assert [(f["path"], f["state"]) for f in status["files"]] == [
        (f"{SWAP_DIR}/swap-0001", "active"), (f"{SWAP_DIR}/swap-0002", "active")]
    assert status["total"] == 2 * GIB
    assert status["other_swap"] == []
    assert status["swap_dir"]["fstype"] == "ext4"
    events = [json.loads(line) for line in
              node.run("cat /var/lib/clusterctl/events.jsonl").splitlines()]
    swap_events = [e["event_type"] for e in events if e["event_type"].startswith("swap_")]
    assert swap_events == ["swap_expanded", "swap_expanded"], events


def test_its_logs_reach_the_journal_with_priorities(node: Node, sandbox: Sandbox) -> None:
    info = node.run("journalctl --no-pager -o cat -u clusterctl-swap -u clusterctl-agent")
    # made by the agent's step, or by a timer run before the agent was up
    assert ("swap policy step: create swap-0001" in info or "created swap-0001 (1G)" in info)
    node.run("systemctl stop clusterctl-agent.service")  # the timer's service steps again
    node.run(f"swapoff {SWAP_DIR}/swap-0002")  # the operator takes one away
    node.run("systemctl start clusterctl-swap.service")  # oneshot: returns when done
    node.run("systemctl start clusterctl-agent.service")
    warnings = node.run("journalctl --no-pager -o cat -u clusterctl-swap -p warning")
    assert f"{SWAP_DIR}/swap-0002 was swapped off by someone else" in warnings
    assert "created swap-0001" not in warnings  # info lines are filtered out
    assert node.run("systemctl show -P Result clusterctl-swap.service") == "success\n"


def test_the_hardened_unit_can_zero_fill_swap_on_and_swap_off(node: Node,
                                                               sandbox: Sandbox) -> None:
    """Every privileged step of the swap job, under the unit's own sandboxing."""
    dropin = "/run/systemd/system/clusterctl-swap.service.d"
    node.run(f"mkdir -p {dropin} && printf '%s\\n' '[Service]' 'ExecStart=' "
             "'ExecCondition=' 'ExecStart=/usr/local/bin/clusterctl swap expand --size 64M' "
             "'ExecStart=/usr/local/bin/clusterctl swap shrink --size 64M' "
             f"> {dropin}/test.conf && systemctl daemon-reload")
    try:
        node.run("clusterctl config set swap.allocation zeros")
        since = node.run("date +%s").strip()
        node.run("systemctl start clusterctl-swap.service")
        log = node.run(f"journalctl --no-pager -o cat -u clusterctl-swap --since @{since}")
        assert "created swap-0004 (64M)" in log, log
        assert "removed swap-0004 (64M)" in log, log
        assert '"method":"zeros"' in node.run("grep swap-0004 /var/lib/clusterctl/events.jsonl")
        assert node.run("systemctl show -P Result clusterctl-swap.service") == "success\n"
    finally:
        node.run(f"rm -rf {dropin} && systemctl daemon-reload "
                 "&& clusterctl config set swap.allocation auto")


def test_the_optimize_unit_tunes_and_restarts_ollama_once(node: Node,
                                                          sandbox: Sandbox) -> None:
    node.run(f"cat > /etc/systemd/system/ollama.service <<'EOF'\n{OLLAMA_STANDIN}EOF\n"
             "systemctl daemon-reload && systemctl start ollama.service")
    assert node.run("cat /var/lib/ollama-starts") == "\n"  # started once, no settings yet
    node.run("systemctl start clusterctl-optimize.service")
    assert node.run("systemctl show -P Result clusterctl-optimize.service") == "success\n"
    dropin = node.run("cat /etc/systemd/system/ollama.service.d/50-clusterctl.conf")
    models = dropin.split("OLLAMA_MAX_LOADED_MODELS=")[1].split('"')[0]
    # restarted exactly once, and with the new environment (the drop-in was loaded)
    assert node.run("cat /var/lib/ollama-starts") == f"\n{models}\n"
    plan = json.loads(node.run("clusterctl optimize plan --json"))
    swappiness = next(s for s in plan["settings"] if s["key"] == "vm.swappiness")
    assert swappiness["current"] == swappiness["value"]  # live now
    assert node.run("cat /etc/sysctl.d/90-clusterctl.conf").endswith(
        f"vm.swappiness = {swappiness['value']}\nvm.vfs_cache_pressure = "
        f"{next(s for s in plan['settings'] if s['key'] == 'vm.vfs_cache_pressure')['value']}\n")
    node.run("systemctl start clusterctl-optimize.service")  # nothing changed: no restart
    assert node.run("cat /var/lib/ollama-starts") == f"\n{models}\n"
    log = node.run("journalctl --no-pager -o cat -u clusterctl-optimize")
    assert "nothing to change" in log
    assert node.run("clusterctl optimize verify") == (
        "no drift: everything apply set is still in effect\n")


def test_optimize_revert_removes_the_dropin_and_restarts_ollama(node: Node,
                                                               sandbox: Sandbox) -> None:
    out = node.run("clusterctl optimize revert")
    assert "remove /etc/systemd/system/ollama.service.d/50-clusterctl.conf" in out
    assert "restarted ollama.service" in out
    assert node.run("test ! -e /etc/systemd/system/ollama.service.d && echo gone") == "gone\n"
    assert node.run("cat /var/lib/ollama-starts").endswith("\n\n")  # default settings again
    assert "OLLAMA" not in node.run("systemctl show -P Environment ollama.service")
    assert {p: p.read_text() for p in SYSCTLS} == {p: node.run(f"cat {p}") for p in SYSCTLS}


AGENT = "clusterctl-agent.service"
AGENT_DROPIN = "/run/systemd/system/clusterctl-agent.service.d"


def test_the_agent_is_ready_only_when_serving_and_says_why_it_is_degraded(
        node: Node, sandbox: Sandbox) -> None:
    node.run(f"systemctl restart {AGENT}")  # Type=notify: returns after READY=1
    assert node.run(f"systemctl show -P ActiveState {AGENT}") == "active\n"
    health = json.loads(node.run("curl -sS --max-time 5 http://127.0.0.1:9408/healthz"))
    assert health["status"] == "degraded"  # no GPU here: degraded, and ready all the same
    status = node.run(f"systemctl show -P StatusText {AGENT}")
    assert status.startswith("no GPU (no NVIDIA driver: libnvidia-ml.so.1 was not found); "
                             "swap "), status
    assert "heartbeats off" in status
    assert "DCGM_FI_DEV_GPU_TEMP{" not in node.run("curl -sS http://127.0.0.1:9408/metrics")


def test_a_hung_gpu_loop_is_named_and_the_watchdog_restarts_the_agent_within_its_limit(
        node: Node, sandbox: Sandbox) -> None:
    """The driver hangs in the GPU loop only (the fake NVML blocks while a file exists):
    the rest of the agent lives on, names the stuck loop in its status once the GPU
    loop's limit (30 s at 3 s samples) has passed, and holds the pings back, so systemd
    restarts it within that limit plus WatchdogSec."""
    node.run(f"mkdir -p {AGENT_DROPIN} && printf '%s\\n' '[Service]' 'WatchdogSec=3s' "
             "'Environment=PYTHONPATH=/srv/clusterctl/tests/fakes/nvml' "
             "'Environment=FAKE_NVML_SCENARIO=/run/fake-gpu.json' "
             "'Environment=FAKE_NVML_STALL_FILE=/run/nvml-hangs' "
             f"> {AGENT_DROPIN}/hang.conf && echo '{{\"gpus\": [{{}}]}}' > /run/fake-gpu.json "
             f"&& systemctl daemon-reload && systemctl restart {AGENT}")
    try:
        pid = node.run(f"systemctl show -P MainPID {AGENT}").strip()
        node.run("touch /run/nvml-hangs")
        hung_at = time.monotonic()
        sandbox.wait_for(f"systemctl show -P StatusText {AGENT} | grep -q "
                         "'gpu loop stuck for .* watchdog pings held back'", timeout_s=45)
        named_s = time.monotonic() - hung_at
        assert node.run(f"systemctl show -P MainPID {AGENT}").strip() == pid  # alive till now
        sandbox.wait_for(f"[ \"$(systemctl show -P NRestarts {AGENT})\" -ge 1 ]", timeout_s=30)
        restarted_s = time.monotonic() - hung_at
        node.run("rm -f /run/nvml-hangs")
        sandbox.wait_for(f"[ \"$(systemctl show -P ActiveState {AGENT})\" = active ] && "
                         f"[ \"$(systemctl show -P MainPID {AGENT})\" != {pid} ]", timeout_s=30)
        print(f"named stuck after {named_s:.1f} s, restarted after {restarted_s:.1f} s")
        assert named_s >= 25 and restarted_s <= 30 + 3 + 10, (named_s, restarted_s)
        assert "Watchdog timeout" in node.run(f"journalctl --no-pager -o cat -u {AGENT}")
    finally:
        node.run(f"rm -rf {AGENT_DROPIN} /run/nvml-hangs /run/fake-gpu.json && "
                 f"systemctl daemon-reload && systemctl restart {AGENT}")


def test_journal_levels_and_a_bad_reload_keeps_the_running_config(node: Node,
                                                                  sandbox: Sandbox) -> None:
    conf = "/etc/clusterctl/clusterctl.toml"
    good = node.run(f"cat {conf}")
    try:
        node.run(f"printf '[gpu]\\ntemp_optimal = \"hot\"\\n' >> {conf} && "
                 f"systemctl reload {AGENT}")
        sandbox.wait_for(f"journalctl -u {AGENT} -p err | grep -q 'reload refused'",
                         timeout_s=10)
        assert node.run(f"systemctl show -P ActiveState {AGENT}") == "active\n"
        info = node.run(f"journalctl --no-pager -o cat -u {AGENT} -p info")
        warnings = node.run(f"journalctl --no-pager -o cat -u {AGENT} -p warning")
        assert "ready: " in info and "ready: " not in warnings
        assert "reload refused, the running config stays" in warnings
    finally:
        node.run(f"cat > {conf} <<'EOF'\n{good}EOF")


def test_stopping_the_agent_gives_back_a_power_limit_it_lowered(node: Node,
                                                                sandbox: Sandbox) -> None:
    scenario = {"gpus": [{"uuid": "GPU-hot", "temperature": 88}]}
    node.run(f"echo '{json.dumps(scenario)}' > /run/fake-gpu.json && "
             "clusterctl config set gpu.throttle_enabled true && "
             f"mkdir -p {AGENT_DROPIN} && printf '%s\\n' '[Service]' "
             "'Environment=PYTHONPATH=/srv/clusterctl/tests/fakes/nvml' "
             "'Environment=FAKE_NVML_SCENARIO=/run/fake-gpu.json' "
             "'Environment=FAKE_NVML_CALLS_LOG=/run/clusterctl/nvml-calls.log' "
             f"> {AGENT_DROPIN}/fake-gpu.conf && systemctl daemon-reload && "
             f"systemctl restart {AGENT}")
    try:
        sandbox.wait_for("grep -q 'GPU-hot 630000' /run/clusterctl/nvml-calls.log",
                         timeout_s=20)
        assert node.run(f"systemctl show -P StatusText {AGENT}").startswith(
            "GPUs 0:throttled, hottest 88 C; swap ")
        node.run(f"systemctl stop {AGENT}")
        calls = node.run("cat /run/clusterctl/nvml-calls.log").split("\n")
        assert calls[-2] == "GPU-hot 700000"  # the original, given back on stop
        assert node.run("test ! -e /var/lib/clusterctl/originals.json && echo none") == "none\n"
        warnings = node.run(f"journalctl --no-pager -o cat -u {AGENT} -p warning")
        assert "GPU 0: power limit 630 W" in warnings
    finally:
        node.run(f"rm -rf {AGENT_DROPIN} /run/fake-gpu.json && systemctl daemon-reload && "
                 "clusterctl config set gpu.throttle_enabled false && "
                 f"systemctl restart {AGENT}")


def test_the_agent_hibernates_an_idle_node_with_a_command_and_a_systemd_unit(
        node: Node, sandbox: Sandbox) -> None:
    """Shortened minutes; the "systemd" action starts a harmless unit, not hibernate.target."""
    scenario = {"gpus": [{"uuid": "GPU-idle", "utilization_gpu": 0}]}
    sleeper = ("[Unit]\nDescription=stands in for hibernate.target\n[Service]\n"
               "Type=oneshot\nExecStart=/bin/sh -c 'echo slept > /run/test-slept'\n")
    conf_before = node.run("cat /etc/clusterctl/clusterctl.toml")
    node.run(f"cat > /run/systemd/system/test-sleep.service <<'EOF'\n{sleeper}EOF")
    node.run(f"echo '{json.dumps(scenario)}' > /run/fake-gpu.json && "
             "clusterctl hibernate config --set enabled=true --set pause_after_minutes=0.1 "
             "--set action=command,systemd --set command=touch,/run/clusterctl/snapshot-taken "
             "--set systemd_unit=test-sleep.service && "
             f"mkdir -p {AGENT_DROPIN} && printf '%s\\n' '[Service]' "
             "'Environment=PYTHONPATH=/srv/clusterctl/tests/fakes/nvml' "
             "'Environment=FAKE_NVML_SCENARIO=/run/fake-gpu.json' "
             f"> {AGENT_DROPIN}/fake-gpu.conf && systemctl daemon-reload && "
             f"systemctl restart {AGENT}")
    try:
        # a systemd inhibitor lock on sleep holds the action off past the idle pause
        node.run("systemd-run --unit=test-inhibitor systemd-inhibit --what=sleep "
                 "--who=training --why='a long job' --mode=block sleep 300")
        time.sleep(9)  # 6 s of idleness and then some
        assert node.run("test -e /run/test-slept || echo not-yet") == "not-yet\n"
        status = json.loads(node.run("clusterctl hibernate status --json"))
        assert status["status"] == "idle"
        assert status["inhibited_by"] == "systemd inhibitor by training: a long job (sleep)"
        node.run("systemctl stop test-inhibitor")
        sandbox.wait_for("test -e /run/test-slept", timeout_s=30)
        assert node.run("test -e /run/clusterctl/snapshot-taken && echo yes") == "yes\n"
        events = json.loads(node.run("clusterctl hibernate events --json"))["events"]
        assert [e["event_type"] for e in events][:3] == [
            "hibernated", "hibernate_started", "idle_detected"]
        assert events[0]["reason"].endswith("started test-sleep.service")
        status = json.loads(node.run("clusterctl hibernate status --json"))
        assert status["status"] == "hibernated" and status["gpu_utilization"] == 0.0
        warnings = node.run(f"journalctl --no-pager -o cat -u {AGENT} -p warning")
        assert "hibernated: command touch succeeded; started test-sleep.service" in warnings
    finally:
        node.run(f"rm -rf {AGENT_DROPIN} /run/fake-gpu.json /run/test-slept "
                 "/run/systemd/system/test-sleep.service /var/lib/clusterctl/hibernate.json "
                 f"&& cat > /etc/clusterctl/clusterctl.toml <<'EOF'\n{conf_before}EOF\n"
                 f"systemctl daemon-reload && systemctl restart {AGENT}")


def test_before_a_systemd_sleep_the_hardened_agent_asks_systemd_to_wake_the_node(
        node: Node, sandbox: Sandbox) -> None:
    """The wake alarm goes through systemd (a WakeSystem= timer), not through /sys, which
    the agent's unit keeps read-only. This VM has no RTC alarm, so systemd itself answers
    "Operation not supported" once it tries to arm it: proof that the request got past
    the agent's hardening to PID 1 with the schedule's wake time. The node sleeps anyway,
    and an older wake timer is gone."""
    wake = datetime.now(timezone.utc).replace(second=0, microsecond=0) + timedelta(hours=2)
    epoch = int(wake.timestamp())
    scenario = {"gpus": [{"uuid": "GPU-idle", "utilization_gpu": 0}]}
    sleeper = ("[Unit]\nDescription=stands in for hibernate.target\n[Service]\n"
               "Type=oneshot\nExecStart=/bin/sh -c 'echo slept > /run/test-slept'\n")
    conf_before = node.run("cat /etc/clusterctl/clusterctl.toml")
    node.run(f"cat > /run/systemd/system/test-sleep.service <<'EOF'\n{sleeper}EOF")
    node.run("systemd-run --unit=clusterctl-wake-1 --on-calendar='2099-01-01 UTC' /bin/true && "
             f"clusterctl hibernate schedule set --wake {wake:%H:%M} --tz UTC && "
             f"echo '{json.dumps(scenario)}' > /run/fake-gpu.json && "
             "clusterctl hibernate config --set enabled=true --set pause_after_minutes=0.1 "
             "--set action=systemd --set systemd_unit=test-sleep.service && "
             f"mkdir -p {AGENT_DROPIN} && printf '%s\\n' '[Service]' "
             "'Environment=PYTHONPATH=/srv/clusterctl/tests/fakes/nvml' "
             "'Environment=FAKE_NVML_SCENARIO=/run/fake-gpu.json' "
             f"> {AGENT_DROPIN}/fake-gpu.conf && systemctl daemon-reload && "
             f"systemctl restart {AGENT}")
    try:
        sandbox.wait_for("test -e /run/test-slept", timeout_s=30)
        journal = node.run("journalctl --no-pager -o cat")
        assert (f"clusterctl-wake-{epoch}.timer: Failed to enter waiting state: "
                "Operation not supported") in journal
        warnings = node.run(f"journalctl --no-pager -o cat -u {AGENT} -p warning")
        assert (f"no wake timer: systemd could not arm a wake timer for {wake:%Y-%m-%d %H:%M}"
                ":00 UTC (result: resources)") in warnings
        assert node.run("systemctl list-units --all --no-legend --plain 'clusterctl-wake-*'"
                        ) == ""  # the old one stopped, the failed one cleared
        assert "ProtectKernelTunables=yes" in node.run(f"systemctl cat {AGENT}")
    finally:
        node.run(f"rm -rf {AGENT_DROPIN} /run/fake-gpu.json /run/test-slept "
                 "/run/systemd/system/test-sleep.service /var/lib/clusterctl/hibernate.json "
                 "/var/lib/clusterctl/hibernate-schedule.json; systemctl stop 'clusterctl-wake-*'; "
                 f"cat > /etc/clusterctl/clusterctl.toml <<'EOF'\n{conf_before}EOF\n"
                 f"systemctl daemon-reload && systemctl restart {AGENT}")


FLEET = "clusterctl-fleet.service"
FLEET_TOKENS = "/etc/clusterctl/fleet-join-token /etc/clusterctl/fleet-admin-token"
FLEET_DROPIN = "/run/systemd/system/clusterctl-fleet.service.d"
# What the control plane needs under its unit's sandboxing, with its own virtualenv.
FLEET_PROBE = """import os, socket, subprocess, sqlalchemy, aiohttp, psycopg
done = []
for name in ("fleet-join-token", "fleet-admin-token"):
    done.append(len(open(f"/etc/clusterctl/{name}").read().strip()))
engine = sqlalchemy.create_engine("sqlite:////var/lib/clusterctl/fleet-probe.db")
with engine.begin() as conn:
    conn.execute(sqlalchemy.text("CREATE TABLE IF NOT EXISTS t (x int)"))
done.append("db")
server = socket.create_server(("127.0.0.1", 0))
wol = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
wol.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
wol.sendto(b"\\xff" * 6 + bytes.fromhex("020000000001") * 16, ("127.255.255.255", 9))
done.append("wol")
done.append(subprocess.run(["/bin/sh", "-c", "exit 7"]).returncode)  # a wake command
try:
    open("/etc/clusterctl/written", "w")
except OSError as err:
    done.append(err.strerror)
notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
notify.connect(os.environ["NOTIFY_SOCKET"].replace("@", "\\0", 1))
notify.send(("READY=1\\nSTATUS=" + " ".join(map(str, done))).encode())
server.accept()
"""


def test_install_fleet_enables_the_fleet_unit_with_tokens_of_its_own(
        node: Node, sandbox: Sandbox) -> None:
    """Installed but off by default; --fleet makes its root-only tokens and enables it.
    Its start needs `clusterctl fleet serve`: until that exists, install.sh says that the
    start failed (and the unit is enabled all the same)."""
    assert node.run(f"systemctl is-enabled {FLEET} || true") == "disabled\n"
    assert node.run(f"ls {FLEET_TOKENS} 2>/dev/null || true") == ""
    result = sandbox.run(f"{INSTALL} --fleet --no-check", check=False)
    assert node.run(f"systemctl is-enabled {FLEET}") == "enabled\n"
    assert node.run(f"stat -c '%a %U:%G %s' {FLEET_TOKENS}") == "600 root:root 44\n" * 2
    if sandbox.run("clusterctl fleet serve --help", check=False).returncode == 0:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "install.sh: enabled clusterctl-fleet.service" in result.stdout
        assert node.run(f"systemctl is-active {FLEET}") == "active\n"
    else:
        assert result.returncode == 1
        assert ("systemctl enable --now clusterctl-fleet.service failed" in result.stderr)


def test_the_hardened_fleet_unit_reads_its_tokens_writes_its_db_and_wakes(
        node: Node, sandbox: Sandbox) -> None:
    """The unit's sandboxing around a stand-in server (the real venv's Python and the
    server's libraries): root-only tokens read, SQLite in /var/lib/clusterctl, a listening
    socket, a Wake-on-LAN broadcast and a wake command's executable all work; /etc stays
    read-only."""
    node.run(f"cat > /run/fleet-probe.py <<'EOF'\n{FLEET_PROBE}EOF\n"
             f"mkdir -p {FLEET_DROPIN} && printf '%s\\n' '[Service]' 'ExecStart=' "
             "'ExecStart=/opt/clusterctl/venv/bin/python /run/fleet-probe.py' "
             f"> {FLEET_DROPIN}/probe.conf && systemctl daemon-reload && "
             f"systemctl reset-failed {FLEET}; systemctl restart {FLEET}")
    try:
        assert node.run(f"systemctl show -P ActiveState {FLEET}") == "active\n"
        assert node.run(f"systemctl show -P StatusText {FLEET}") == (
            "43 43 db wol 7 Read-only file system\n")
        assert node.run("test -s /var/lib/clusterctl/fleet-probe.db && echo yes") == "yes\n"
    finally:
        node.run(f"systemctl stop {FLEET}; rm -rf {FLEET_DROPIN} /run/fleet-probe.py "
                 "/var/lib/clusterctl/fleet-probe.db && systemctl daemon-reload")


def test_installing_again_changes_nothing(node: Node, sandbox: Sandbox) -> None:
    before = node.installed()
    out = node.run(f"{INSTALL} --no-check")
    assert "installed" not in out, out
    assert "unchanged /opt/clusterctl/venv" in out
    assert node.installed() == before
    assert node.run("systemctl is-active clusterctl-swap.timer") == "active\n"


def test_installing_again_keeps_an_edited_config(node: Node, sandbox: Sandbox) -> None:
    node.run("clusterctl config set swap.max_size 8G")
    edited = node.run("cat /etc/clusterctl/clusterctl.toml")
    assert 'max_size = "8G"' in edited
    out = node.run(f"{INSTALL} --no-check")
    assert "kept your /etc/clusterctl/clusterctl.toml" in out
    assert node.run("cat /etc/clusterctl/clusterctl.toml") == edited
    assert node.run("cat /etc/clusterctl/clusterctl.toml.dist") == (
        REPO / "etc/clusterctl.toml").read_text()


def test_uninstall_removes_units_and_swap_and_keeps_the_config(node: Node,
                                                               sandbox: Sandbox) -> None:
    out = node.run(f"{INSTALL} --uninstall")
    assert "removed clusterctl's swap files" in out
    assert node.swap_files() == []
    assert active_swaps_under(node.swap_fs) == []
    assert node.run("swapon --show=NAME --noheadings | grep -c clusterctl || true") == "0\n"
    for unit in UNITS:
        assert node.run(f"systemctl show -P LoadState {unit}") == "not-found\n", unit
        assert node.run(f"test ! -e /etc/systemd/system/{unit} && echo gone") == "gone\n"
    # disabled first: no .wants/ link is left behind (the fleet unit's included)
    assert node.run("find /etc/systemd/system -name 'clusterctl*'") == ""
    assert "clusterctl" not in node.run("systemctl list-timers --all --no-legend")
    assert node.run("test ! -e /opt/clusterctl && test ! -L /usr/local/bin/clusterctl "
                    "&& echo gone") == "gone\n"
    assert 'max_size = "8G"' in node.run("cat /etc/clusterctl/clusterctl.toml")
    assert node.run(f"stat -c %s {FLEET_TOKENS}") == "44\n44\n"  # the fleet's too


def test_purge_leaves_nothing_of_clusterctls(node: Node, sandbox: Sandbox) -> None:
    out = node.run(f"{INSTALL} --purge")
    assert f"kept {SWAP_DIR}: another filesystem is mounted there" in out
    assert node.run("test ! -e /etc/clusterctl && test ! -e /run/clusterctl && echo gone") \
        == "gone\n"
    # all that is left is the mount point of the operator's own swap filesystem
    assert node.run("find /var/lib/clusterctl | sort") == (
        f"/var/lib/clusterctl\n{SWAP_DIR}\n{SWAP_DIR}/lost+found\n")
    assert sorted(p.name for p in node.swap_fs.iterdir()) == ["lost+found"]
    # in the sandbox's layers, what is left of clusterctl is deletions (whiteouts) only
    layers = sandbox.workdir / "layers"
    var = layers / "var/upper"  # the overlay over /var
    mount_point = {var / "lib/clusterctl", var / "lib/clusterctl/swap"}
    left = [str(p.relative_to(layers)) for p in layers.rglob("*")
            if "clusterctl" in str(p) and not p.is_char_device() and p not in mount_point]
    assert left == []
