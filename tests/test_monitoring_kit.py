"""The monitoring kit in deploy/: the alert rules pass promtool and their unit tests (a
firing and a silent case for every alert), the example scrape config is valid, and a real
Prometheus loaded with them scrapes a real agent (fake NVML) and a real control plane:
both targets up, the rules healthy, every metric the Grafana dashboard and the rules read
exported and with a series, every dashboard panel with data, a node's failed hibernation
firing its alert, and the agent's GPU (with GPM, an energy counter and XIDs fed through the
fake driver's event API) shown as it is: an application fault counted and not alarming, a
fatal XID firing ClusterctlGpuFatalXid. The XID codes the rules match are checked against
the agent's own sets (clusterctl.gpu.xid)."""

from __future__ import annotations

import contextlib
import copy
import json
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from clusterctl.gpu.xid import APPLICATION, FATAL
from tests.fakes.control_plane import free_port
from tests.fleet import ADMIN, IDLE_H100, FleetServer, agent_conf, event, heartbeat
from tests.prometheus import (
    DASHBOARD,
    RULE_TESTS,
    RULES,
    SCRAPE_CONFIG,
    Exposition,
    Prometheus,
    alert_rules,
    dashboard_queries,
    duration_s,
    http_get,
    load_yaml,
    metric_names,
    promtool,
    sample_values,
)
from tests.test_fleet_agent import agent_process, wait_for

AGENT_JOB, FLEET_JOB = "clusterctl-agent", "clusterctl-fleet"
NODE, SCRIPTED = "gpu-node-1", "gpu-node-2"
NAMES_THE_NODE = re.compile(r"\$labels\.(hostname|Hostname|instance_id|instance)\b")
SAYS_WHAT_TO_DO = re.compile(r"`(clusterctl|systemctl|journalctl) [^`]+`")
XID_COUNTER = "clusterctl_gpu_xid_errors_total"
XID_SELECTOR = re.compile(XID_COUNTER + r'\{xid=~"([^"]*)"\}')


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def names_read(exprs: list[str]) -> set[str]:
    return set().union(*(metric_names(e) for e in exprs))


# a series only while a condition holds (a GPU held for a fatal XID): its family is declared
# in every scrape; its series is checked by the test that makes the condition
WHILE_HELD = frozenset({"clusterctl_gpu_xid_unrecovered"})


def not_exported(names: set[str], scrapes: list[Exposition]) -> list[str]:
    """The names no scrape exports (`up` is Prometheus' own, checked apart)."""
    return sorted(n for n in names - {"up"} if not any(
        s.exports(n) or (n in WHILE_HELD and n in s.declared) for s in scrapes))


# -- the rules, offline -------------------------------------------------------------------


def test_the_alert_rules_pass_promtool_check() -> None:
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_severity_and_says_which_node_and_what_to_do() -> None:
    rules = alert_rules()
    assert len(rules) >= 12
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        notes = rule["annotations"]
        assert NAMES_THE_NODE.search(notes["summary"]), f"{name}: the summary names no node"
        assert NAMES_THE_NODE.search(notes["description"]), name
        assert SAYS_WHAT_TO_DO.search(notes["description"]), f"{name}: says no command to run"


def test_the_alert_unit_tests_pass() -> None:
    done = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert done.returncode == 0, done.stdout + done.stderr


@dataclass(frozen=True)
class Case:
    group: str
    at_s: int
    fires: bool


def unit_cases() -> dict[str, list[Case]]:
    """The unit tests' expectations, by alert name."""
    doc = load_yaml(RULE_TESTS)
    assert doc["rule_files"] == [RULES.name]
    cases: dict[str, list[Case]] = {}
    for group in doc["tests"]:
        for test in group.get("alert_rule_test", []):
            cases.setdefault(test["alertname"], []).append(
                Case(group["name"], duration_s(test["eval_time"]), bool(test["exp_alerts"])))
    return cases


