"""The fleet page (``GET /`` of `clusterctl fleet serve`) in a headless chromium, against a
real control plane and a real agent (fake NVML, one idle H100, the `command` hibernation
action): what the table shows is what the API says, Hibernate and Wake work from the page,
a wrong token shows nothing, the token stays out of URLs and persistent storage, text a
node sent stays text, the page fits a phone, and it says when its data is stale.

One browser, one control plane and one agent for the module (they take seconds to
start); each test signs in afresh. The test that hibernates the node runs last.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.browser import (
    artifacts_dir,
    chromium,
    console,
    save_screenshot,
    unavailable,
    wait_for,
)
from tests.conftest import swapoff_under
from tests.fakes.control_plane import free_port
from tests.fleet import ADMIN, FleetServer, agent_conf, event, heartbeat, stop_process
from tests.test_fleet_agent import agent_process

MISSING = unavailable()
pytestmark = [pytest.mark.integration]
if MISSING and os.geteuid() != 0:  # as root, scripts/test installs them: a failure then
    pytestmark.append(pytest.mark.skip(reason=f"no browser for the fleet page: {MISSING}"))

NODE = "gpu-node-1"
EVIL = "evil-node"
HOSTILE = "<img src=x onerror=alert(1)>"
HOSTILE_GPU = "<script>window.__pwned = 1</script>"
HOSTILE_REASON = "<b onmouseover=alert(2)>bold</b><img src=x onerror=window.__pwned=2>"
CSP = "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
WEB = Path(__file__).resolve().parent.parent / "agent/clusterctl/fleet/web"


@dataclass
class Setup:
    srv: FleetServer
    tmp: Path
    agent: subprocess.Popen[bytes]
    wake_argv: Path  # what the stand-in wake command was run with

    def log(self) -> str:
        return (self.tmp / "agent.log").read_text(errors="replace")[-3000:]


def _summary(srv: FleetServer, instance_id: str) -> dict[str, Any] | None:
    status, answer = srv.admin("GET", "/api/instances")
    if status != 200:
        return None
    found = [n for n in answer["instances"] if n["instance_id"] == instance_id]
    return found[0] if found else None


def _hostile_node(srv: FleetServer) -> None:
    """A scripted node whose host name, GPU name and event reason are HTML."""
    token = srv.enrol(EVIL, hostname=HOSTILE)
    beat = heartbeat(EVIL, hostname=HOSTILE)
    beat["gpus"] = [{"index": 0, "name": HOSTILE_GPU, "uuid": "GPU-<i>evil</i>",
                     "utilization": 3, "temperature": 50, "state": "optimal",
                     "memory": {"total": 81559, "used": 1024, "free": 80535}}]
    status, answer = srv.request("POST", "/api/agent/status", beat, token=token)
    assert status == 200, answer
    status, answer = srv.request("POST", "/api/agent/events",
                                 [event(EVIL, "evil-1", reason=HOSTILE_REASON)], token=token)
    assert status == 200, answer


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """A control plane (waking by a stand-in command that records its argv), a real agent
    enrolled and heartbeating, and the hostile scripted node."""
    tmp = tmp_path_factory.mktemp("fleet-page")
    wake_argv = tmp / "wake-argv"
    stand_in = tmp / "wake-node"
    stand_in.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {wake_argv}\n')
    stand_in.chmod(0o755)
    servers = [FleetServer(tmp, f"sqlite:///{tmp}/fleet.db", wake="command",
                           wake_command=(str(stand_in), "{instance_id}"))]
    try:
        srv = servers[0].start()
        conf = agent_conf(tmp, srv.url, port=free_port())
        with agent_process(conf, tmp) as agent:
            found = Setup(srv, tmp, agent, wake_argv)
            wait_for("the agent's first heartbeat with its GPU", lambda: (
                _summary(found.srv, NODE) or {}).get("gpu_list"), 60, found.log)
            _hostile_node(srv)
            try:
                yield found
            finally:
                servers.append(found.srv)  # a test may have started it again
    finally:
        for server in servers:
            server.stop()
        swapoff_under(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if MISSING:
        pytest.fail(f"no browser for the fleet page: {MISSING}", pytrace=False)
    with chromium() as driver:
        yield driver


# -- helpers ----------------------------------------------------------------------------
def by_css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def one(driver: Any, selector: str) -> Any:
    found = by_css(driver, selector)
    return found[0] if found else None


def shown(driver: Any, selector: str) -> bool:
    element = one(driver, selector)
    return element is not None and bool(element.is_displayed())


def fresh_page(driver: Any, srv: FleetServer) -> None:
    """The page as a new tab would have it: no token kept, the fleet view."""
    driver.get(f"{srv.url}/")
    driver.execute_script("sessionStorage.clear(); localStorage.clear(); "
                          "history.replaceState(null, '', '/');")
    driver.refresh()
    wait_for("the sign-in form", lambda: shown(driver, "#login"), 15)
    console(driver)  # start each test with an empty console


def sign_in(driver: Any, srv: FleetServer, token: str = ADMIN) -> None:
    fresh_page(driver, srv)
    one(driver, "#token").send_keys(token)
    one(driver, "#login-form button[type=submit]").click()
    if token == ADMIN:
        wait_for("the fleet view", lambda: shown(driver, "#fleet"), 15)


def row(driver: Any, instance_id: str) -> Any:
    return one(driver, f'tr[data-instance-id="{instance_id}"]')


def cell(driver: Any, instance_id: str, name: str) -> str:
    found = row(driver, instance_id)
    element = None if found is None else one(found, f'[data-field="{name}"]')
    return "" if element is None else str(element.text)


def num(value: float | None) -> str:
    """A number as the page writes it: whole numbers as they are, else one decimal."""
    if value is None:
        return "—"
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def shown_gpus(driver: Any, instance_id: str) -> list[dict[str, str]]:
    found = row(driver, instance_id)
    if found is None:
        return []
    return [{"index": str(g.get_attribute("data-gpu-index")),
             "utilization": one(g, '[data-field="utilization"]').text,
             "temperature": one(g, '[data-field="temperature"]').text,
             "vram": one(g, '[data-field="vram"]').text}
            for g in by_css(found, ".gpu")]


def expected_gpus(summary: dict[str, Any]) -> list[dict[str, str]]:
    return [{"index": num(g["index"]), "utilization": f"{num(g['utilization'])} %",
             "temperature": f"{num(g['temperature'])} °C",
             "vram": f"{g['memory_used_mib'] / 1024:.1f} / {g['memory_total_mib'] / 1024:.1f} GiB"}
            for g in summary["gpu_list"]]


def errors(driver: Any) -> list[str]:
    return [str(e["message"]) for e in console(driver) if e.get("level") == "SEVERE"]


# -- the tests --------------------------------------------------------------------------
def test_the_page_and_its_files_are_served_with_a_strict_policy(setup: Setup) -> None:
    def get(path: str) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", setup.srv.port, timeout=30)
        try:
            conn.request("GET", path)
            answer = conn.getresponse()
            return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
        finally:
            conn.close()

    for path, kind in (("/", "text/html"), ("/static/app.js", "text/javascript"),
                       ("/static/app.css", "text/css"), ("/static/icon.svg", "image/svg+xml")):
        status, headers, body = get(path)
        assert status == 200 and body, path
        assert headers["content-type"].startswith(kind), (path, headers)
        assert headers["content-security-policy"] == CSP, path
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["cache-control"] == "no-cache"
    for path in ("/static/nope.js", "/static/index.html", "/static/..%2Fpage.py",
                 "/static/app.js.map"):
        status, headers, body = get(path)
        assert status == 404, path
        answer = json.loads(body)
        assert answer["error"] and "fix" in answer, path
    # the policy allows no inline script or style, and nothing is loaded from elsewhere
    html = (WEB / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)
    assert not re.search(r"\s(style|on[a-z]+)\s*=", html, re.IGNORECASE)
    for name in ("index.html", "app.js", "app.css"):
        text = (WEB / name).read_text().replace('"http://www.w3.org/2000/svg"', "")  # a name
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.IGNORECASE), \
            f"{name} loads something from another site"
    assert "innerHTML" not in (WEB / "app.js").read_text()


def test_a_wrong_token_is_refused_and_shows_nothing(setup: Setup, browser: Any) -> None:
    sign_in(browser, setup.srv, "not-the-admin-token")
    message = wait_for("the refusal", lambda: shown(browser, "#login-error")
                       and one(browser, "#login-error").text, 15)
    assert "the admin token is missing or wrong" in message
    assert not shown(browser, "#fleet") and not shown(browser, "#node")
    assert by_css(browser, "[data-instance-id]") == []
    assert by_css(browser, "[data-stat]") == []
    assert browser.execute_script("return sessionStorage.length") == 0

    # signed in, then the token stops being the admin token: back to the form, data gone
    sign_in(browser, setup.srv)
    wait_for("the node's row", lambda: row(browser, NODE), 15)
    token_file = setup.srv.config.admin_token_file
    token_file.write_text("a-new-admin-token-0123456789\n")
    try:
        message = wait_for("the sign-in form again", lambda: shown(browser, "#login-error")
                           and one(browser, "#login-error").text, 15)
    finally:
        token_file.write_text(ADMIN + "\n")
    assert "the admin token is missing or wrong" in message
    assert by_css(browser, "[data-instance-id]") == [] and not shown(browser, "#fleet")
    assert browser.execute_script("return sessionStorage.length") == 0


def test_the_fleet_table_shows_what_the_api_says(setup: Setup, browser: Any) -> None:
    sign_in(browser, setup.srv)
    summary: dict[str, Any] = {}

    def agrees() -> bool:
        summary.update(_summary(setup.srv, NODE) or {})
        return bool(summary.get("gpu_list")) and \
            shown_gpus(browser, NODE) == expected_gpus(summary)
    wait_for("the row's GPU values to equal /api/instances'", agrees, 20,
             lambda: f"page {shown_gpus(browser, NODE)}, API {summary.get('gpu_list')}")
    assert shown_gpus(browser, NODE)[0]["utilization"] == "1 %"  # the fake H100's numbers
    assert shown_gpus(browser, NODE)[0]["temperature"] == "40 °C"
    assert shown_gpus(browser, NODE)[0]["vram"] == "3.9 / 79.6 GiB"
    assert summary["state"] in ("running", "idle")
    state = cell(browser, NODE, "state")
    assert state == "running" or re.fullmatch(r"idle for \d+ min", state), state
    assert re.fullmatch(r"\d+ s ago", cell(browser, NODE, "last-heartbeat"))
    assert one(row(browser, NODE), ".hostname").text == summary["hostname"]
    assert one(browser, '[data-stat="nodes"] .n').text == "2"
    assert one(browser, "#chart svg, #chart p") is not None
    hibernate = one(row(browser, NODE), '[data-action="hibernate"]')
    wake = one(row(browser, NODE), '[data-action="wake"]')
    assert hibernate.is_enabled() and not wake.is_enabled()
    assert errors(browser) == []  # nothing refused by the policy, no script error


def test_the_token_stays_out_of_urls_and_lasting_storage(setup: Setup, browser: Any) -> None:
    sign_in(browser, setup.srv)
    wait_for("the node's row", lambda: row(browser, NODE), 15)
    one(row(browser, NODE), "a.node-link").click()
    wait_for("the node view", lambda: shown(browser, "#node") and by_css(browser, "#gpus tbody tr")
             and by_css(browser, "#events li"), 15)
    assert browser.current_url.endswith(f"/#/node/{NODE}")
    urls = browser.execute_script(
        "return [location.href, document.referrer, "
        "...performance.getEntriesByType('resource').map((e) => e.name)]")
    assert all(ADMIN not in url for url in urls), urls
    assert any("/api/instances/" in url for url in urls)  # the API calls were seen
    kept = browser.execute_script("return JSON.stringify(Object.entries(localStorage))")
    assert ADMIN not in kept
    assert ADMIN not in browser.execute_script("return document.cookie")
    assert browser.get_cookies() == []
    session = browser.execute_script("return JSON.stringify(Object.entries(sessionStorage))")
    assert ADMIN in session  # where it is kept: this tab only

    one(browser, "#sign-out").click()
    wait_for("the sign-in form", lambda: shown(browser, "#login"), 15)
    assert browser.execute_script("return sessionStorage.length") == 0
    assert not shown(browser, "#node") and by_css(browser, "#gpus tbody tr") == []


def test_what_a_node_sent_is_shown_as_text(setup: Setup, browser: Any) -> None:
    sign_in(browser, setup.srv)
    wait_for("the hostile node's row", lambda: row(browser, EVIL), 15)
    assert one(row(browser, EVIL), ".hostname").text == HOSTILE
    assert one(row(browser, EVIL), ".gpu").get_attribute("title") == HOSTILE_GPU
    one(row(browser, EVIL), "a.node-link").click()
    wait_for("its node view", lambda: by_css(browser, "#events li .reason")
             and by_css(browser, "#gpus .gpu-name"), 15)
    assert one(browser, "#node-title .hostname").text == HOSTILE
    assert one(browser, "#gpus .gpu-name").text == HOSTILE_GPU
    reasons = [e.text for e in by_css(browser, "#events .reason")]
    assert HOSTILE_REASON in reasons
    # nothing of it became an element, and nothing ran
    assert by_css(browser, "img") == [] and by_css(browser, "b") == []
    assert len(by_css(browser, "script")) == 1
    assert browser.execute_script("return window.__pwned") is None
    assert browser.execute_script("return document.title") == "clusterctl fleet"
    assert not [m for m in errors(browser) if "Refused" in m or "inline" in m]


def test_the_page_fits_a_phone(setup: Setup, browser: Any) -> None:
    sign_in(browser, setup.srv)
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 390, "height": 844, "deviceScaleFactor": 3, "mobile": True})
    try:
        browser.refresh()  # the token is kept for the tab: still signed in
        wait_for("the rows", lambda: row(browser, NODE) and row(browser, EVIL)
                 and shown_gpus(browser, NODE), 15)

        def fits() -> dict[str, int]:
            sizes: dict[str, int] = browser.execute_script(
                "return {scroll: document.documentElement.scrollWidth, "
                "body: document.body.scrollWidth, inner: window.innerWidth}")
            return sizes

        sizes = fits()
        assert sizes["inner"] == 390, sizes
        assert sizes["scroll"] <= sizes["inner"] and sizes["body"] <= sizes["inner"], sizes
        wrap = browser.execute_script(
            "const w = document.querySelector('#fleet .table-wrap');"
            "return {scroll: w.scrollWidth, client: w.clientWidth}")
        assert wrap["scroll"] > wrap["client"]  # the table scrolls in its own box
        for button in by_css(browser, "button"):
            if button.is_displayed():
                assert button.size["height"] >= 40, button.text
        save_screenshot(browser, "fleet-page-phone.png")

        one(row(browser, NODE), "a.node-link").click()
        wait_for("the node view", lambda: by_css(browser, "#gpus tbody tr")
                 and by_css(browser, "#events li"), 15)
        sizes = fits()
        assert sizes["scroll"] <= sizes["inner"], sizes
        for button in by_css(browser, "#node button"):
            assert button.size["height"] >= 40, button.text
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_screenshots_of_the_fleet_and_node_pages(setup: Setup, browser: Any) -> None:
    sign_in(browser, setup.srv)
    wait_for("the rows with their GPUs", lambda: shown_gpus(browser, NODE)
             and row(browser, EVIL), 15)
    # the chart draws /api/fleet/history: the agent's utilization, once a sample has it
    status, history = setup.srv.admin("GET", "/api/fleet/history")
    assert status == 200 and history["points"]
    wait_for("the utilization in the chart", lambda: by_css(
        browser, "#chart .dot-util, #chart .line-util"), 30)
    status, history = setup.srv.admin("GET", "/api/fleet/history")
    last = history["points"][-1]
    assert f"GPU utilization {num(last['gpu_utilization'])} %" in \
        one(browser, "#chart-summary").text
    fleet = save_screenshot(browser, "fleet-page.png")
    one(row(browser, NODE), "a.node-link").click()
    wait_for("the node view", lambda: by_css(browser, "#gpus tbody tr")
             and by_css(browser, "#events li"), 15)
    node = save_screenshot(browser, "fleet-node-page.png")
    for path in (fleet, node):
        assert path.parent == artifacts_dir()
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, path


def test_a_control_plane_that_stops_answering_shows_as_stale(setup: Setup,
                                                               browser: Any) -> None:
    sign_in(browser, setup.srv)
    wait_for("the node's row", lambda: shown_gpus(browser, NODE), 15)
    before = shown_gpus(browser, NODE)
    setup.srv.stop()
    try:
        banner = wait_for("the stale banner", lambda: shown(browser, "#stale")
                          and one(browser, "#stale").text, 15)
        assert "Not up to date" in banner
        assert shown_gpus(browser, NODE) == before  # what it showed is still there
    finally:
        srv = setup.srv
        setup.srv = FleetServer(srv.tmp, srv.config.database, port=srv.port,
                                wake=srv.config.wake,
                                wake_command=srv.config.wake_command).start()
    wait_for("the banner to go", lambda: not shown(browser, "#stale"), 15)
    assert row(browser, NODE) is not None


def test_the_node_forms_send_commands_and_show_the_answer(setup: Setup,
                                                         browser: Any) -> None:
    """On the scripted node (it never runs what is queued): settings and an inhibit are
    queued, a schedule in a zone that does not exist is refused with the server's fix."""
    sign_in(browser, setup.srv)
    browser.get(f"{setup.srv.url}/#/node/{EVIL}")
    wait_for("the settings form filled in", lambda: one(
        browser, "#cfg-pause").get_attribute("value") == "3", 15)

    def submit(form: str, fields: dict[str, str]) -> str:
        for selector, value in fields.items():  # as typed; a time field takes "HH:MM"
            browser.execute_script(
                "const box = document.querySelector(arguments[0]); box.value = arguments[1];"
                "box.dispatchEvent(new Event('input', {bubbles: true}));", selector, value)
        before = one(browser, "#notice").text if shown(browser, "#notice") else ""
        one(browser, f"{form} button[type=submit]").click()
        return str(wait_for(f"the answer to {form}", lambda: shown(browser, "#notice") and (
            text := one(browser, "#notice").text) != before and text, 15))

    said = submit("#config-form", {"#cfg-pause": "7"})
    assert re.search(r"queued as c-[0-9a-f]+", said), said
    said = submit("#inhibit-form", {"#inh-minutes": "30", "#inh-reason": "driver update"})
    assert re.search(r"queued as c-[0-9a-f]+", said), said
    said = submit("#schedule-form", {"#sch-sleep": "22:00", "#sch-tz": "Mars/Olympus_Mons"})
    assert "refused (HTTP 400)" in said and "is not a time zone" in said, said
    assert "Europe/Berlin" in said  # the server's fix
    assert "error" in str(one(browser, "#notice").get_attribute("class"))

    status, answer = setup.srv.admin("GET", f"/api/instances/{EVIL}/status")
    assert status == 200
    queued = {c["type"]: c["args"] for c in answer["pending_commands"]}
    assert queued == {"set_hibernate": {"enabled": True, "gpu_usage_threshold": 5,
                                        "pause_after_minutes": 7},  # the form, as shown
                      "inhibit": {"duration_s": 1800, "reason": "driver update"}}


