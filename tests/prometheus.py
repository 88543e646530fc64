"""Prometheus for the monitoring kit's tests (deploy/): promtool, a real Prometheus
server on 127.0.0.1 in a temporary directory, and the metric names that PromQL
expressions (the alert rules, the Grafana dashboard) and /metrics scrapes hold."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.control_plane import free_port
from tests.fleet import stop_process

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "clusterctl-alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "clusterctl-alerts.test.yml"
SCRAPE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "clusterctl-dashboard.json"
INSTALL_HINT = "install it: apt-get install prometheus (./scripts/test does, as root)"

# String literals first (a label value such as "clusterctl-agent" is not a metric), then
# the names: dcgm-exporter's, clusterctl's, and Prometheus' own `up`.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NAME = re.compile(r"(?<![\w:$.])(DCGM_FI_\w+|clusterctl_\w+|up)(?![\w:])")
_DURATION = re.compile(r"^(\d+)([smhdw])$")


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise AssertionError(f"{name} is not installed; {INSTALL_HINT}")
    return found


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (DCGM_FI_*, clusterctl_*, up)."""
    return set(_NAME.findall(_STRING.sub('""', expr)))


def duration_s(text: str) -> int:
    """Seconds in a Prometheus duration of one unit ("90s", "5m", "1h")."""
    match = _DURATION.match(text)
    assert match, f"not a one-unit duration: {text!r}"
    unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    return int(match.group(1)) * unit


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def alert_rules(path: Path = RULES) -> dict[str, dict[str, Any]]:
    """Each alerting rule of a rules file, by its name."""
    rules: dict[str, dict[str, Any]] = {}
    for group in load_yaml(path)["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["alert"] not in rules, f"{rule['alert']} is defined twice"
                rules[rule["alert"]] = rule
    return rules


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL query of a Grafana dashboard: the panels' targets (rows' nested panels
    too) and the template variables' queries."""
    found: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            found.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        found.append(query.get("query", "") if isinstance(query, dict) else str(query))
    return found


@dataclass(frozen=True)
class Exposition:
    """The sample names of a /metrics text, and its histogram families."""

    samples: frozenset[str]
    histograms: frozenset[str]
    declared: frozenset[str] = frozenset()  # every family named (HELP), with samples or not

    @classmethod
    def parse(cls, text: str) -> Exposition:
        samples: set[str] = set()
        histograms: set[str] = set()
        declared: set[str] = set()
        for family in text_string_to_metric_families(text):
            samples.update(sample.name for sample in family.samples)
            declared.add(family.name)
            if family.type == "histogram":
                histograms.add(family.name)
        return cls(frozenset(samples), frozenset(histograms), frozenset(declared))

    def exports(self, name: str) -> bool:
        """Whether ``name`` can be queried from this scrape: a sample name, or a
        histogram's _bucket/_sum/_count (only where the family is a histogram)."""
        if name in self.samples:
            return True
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name.removesuffix(suffix) in self.histograms:
                return True
        return False


def sample_values(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The labels and value of every sample named ``name`` in a /metrics text."""
    return [(dict(sample.labels), sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name]


def http_get(url: str, *, token: str | None = None, timeout_s: float = 10) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            return int(answer.status), answer.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


class Prometheus:
    """A real ``prometheus`` on 127.0.0.1:<free port>, its TSDB in a temporary directory
    removed at ``stop``. ``config`` is the prometheus.yml content (a mapping)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="clusterctl-prometheus-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        path = self.dir / "prometheus.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def start(self, timeout_s: float = 60) -> Prometheus:
        config = self.dir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config, sort_keys=False), encoding="utf-8")
        with (self.dir / "prometheus.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [tool("prometheus"), f"--config.file={config}",
                 f"--storage.tsdb.path={self.dir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        self.wait_for("Prometheus to be ready", self._ready, timeout_s)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log}")
        with contextlib.suppress(OSError):
            return http_get(f"{self.url}/-/ready", timeout_s=2)[0] == 200
        return False

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Prometheus:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def api(self, path: str, **params: str) -> Any:
        """The ``data`` of a /api/v1 answer (AssertionError unless it says success)."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        status, text = http_get(f"{self.url}/api/v1/{path}{query}")
        answer = json.loads(text)
        assert status == 200 and answer.get("status") == "success", (path, params, text)
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self.api("targets", state="active")["activeTargets"]
        return active

    def rule_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = self.api("rules")["groups"]
        return groups

    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts

    def wait_for(self, what: str, check: Callable[[], Any], timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            last = check()
            if last:
                return last
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what} "
                             f"(last: {last!r:.2000})\nprometheus log:\n{self.log}")