def test_every_alert_has_a_firing_case_and_a_healthy_case_where_it_stays_silent() -> None:
    rules, cases = alert_rules(), unit_cases()
    assert not set(cases) - set(rules), f"tests of no alert: {set(cases) - set(rules)}"
    for name, rule in rules.items():
        mine = cases.get(name, [])
        assert any(c.fires for c in mine), f"{name}: no case where it fires"
        firing_groups = {c.group for c in mine if c.fires}
        # a group of healthy nodes: it never fires there, though it had time to
        for_s = duration_s(rule.get("for", "0s"))
        assert any(c.group not in firing_groups and not c.fires and c.at_s >= for_s
                   for c in mine), f"{name}: no healthy case where it stays silent"
        if for_s:  # and the for: boundary: silent first, firing later in one series
            assert any(s.group == f.group and not s.fires and f.fires and s.at_s < f.at_s
                       for s in mine for f in mine), f"{name}: its for: {rule['for']} is untested"


def test_a_broken_alert_expression_fails_its_unit_test(tmp_path: Path) -> None:
    """The unit tests bite: a rule that reads the wrong state never fires."""
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    broken = RULES.read_text(encoding="utf-8").replace('{state="lost"}', '{state="lots"}')
    assert broken != RULES.read_text(encoding="utf-8")
    (tmp_path / RULES.name).write_text(broken, encoding="utf-8")
    done = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert done.returncode != 0 and "ClusterctlNodeLost" in done.stdout + done.stderr


def xid_codes(expr: str) -> set[int]:
    """The XID codes an expression's XID counter selectors match, as Prometheus matches a
    label regex (anchored at both ends). Every selector of the counter must carry the same
    ``xid=~`` regex."""
    regexes = XID_SELECTOR.findall(expr)
    assert len(regexes) == expr.count(XID_COUNTER), f"a selector without xid=~: {expr}"
    assert len(set(regexes)) == 1, f"selectors with different xid regexes: {regexes}"
    return {code for code in range(1024) if re.fullmatch(regexes[0], str(code))}


def test_the_fatal_xid_alert_follows_what_the_agent_holds() -> None:
    """ClusterctlGpuFatalXid fires on the agent's own hold (clusterctl.gpu.xid.FATAL decided
    there, cleared by recovery or clear-xid), not on a list of codes that could drift."""
    expr = alert_rules()["ClusterctlGpuFatalXid"]["expr"]
    assert "clusterctl_gpu_xid_unrecovered" in expr and "xid=~" not in expr
    assert FATAL  # the agent's set exists; the rule names none of it


def test_the_xid_storm_counts_the_agents_application_faults() -> None:
    rule = alert_rules()["ClusterctlGpuXidStorm"]
    assert xid_codes(rule["expr"]) == set(APPLICATION)
    listed = ", ".join(str(code) for code in sorted(APPLICATION))
    assert f"({listed})" in rule["annotations"]["description"]


def test_the_xid_set_check_finds_a_drift() -> None:
    expr = alert_rules()["ClusterctlGpuXidStorm"]["expr"]
    first = str(min(APPLICATION))
    codes = xid_codes(expr.replace(f"{first}|", ""))
    assert codes == set(APPLICATION) - {int(first)}
    assert xid_codes(expr.replace(f"{first}|", f"{first}|79|")) == set(APPLICATION) | {79}


# -- the scrape config ------------------------------------------------------------------


def test_the_example_scrape_config_passes_promtool(tmp_path: Path) -> None:
    """promtool checks the files it names exist: the example's paths, moved under tmp."""
    text = SCRAPE_CONFIG.read_text(encoding="utf-8")
    paths = sorted(set(re.findall(r"(?<![\w.])/etc/[\w./-]+", text)))
    assert "/etc/prometheus/clusterctl-nodes.json" in paths
    for path in paths:
        moved = tmp_path / path.lstrip("/")
        moved.parent.mkdir(parents=True, exist_ok=True)
        moved.write_text("[]\n" if path.endswith(".json") else "token\n", encoding="utf-8")
        text = text.replace(path, str(moved))
    shutil.copy(RULES, tmp_path / "etc/prometheus/clusterctl-alerts.yml")
    (tmp_path / "prometheus.yml").write_text(text, encoding="utf-8")
    done = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(alert_rules())} rules found" in done.stdout