ODD = "a-odd-node"  # sorts first: a row that throws would stop every row after it
MANY = "b-many-gpus"
# JSON that neither Date.parse nor a template string can turn into text: it throws
UNCONVERTIBLE = {"toString": 0, "valueOf": 0}


@contextlib.contextmanager
def scripted(srv: FleetServer, instance_id: str, body: dict[str, Any],
             events: Sequence[dict[str, Any]] = ()) -> Iterator[None]:
    """A node that sent ``body`` as its heartbeat (compact JSON, as big as the cap
    allows) and ``events``; revoked and forgotten afterwards, so that the tests after
    see the fleet they expect."""
    token = srv.enrol(instance_id)
    try:
        raw = json.dumps({**heartbeat(instance_id), **body}, separators=(",", ":")).encode()
        status, answer = srv.request("POST", "/api/agent/status", raw=raw, token=token)
        assert status == 200, answer
        if events:
            status, answer = srv.request("POST", "/api/agent/events", list(events),
                                         token=token)
            assert status == 200, answer
        yield
    finally:
        srv.admin("POST", f"/api/instances/{instance_id}/revoke", {"forget": True})


def count(driver: Any, selector: str) -> int:
    return int(driver.execute_script(
        "return document.querySelectorAll(arguments[0]).length", selector))


