"""One owner for the swap policy, and a swap dir anywhere, under a real systemd (a sandbox).

While clusterctl-agent.service is active the agent runs the policy (a step every [swap]
check_interval, and on memory pressure) and the timer's service stands down: started,
skipped by its ExecCondition=, no `swap auto` process. With the agent stopped the timer
runs `swap auto` again. A swap dir outside /var/lib/clusterctl gets the ReadWritePaths=
drop-ins from `clusterctl config set swap.dir` (and install.sh), so the hardened timer
service makes swap there. In order: the tests share one node.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.systemd_sandbox import Sandbox, unavailable
from tests.fakes.control_plane import free_port
from tests.loopfs import active_swaps_under, loop_mount, require_loop

pytestmark = pytest.mark.integration

SWAP_DIR = "/var/lib/clusterctl/swap"
SRV = "/srv/swap"  # another filesystem, outside the units' ReadWritePaths=
ELSEWHERE = f"{SRV}/clusterctl"  # missing until `config set` makes it
INSTALL = "/srv/clusterctl/install.sh"
AGENT = "clusterctl-agent.service"
SWAP = "clusterctl-swap.service"
CONF = "/etc/clusterctl/clusterctl.toml"
DROPINS = tuple(f"/etc/systemd/system/{unit}.d/swap-dir.conf" for unit in (SWAP, AGENT))
# small steps; an existing config, which install.sh keeps
SEED_CONF = '[swap]\nmin_size = "128M"\nincrement = "128M"\nmax_size = "1G"\n'
# the timer every 3 s instead of 30 s (at most 4 starts in systemd's 10 s start limit)
FAST_TIMER = ("mkdir -p /run/systemd/system/clusterctl-swap.timer.d && printf '%s\\n' "
              "'[Timer]' 'OnUnitActiveSec=' 'OnActiveSec=1s' 'OnUnitActiveSec=3s' "
              "> /run/systemd/system/clusterctl-swap.timer.d/fast.conf && "
              "systemctl daemon-reload && systemctl restart clusterctl-swap.timer")
SKIPPED = f"{SWAP}: Skipped due to 'exec-condition'."


class Node:
    def __init__(self, sandbox: Sandbox, swap_fs: Path, srv_fs: Path, install_out: str
                 ) -> None:
        self.sandbox = sandbox
        self.swap_fs = swap_fs  # the default swap dir's filesystem, as the host sees it
        self.srv_fs = srv_fs  # /srv/swap's
        self.install_out = install_out

    def run(self, script: str) -> str:
        return self.sandbox.run(script).stdout

    def show(self, unit: str, prop: str) -> str:
        return self.run(f"systemctl show -P {prop} {unit}").strip()

    def swap_files(self) -> dict[str, str]:
        """clusterctl's files and their state (the kernel names an area by the path in the
        mount namespace of the unit that made it, so ask clusterctl, not /proc/swaps)."""
        status = json.loads(self.run("clusterctl swap status --json"))
        return {f["path"]: f["state"] for f in status["files"]}

    def swap_auto_said(self, cursor: str) -> str:
        """What `swap auto` wrote in the timer's service since ``cursor``: it always says
        something (what it did, or the plan's summary), so "" means it did not run."""
        lines = self.journal_since(cursor, "-u", SWAP, "-o", "json").splitlines()
        return "".join(f"{entry['MESSAGE']}\n" for entry in map(json.loads, lines)
                       if entry.get("_PID") != "1")  # not systemd's own lines

    def journal_since(self, cursor: str, *args: str) -> str:
        return self.run(f"journalctl --no-pager -o cat --after-cursor='{cursor}' "
                        + " ".join(args))  # a later -o wins

    def cursor(self) -> str:
        return self.run("journalctl -n 0 --show-cursor -q | sed -n 's/^-- cursor: //p'"
                        ).strip()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    reason = unavailable()
    if reason:
        pytest.skip(f"no systemd sandbox here: {reason}")
    require_loop("ext4")
    work = tmp_path_factory.mktemp("owner")
    with loop_mount(work / "disk", "ext4", size_mib=2048) as swap_fs, \
            loop_mount(work / "srv", "ext4", size_mib=1024) as srv_fs, \
            Sandbox(work / "sandbox", binds={SWAP_DIR: swap_fs, SRV: srv_fs}) as sandbox:
        # the sandbox shares this machine's network: an API port of its own
        seed = f'{SEED_CONF}[api]\nlisten = "127.0.0.1:{free_port()}"\n'
        sandbox.run(f"mkdir -p /etc/clusterctl && cat > {CONF} <<'EOF'\n{seed}EOF")
        out = sandbox.run(f"{INSTALL} --no-check").stdout
        yield Node(sandbox, swap_fs, srv_fs, out)
    assert active_swaps_under(swap_fs) == [] and active_swaps_under(srv_fs) == []


@pytest.fixture
def sandbox(node: Node) -> Sandbox:
    """The node's sandbox, named so that a failing test's report carries its journal."""
    return node.sandbox


def test_with_the_agent_active_the_timer_starts_no_swap_auto(node: Node,
                                                             sandbox: Sandbox) -> None:
    assert node.show(AGENT, "ActiveState") == "active"
    node.run(FAST_TIMER)
    cursor = node.cursor()
    sandbox.wait_for(f"[ $(journalctl -o cat -u {SWAP} --after-cursor='{cursor}' "
                     f"| grep -cF \"{SKIPPED}\") -ge 2 ]", timeout_s=20)
    assert node.swap_auto_said(cursor) == ""  # skipped before ExecStart: no process
    # a skip, not a failure: nothing for `systemctl --failed` or an alert to report
    assert node.show(SWAP, "Result") == "exec-condition"
    assert node.show(SWAP, "ActiveState") == "inactive"
    # and the agent runs the policy: min_size is there (by the agent, or a timer run
    # before the agent was up: either way, clusterctl's files and the agent's view)
    sandbox.wait_for(f"test -e {SWAP_DIR}/swap-0001", timeout_s=20)
    status = json.loads(node.run("clusterctl swap status --json"))
    assert status["total"] >= 128 * 2**20


def test_with_the_agent_stopped_the_timer_runs_swap_auto_again(node: Node,
                                                               sandbox: Sandbox) -> None:
    cursor = node.cursor()
    node.run(f"systemctl stop {AGENT}")
    try:
        sandbox.wait_for(f"journalctl -u {SWAP} --after-cursor='{cursor}' | "
                         f"grep -q 'Finished {SWAP}'", timeout_s=20)
        assert node.show(SWAP, "Result") == "success"
        assert node.show(SWAP, "ExecMainStatus") == "0"
        said = node.swap_auto_said(cursor)
        assert said.strip(), said  # `swap auto` ran: it always says what it did or why not
    finally:
        node.run(f"systemctl start {AGENT}")


def test_the_agents_own_tick_grows_swap_when_usage_crosses_the_threshold(
        node: Node, sandbox: Sandbox) -> None:
    """No PSI event needed: the threshold is lowered under this node's usage, and the
    agent's steady step (every check_interval, here 2 s) grows swap by one increment."""
    before = sorted(p.name for p in node.swap_fs.iterdir() if p.name.startswith("swap-"))
    cursor = node.cursor()
    node.run("clusterctl config set swap.memory_threshold 1 && "
             "clusterctl config set swap.check_interval 2 && "
             f"systemctl reload {AGENT}")
    try:
        grown = f"swap-{len(before) + 1:04d}"
        sandbox.wait_for(f"test -e {SWAP_DIR}/{grown}", timeout_s=20)
        sandbox.wait_for(f"journalctl -o cat -u {AGENT} --after-cursor='{cursor}' | grep -q "
                         f"'swap policy step: create {grown}'", timeout_s=10)
        assert node.swap_files()[f"{SWAP_DIR}/{grown}"] == "active"
        assert node.swap_auto_said(cursor) == ""  # the timer's service did not step
    finally:
        node.run("clusterctl config set swap.memory_threshold 80 && "
                 "clusterctl config set swap.check_interval 30 && "
                 f"systemctl reload {AGENT}")


def test_a_swap_dir_elsewhere_gets_its_dropins_and_the_timer_makes_swap_there(
        node: Node, sandbox: Sandbox) -> None:
    # the timer held while the files go and the dir changes, then the fallback again
    node.run(f"systemctl stop {AGENT} clusterctl-swap.timer && clusterctl swap clean")
    assert active_swaps_under(node.swap_fs) == []
    out = node.run(f"clusterctl config set swap.dir {ELSEWHERE}")
    for path in DROPINS:
        assert f"wrote {path}" in out
        assert f"ReadWritePaths=-{ELSEWHERE}\n" in node.run(f"cat {path}")
    assert ELSEWHERE in node.show(SWAP, "ReadWritePaths")  # systemd reloaded
    assert (node.srv_fs / "clusterctl").is_dir()  # made, where the unit cannot make it
    cursor = node.cursor()
    node.run("systemctl start clusterctl-swap.timer")
    sandbox.wait_for(f"journalctl -u {SWAP} --after-cursor='{cursor}' | "
                     f"grep -Eq '(Finished|Failed to start) {SWAP}'", timeout_s=20)
    assert node.show(SWAP, "Result") == "success", node.run(
        f"journalctl --no-pager -o cat -u {SWAP} -n 20")
    assert node.swap_files() == {f"{ELSEWHERE}/swap-0001": "active"}
    # the agent, started again, can write there too
    node.run(f"systemctl start {AGENT}")
    assert ELSEWHERE in node.show(AGENT, "ReadWritePaths")


def test_the_swap_dir_back_under_var_lib_removes_the_dropins(node: Node,
                                                             sandbox: Sandbox) -> None:
    node.run(f"systemctl stop {AGENT} clusterctl-swap.timer && clusterctl swap clean")
    out = node.run(f"clusterctl config set swap.dir {SWAP_DIR}")
    for path in DROPINS:
        assert f"removed {path}" in out
        assert node.run(f"test ! -e {path} && echo gone") == "gone\n"
    assert ELSEWHERE not in node.show(SWAP, "ReadWritePaths")
    node.run(f"systemctl start {AGENT} clusterctl-swap.timer")


def test_install_on_an_existing_config_writes_and_removes_the_dropins(
        node: Node, sandbox: Sandbox) -> None:
    node.run(f"sed -i '/^dir = /d; s|^\\[swap\\]$|[swap]\\ndir = \"{ELSEWHERE}\"|' {CONF}")
    out = node.run(f"{INSTALL} --no-check")
    for path in DROPINS:
        assert f"install.sh: wrote {path}" in out, out
    assert ELSEWHERE in node.show(AGENT, "ReadWritePaths")
    node.run(f"sed -i '/^dir = /d' {CONF}")
    out = node.run(f"{INSTALL} --no-check")
    for path in DROPINS:
        assert f"install.sh: removed {path}" in out, out
    assert node.show(AGENT, "ActiveState") == "active"