def example_jobs() -> dict[str, dict[str, Any]]:
    config = load_yaml(SCRAPE_CONFIG)
    return {job["job_name"]: job for job in config["scrape_configs"]}


def test_the_example_scrapes_the_jobs_the_rules_name() -> None:
    jobs = example_jobs()
    assert set(jobs) == {AGENT_JOB, FLEET_JOB}
    rules_text = RULES.read_text(encoding="utf-8")
    assert f'up{{job="{AGENT_JOB}"}}' in rules_text and f'up{{job="{FLEET_JOB}"}}' in rules_text
    assert jobs[AGENT_JOB]["file_sd_configs"][0]["files"] == [
        "/etc/prometheus/clusterctl-nodes.json"]
    assert jobs[FLEET_JOB]["authorization"] == {
        "credentials_file": "/etc/clusterctl/fleet-admin-token"}
    assert load_yaml(SCRAPE_CONFIG)["rule_files"] == ["/etc/prometheus/clusterctl-alerts.yml"]


# -- the dashboard, offline -------------------------------------------------------------


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def test_the_dashboard_takes_its_data_source_as_a_variable() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert dashboard_queries({"templating": board["templating"]}) == [
        "label_values(DCGM_FI_DEV_GPU_UTIL, Hostname)"]
    wanted = {"type": "prometheus", "uid": "${datasource}"}
    assert variables["Hostname"]["datasource"] == wanted
    ids = []
    for panel in all_panels(board["panels"]):
        ids.append(panel["id"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == wanted, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == wanted, panel["title"]
    assert len(ids) == len(set(ids)), "two panels share an id"
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["Fleet", "Node $Hostname", "Health and energy"]


def test_the_health_and_energy_row_shows_the_node_and_the_fleet_its_energy() -> None:
    """The node's XIDs, energy busy and idle, idle power, GPM activity and PCIe replays;
    the fleet's energy rate summed over the nodes."""
    board = dashboard()
    row = next(i for i, p in enumerate(board["panels"]) if p["title"] == "Health and energy")
    reads = {p["title"]: names_read([t["expr"] for t in p["targets"]])
             for p in board["panels"][row + 1:]}
    assert reads == {
        "XIDs by code": {XID_COUNTER},
        "Energy, busy and idle": {"clusterctl_gpu_energy_joules_total"},
        "Idle power": {"clusterctl_gpu_idle_power_watts"},
        "Graphics engine active (GPM)": {"DCGM_FI_PROF_GR_ENGINE_ACTIVE"},
        "Tensor core utilization (GPM)": {"DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"},
        "PCIe replays": {"DCGM_FI_DEV_PCIE_REPLAY_COUNTER"}}
    for panel in board["panels"][row + 1:]:
        assert all('Hostname="$Hostname"' in t["expr"] for t in panel["targets"]), panel["title"]
    gpm = [p for p in board["panels"] if p["title"].endswith("(GPM)")]
    for panel in gpm:  # fractions, drawn as dcgm-exporter's dashboard draws them
        defaults = panel["fieldConfig"]["defaults"]
        assert (defaults["unit"], defaults["min"], defaults["max"]) == ("percentunit", 0, 1)
    node_row = next(i for i, p in enumerate(board["panels"]) if p["title"] == "Node $Hostname")
    fleet_energy = [t["expr"] for p in board["panels"][:node_row] for t in p.get("targets", [])
                    if "clusterctl_gpu_energy_joules_total" in t["expr"]]
    assert fleet_energy == [
        "sum by (state) (rate(clusterctl_gpu_energy_joules_total[$__rate_interval]))"]


# -- a real Prometheus, agent and control plane ----------------------------------------------


@dataclass
class Live:
    prometheus: Prometheus
    fleet: FleetServer
    agent_port: int
    hostname: str
    scrapes: list[Exposition]  # the agent's /metrics and the control plane's, fetched here
    xid_file: Path  # "INDEX XID" lines the fake driver reports (FAKE_NVML_XID_FILE)

    def feed_xid(self, index: int, xid: int) -> None:
        with self.xid_file.open("a", encoding="utf-8") as out:
            out.write(f"{index} {xid}\n")

    def fed_xids(self) -> list[int]:
        text = self.xid_file.read_text(encoding="utf-8") if self.xid_file.exists() else ""
        return [int(line.split()[1]) for line in text.splitlines()]


# The agent's GPU: the idle H100 of the fleet tests, with GPM (a Hopper: percent busy
# between two GPM samples, by NVML_GPM_METRIC_ name) and an energy counter that rises
# 35 J a read: 70 W at the agent's 0.5 s sampling, for half an hour of samples.
GPM_PERCENT = {"GRAPHICS_UTIL": 40, "ANY_TENSOR_UTIL": 25, "SM_UTIL": 30, "SM_OCCUPANCY": 20,
               "DRAM_BW_UTIL": 10}
AGENT_GPU = {**IDLE_H100, "gpm": GPM_PERCENT,
             "energy_mj": [1_000_000 + 35_000 * i for i in range(3600)]}
APP_FAULT, FATAL_XID = 13, 79


@contextlib.contextmanager
def kit_agent(conf: Path, tmp: Path, xid_file: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`clusterctl agent run` on the fake NVML with AGENT_GPU, XIDs fed through xid_file."""
    with agent_process(conf, tmp, gpus=[AGENT_GPU], xid_file=xid_file) as proc:
        yield proc


def scrape(url: str, token: str | None = None) -> str:
    status, text = http_get(url, token=token)
    assert status == 200, (url, status, text[:500])
    return text


def prometheus_config(nodes_file: Path, admin_token: Path, fleet_address: str
                      ) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with its paths and the control plane's address
    put to this test's, scraping and evaluating every second."""
    config: dict[str, Any] = copy.deepcopy(load_yaml(SCRAPE_CONFIG))
    config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s",
                        "evaluation_interval": "1s"}
    config["rule_files"] = [str(RULES)]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs[AGENT_JOB]["file_sd_configs"][0]["files"] = [str(nodes_file)]
    jobs[FLEET_JOB]["authorization"]["credentials_file"] = str(admin_token)
    jobs[FLEET_JOB]["static_configs"] = [{"targets": [fleet_address]}]
    return config


def scripted_node(srv: FleetServer) -> None:
    """A second node that fails to hibernate, then sleeps and is woken (Wake-on-LAN to
    127.0.0.1): the per-node event counter and the wake counter get their series."""
    token = srv.enrol(SCRIPTED)
    status, answer = srv.request("POST", "/api/agent/status", heartbeat(SCRIPTED), token=token)
    assert status == 200, answer
    status, answer = srv.request("POST", "/api/agent/events",
                                 [event(SCRIPTED, "e-1", "hibernate_failed")], token=token)
    assert status == 200, answer
    status, answer = srv.request("POST", "/api/agent/status",
                                 heartbeat(SCRIPTED, status="hibernated"), token=token)
    assert status == 200, answer
    status, answer = srv.admin("POST", f"/api/instances/{SCRIPTED}/wake")
    assert status == 202, answer


def write_targets(conf: Path, srv: FleetServer, agent_port: int, output: Path) -> None:
    """`clusterctl fleet targets` writes the file Prometheus's file_sd reads: the nodes
    that should answer, by the address their heartbeats come from."""
    done = subprocess.run(
        [sys.executable, "-m", "clusterctl", "fleet", "targets", "--config", str(conf),
         "--server", srv.url, "--token-file", str(srv.tmp / "admin-token"), "--use",
         "address", "--port", str(agent_port), "--output", str(output)],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    groups = json.loads(output.read_text(encoding="utf-8"))
    assert groups == [{"targets": [f"127.0.0.1:{agent_port}"],
                       "labels": {"instance_id": NODE, "hostname": socket.gethostname()}}]


def swapoff_under(directory: Path) -> None:
    """Swap an agent may have turned on under ``directory``, turned off."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/swaps").read_text().splitlines()[1:]:
            path = line.split()[0].replace("\\040", " ")
            if path.startswith(f"{directory}/"):
                subprocess.run(["swapoff", path], check=False, capture_output=True)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("monitoring")
    with contextlib.ExitStack() as stack:
        stack.callback(swapoff_under, tmp)
        srv = FleetServer(tmp, f"sqlite:///{tmp}/fleet.db", wol_broadcast="127.0.0.1",
                          wol_port=free_port())
        srv.start()
        stack.callback(srv.stop)
        agent_port = free_port()
        conf = agent_conf(tmp, srv.url, port=agent_port)
        xid_file = tmp / "xids"
        stack.enter_context(kit_agent(conf, tmp, xid_file))
        agent_metrics = f"http://127.0.0.1:{agent_port}/metrics"

        def heartbeat_acknowledged() -> bool:
            with contextlib.suppress(OSError):
                return "clusterctl_heartbeat_ok 1.0" in scrape(agent_metrics)
            return False

        wait_for("the agent's first acknowledged heartbeat", heartbeat_acknowledged, 60, tmp)
        # an application fault: the XID counter's series is made at a GPU's first XID
        xid_file.write_text(f"0 {APP_FAULT}\n", encoding="utf-8")

        def gpu_health_and_energy_exported() -> bool:
            text = scrape(agent_metrics)
            return all(sample_values(text, name) for name in (
                XID_COUNTER, "DCGM_FI_PROF_GR_ENGINE_ACTIVE", "clusterctl_gpu_idle_power_watts"))

        wait_for("the XID, GPM and idle power series", gpu_health_and_energy_exported, 15, tmp)
        scripted_node(srv)
        nodes_file = tmp / "clusterctl-nodes.json"
        write_targets(conf, srv, agent_port, nodes_file)
        scrapes = [Exposition.parse(scrape(agent_metrics)),
                   Exposition.parse(scrape(f"{srv.url}/metrics", token=ADMIN))]
        prometheus = Prometheus(prometheus_config(nodes_file, srv.tmp / "admin-token",
                                                  f"127.0.0.1:{srv.port}"))
        stack.enter_context(prometheus)
        yield Live(prometheus, srv, agent_port, socket.gethostname(), scrapes, xid_file)


@pytest.mark.integration
def test_prometheus_scrapes_the_agent_and_the_control_plane(live: Live) -> None:
    def both_up() -> list[dict[str, Any]]:
        targets = live.prometheus.targets()
        healthy = [t for t in targets if t["health"] == "up"]
        return targets if len(healthy) == len(targets) == 2 else []

    targets = live.prometheus.wait_for("both targets up", both_up, 30)
    by_job = {t["labels"]["job"]: t for t in targets}
    assert by_job[AGENT_JOB]["labels"]["instance_id"] == NODE
    assert by_job[AGENT_JOB]["labels"]["hostname"] == live.hostname
    assert by_job[FLEET_JOB]["scrapeUrl"] == f"{live.fleet.url}/metrics"
    up = {r["metric"]["job"]: r["value"][1] for r in live.prometheus.query("up")}
    assert up == {AGENT_JOB: "1", FLEET_JOB: "1"}


@pytest.mark.integration
def test_the_rules_load_and_evaluate_in_prometheus(live: Live) -> None:
    def evaluated() -> dict[str, dict[str, Any]]:
        loaded = {r["name"]: r for g in live.prometheus.rule_groups() for r in g["rules"]}
        return loaded if all(r["health"] != "unknown" for r in loaded.values()) else {}

    loaded = live.prometheus.wait_for("every rule evaluated", evaluated, 30)
    assert set(loaded) == set(alert_rules())
    bad = {name: r.get("lastError") for name, r in loaded.items() if r["health"] != "ok"}
    assert not bad


@pytest.mark.integration
def test_the_dashboard_and_the_rules_read_only_metrics_that_are_exported(live: Live) -> None:
    """Each name is in a live scrape of the agent's or the control plane's /metrics (not
    in a list kept by hand): a renamed metric, here or in the code, fails this."""
    read = names_read(dashboard_queries(dashboard()))
    assert "DCGM_FI_DEV_GPU_UTIL" in read and "clusterctl_fleet_node_state" in read
    assert not not_exported(read, live.scrapes), "the dashboard reads metrics nobody exports"
    rules_read = names_read([r["expr"] for r in alert_rules().values()])
    assert not not_exported(rules_read, live.scrapes), "the rules read metrics nobody exports"

    # and the check bites: one renamed metric in the dashboard is found
    renamed = json.loads(DASHBOARD.read_text(encoding="utf-8").replace(
        "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_GPU_TEMPERATURE"))
    assert not_exported(names_read(dashboard_queries(renamed)), live.scrapes) == [
        "DCGM_FI_DEV_GPU_TEMPERATURE"]


@pytest.mark.integration
def test_every_metric_the_dashboard_and_the_rules_read_has_a_series(live: Live) -> None:
    names = names_read([*dashboard_queries(dashboard()),
                        *(r["expr"] for r in alert_rules().values())])
    prometheus = live.prometheus

    def missing() -> list[str]:
        return sorted(n for n in names - WHILE_HELD if not prometheus.query(n))

    prometheus.wait_for("a series of every metric", lambda: not missing(), 30)


def panel_query(expr: str, hostname: str) -> str:
    """A panel's query as Grafana sends it for one node."""
    return expr.replace("$Hostname", hostname).replace("$__rate_interval", "30s")


@pytest.mark.integration
def test_every_dashboard_panel_has_data_for_the_node(live: Live) -> None:
    board = dashboard()
    prometheus = live.prometheus
    hostnames = prometheus.api("label/Hostname/values", **{"match[]": "DCGM_FI_DEV_GPU_UTIL"})
    assert hostnames == [live.hostname]  # the Hostname variable's choices
    empty: list[str] = []

    def without_data() -> list[str]:
        empty[:] = [f"{panel['title']}: {target['expr']}"
                    for panel in all_panels(board["panels"])
                    for target in panel.get("targets", [])
                    if not prometheus.query(panel_query(target["expr"], live.hostname))]
        return empty

    with contextlib.suppress(AssertionError):
        prometheus.wait_for("data in every panel", lambda: not without_data(), 30)
    assert not empty, "panels without data:\n" + "\n".join(empty)


@pytest.mark.integration
def test_a_failed_hibernation_fires_its_alert_naming_the_node(live: Live) -> None:
    """The scripted node's one hibernate_failed event: the alert fires at once (a series
    born at 1 has no increase), for that node only; the healthy agent fires nothing."""
    def firing() -> list[dict[str, Any]]:
        return [a for a in live.prometheus.alerts() if a["state"] == "firing"
                and not (a["labels"]["alertname"] == "ClusterctlGpuFatalXid"
                         and FATAL_XID in live.fed_xids())]  # the test below feeds one

    alerts = live.prometheus.wait_for("ClusterctlHibernationFailed", firing, 30)
    assert [(a["labels"]["alertname"], a["labels"]["instance_id"]) for a in alerts] == [
        ("ClusterctlHibernationFailed", SCRIPTED)]
    assert alerts[0]["annotations"]["summary"] == (
        f"Node {SCRIPTED} ({SCRIPTED}) failed to hibernate")
    assert f"clusterctl fleet events {SCRIPTED}" in alerts[0]["annotations"]["description"]


def instant(prometheus: Prometheus, expr: str) -> dict[str, float]:
    """An instant query's values, by the series' labels (without __name__) as k=v,..."""
    return {",".join(f"{k}={v}" for k, v in sorted(r["metric"].items()) if k != "__name__"):
            float(r["value"][1]) for r in prometheus.query(expr)}


@pytest.mark.integration
def test_the_gpus_health_and_energy_reach_prometheus_as_the_agent_saw_them(live: Live) -> None:
    """What the Health and energy row draws, as someone reading it would: the one XID 13
    counted under its code (and as the last code), GPM activity as the fractions the GPU
    reported, and an idle GPU's energy all idle, at a draw above zero; the fleet panel sums
    the same."""
    prometheus, node = live.prometheus, f'Hostname="{live.hostname}"'

    def values(expr: str) -> float | None:
        found = instant(prometheus, expr)
        return next(iter(found.values())) if len(found) == 1 else None

    def energy_measured() -> dict[str, float]:
        by_state = instant(prometheus, f"sum by (state) (rate(clusterctl_gpu_energy_joules_total"
                                       f"{{{node}}}[30s]))")
        return by_state if by_state.get("state=idle", 0) > 0 else {}

    by_state = prometheus.wait_for("an idle energy rate", energy_measured, 15)
    assert by_state["state=busy"] == 0  # the GPU is at 1 %: idle all along
    assert 0 < by_state["state=idle"] <= 75  # 35 J a sample, a sample every 0.5 s or more
    fleet = instant(prometheus, "sum by (state) (rate(clusterctl_gpu_energy_joules_total[30s]))")
    assert set(fleet) == {"state=busy", "state=idle"} and fleet["state=idle"] > 0
    assert 0 < (values(f"clusterctl_gpu_idle_power_watts{{{node}}}") or 0) <= 75

    xids = {labels.split("xid=")[1]: value for labels, value in
            instant(prometheus, f"{XID_COUNTER}{{{node}}}").items()}
    assert xids == {str(APP_FAULT): 1}
    assert values(f"DCGM_FI_DEV_XID_ERRORS{{{node}}}") == APP_FAULT
    assert values(f"DCGM_FI_PROF_GR_ENGINE_ACTIVE{{{node}}}") == 0.4
    assert values(f"DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{{{node}}}") == 0.25
    assert values(f"DCGM_FI_DEV_PCIE_REPLAY_COUNTER{{{node}}}") == 0
    assert values(f"DCGM_FI_DEV_ROW_REMAP_FAILURE{{{node}}}") == 0


@pytest.mark.integration
def test_a_fatal_xid_fires_its_alert_naming_the_gpu_the_code_and_the_fix(live: Live) -> None:
    """XID 79 fed through the fake driver: ClusterctlGpuFatalXid fires for that GPU and code
    at once (the application fault fed before fired nothing), and the /healthz its
    description points to answers 503 naming the XID."""
    live.feed_xid(0, FATAL_XID)

    def fatal() -> list[dict[str, Any]]:
        return [a for a in live.prometheus.alerts() if a["state"] == "firing"
                and a["labels"]["alertname"] == "ClusterctlGpuFatalXid"]

    alerts = live.prometheus.wait_for("ClusterctlGpuFatalXid", fatal, 15)
    assert len(alerts) == 1, alerts
    assert live.prometheus.query("clusterctl_gpu_xid_unrecovered")  # the WHILE_HELD series
    labels, notes = alerts[0]["labels"], alerts[0]["annotations"]
    assert (labels["severity"], labels["gpu"], labels["xid"], labels["instance_id"],
            labels["Hostname"]) == ("critical", "0", str(FATAL_XID), NODE, live.hostname)
    assert notes["summary"] == f"GPU 0 of {live.hostname} had fatal XID {FATAL_XID}"
    assert "`clusterctl gpu clear-xid --gpu 0`" in notes["description"]
    healthz = re.search(r"http://\S+/healthz", notes["description"])
    assert healthz and healthz.group(0) == f"http://127.0.0.1:{live.agent_port}/healthz"
    status, body = http_get(healthz.group(0))
    assert status == 503 and f"fatal XID {FATAL_XID}" in body, (status, body)
    firing = sorted((a["labels"]["alertname"], a["labels"].get("instance_id"))
                    for a in live.prometheus.alerts() if a["state"] == "firing")
    assert firing == [("ClusterctlGpuFatalXid", NODE), ("ClusterctlHibernationFailed", SCRIPTED)]