def test_a_node_sending_odd_shapes_breaks_neither_the_table_nor_its_view(
        setup: Setup, browser: Any) -> None:
    deep: Any = "bottom"
    for _ in range(300):
        deep = {"d": [deep]}
    odd_gpu = {"index": "0", "name": ["x"], "uuid": 5, "utilization": "50",
               "temperature": None, "memory": {"used": "1", "total": None}, "power_limit": [],
               "state": UNCONVERTIBLE, "processes": {"length": 5}, "lost": "yes", "deep": deep}
    body = {"schedule": {"wake_at": UNCONVERTIBLE, "sleep_at": UNCONVERTIBLE,
                         "timezone": UNCONVERTIBLE},
            "hibernate": {"enabled": "yes", "gpu_usage_threshold": "5",
                          "pause_after_minutes": UNCONVERTIBLE},
            "idle_since": UNCONVERTIBLE, "agent_version": UNCONVERTIBLE,
            "gpus": [odd_gpu, None, 7, "gpu", [1, 2], {}]}
    events = [event(ODD, "odd-1", timestamp=UNCONVERTIBLE, reason=UNCONVERTIBLE,
                    command_type=UNCONVERTIBLE, deep=deep),
              event(ODD, "odd-2", "odd_type", timestamp=12345, reason=None)]
    with scripted(setup.srv, ODD, body, events):
        sign_in(browser, setup.srv)
        wait_for("every row, the odd node's first", lambda: row(browser, ODD)
                 and row(browser, EVIL) and row(browser, NODE), 15,
                 lambda: f"stale: {one(browser, '#stale').text!r}, console: {errors(browser)}")
        assert cell(browser, ODD, "schedule") == "—"
        assert not shown(browser, "#stale")
        one(row(browser, ODD), "a.node-link").click()
        wait_for("its events and GPUs", lambda: len(by_css(browser, "#events li")) == 3
                 and by_css(browser, "#gpus tbody tr"), 15,
                 lambda: f"stale: {one(browser, '#stale').text!r}, console: {errors(browser)}")
        assert {e.text for e in by_css(browser, "#events .event-type")} == \
            {"odd_type", "idle_detected", "node_enrolled"}
        assert one(browser, "#schedule-now").text.startswith("Now: —")
        assert not shown(browser, "#stale")
        assert errors(browser) == []


def test_a_node_reporting_85000_gpus_does_not_flood_the_page(setup: Setup,
                                                            browser: Any) -> None:
    """All the 256 KiB a heartbeat may hold, as empty GPUs: the row and the node view
    list a bounded number, and the rest of the fleet is shown as before."""
    with scripted(setup.srv, MANY, {"gpus": [{}] * 85_000}):
        sign_in(browser, setup.srv)
        wait_for("the rows", lambda: row(browser, MANY) and shown_gpus(browser, NODE), 30)
        assert count(browser, f'tr[data-instance-id="{MANY}"] .gpu') <= 64
        browser.get(f"{setup.srv.url}/#/node/{MANY}")
        wait_for("its GPU table", lambda: count(browser, "#gpus tbody tr") > 1, 30)
        assert count(browser, "#gpus tbody tr") <= 64
        assert not shown(browser, "#stale") and errors(browser) == []


def test_hibernate_and_wake_from_the_page(setup: Setup, browser: Any) -> None:
    """Last: the node is asleep afterwards."""
    srv = setup.srv
    sign_in(browser, srv)
    wait_for("the Hibernate button", lambda: row(browser, NODE) and one(
        row(browser, NODE), '[data-action="hibernate"]').is_enabled(), 15)
    one(row(browser, NODE), '[data-action="hibernate"]').click()
    note = wait_for("the server's answer", lambda: shown(browser, "#notice")
                    and one(browser, "#notice").text, 15)
    command = re.search(r"queued as (c-[0-9a-f]+)", note)
    assert command, note

    def events() -> list[dict[str, Any]]:
        status, answer = srv.admin("GET", f"/api/instances/{NODE}/events?limit=200")
        return list(answer["events"]) if status == 200 else []

    wait_for("the row to say hibernated", lambda: cell(browser, NODE, "state") == "hibernated",
             60, setup.log)
    kinds = {(e["event_type"], e.get("command_id")) for e in events()}
    assert ("command_queued", command[1]) in kinds  # the page's call, with the token
    assert ("command_applied", command[1]) in kinds  # the agent ran it
    assert (setup.tmp / "hibernated-by-command").exists()

    stop_process(setup.agent)  # the node is asleep now
    wake = one(row(browser, NODE), '[data-action="wake"]')
    assert wake.is_enabled()
    wake.click()
    wait_for("the row to say waking", lambda: cell(browser, NODE, "state") == "waking", 15)
    assert "waking" in one(browser, "#notice").text
    assert setup.wake_argv.read_text().split() == [NODE]
    assert ("wake_sent", None) in {(e["event_type"], e.get("command_id")) for e in events()}
