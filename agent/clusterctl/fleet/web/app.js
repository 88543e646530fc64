// The fleet page of `clusterctl fleet serve`: plain ES2020, no framework, no build step.
//
// The admin token is asked for once and kept in this tab's sessionStorage only (never
// localStorage, a cookie or a URL); each API call sends it as `Authorization: Bearer`.
// Everything a node sent (host names, GPU names, event reasons) goes into the page as
// text (textContent, attributes set as properties), never as HTML.
"use strict";

const TOKEN_KEY = "clusterctl-fleet-admin-token";
const POLL_MS = 5000;
const STATES = ["running", "idle", "hibernating", "hibernated", "waking", "lost",
  "wake_failed", "revoked"];
const HIBERNATABLE = new Set(["running", "idle"]);
const WAKEABLE = new Set(["hibernated", "lost", "wake_failed", "hibernating"]);
const SVG = "http://www.w3.org/2000/svg";
const DAY_MS = 24 * 3600 * 1000;
const MAX_GPUS_SHOWN = 64; // as the server's node list: a heartbeat can list 85,000

const view = {
  token: null,
  timer: null,
  seq: 0,
  nodeId: null, // the node view's instance id; null for the fleet view
  formsFor: { config: null, schedule: null }, // the node whose values fill the forms
  lastGood: null, // Date of the last complete answer
};

const $ = (id) => document.getElementById(id);

/** An element; `props` are set as properties (textContent, className, title, ...),
 * `data` as data- attributes; children are nodes or strings (made text nodes). */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  const { data, ...rest } = props;
  Object.assign(node, rest);
  for (const [key, value] of Object.entries(data || {})) node.dataset[key] = value;
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

// -- formatting ---------------------------------------------------------------------
const isNum = (v) => typeof v === "number" && Number.isFinite(v);
const num = (v) => (isNum(v) ? (Number.isInteger(v) ? String(v) : v.toFixed(1)) : "—");
const pct = (v) => (isNum(v) ? `${num(v)} %` : "—");
const celsius = (v) => (isNum(v) ? `${num(v)} °C` : "—");
const watts = (v) => (isNum(v) ? `${Math.round(v)} W` : "—");

function gib(mib) {
  return isNum(mib) ? (mib / 1024).toFixed(1) : "—";
}

function vram(usedMib, totalMib) {
  if (!isNum(usedMib) && !isNum(totalMib)) return "—";
  return `${gib(usedMib)} / ${gib(totalMib)} GiB`;
}

function bytes(n) {
  if (!isNum(n)) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}

function swapText(swap) {
  if (!swap || (!isNum(swap.used_bytes) && !isNum(swap.total_bytes))) return "—";
  if (swap.total_bytes === 0) return "no swap";
  return `${bytes(swap.used_bytes)} of ${bytes(swap.total_bytes)}`;
}

function ago(seconds) {
  if (!isNum(seconds)) return "never";
  if (seconds < 90) return `${Math.round(seconds)} s ago`;
  if (seconds < 90 * 60) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 48 * 3600) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} days ago`;
}

/** Milliseconds of a time a node sent, NaN unless it is a string: Date.parse of an
 * object such as {"toString": 0} throws, and would stop the whole table. */
const parsed = (iso) => (typeof iso === "string" ? Date.parse(iso) : NaN);

function when(iso) {
  const at = parsed(iso);
  if (!Number.isFinite(at)) return "—";
  return new Date(at).toLocaleString([], {
    weekday: "short", hour: "2-digit", minute: "2-digit",
  });
}

function clock(date) {
  return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function stateText(node, nowMs) {
  if (node.state === "idle") {
    const since = Date.parse(node.idle_since);
    if (!Number.isFinite(since)) return "idle";
    return `idle for ${Math.max(0, Math.floor((nowMs - since) / 60000))} min`;
  }
  if (node.state === "wake_failed") return "wake failed";
  return String(node.state);
}

const stateClass = (state) => `badge state-${STATES.includes(state) ? state : "unknown"}`;

function scheduleText(schedule) {
  const sleep = schedule && typeof schedule.sleep_at === "string" ? schedule.sleep_at : null;
  const wake = schedule && typeof schedule.wake_at === "string" ? schedule.wake_at : null;
  if (!sleep && !wake) return "—";
  const parts = [];
  if (sleep) parts.push(`sleeps ${when(sleep)}`);
  if (wake) parts.push(`wakes ${when(wake)}`);
  return parts.join(", ");
}

// -- the API ------------------------------------------------------------------------
class Unauthorized extends Error {}
class Unreachable extends Error {}

function errorText(data) {
  if (data && typeof data === "object" && typeof data.error === "string") {
    return typeof data.fix === "string" && data.fix ? `${data.error} (${data.fix})` : data.error;
  }
  return null;
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${view.token}`, Accept: "application/json" };
  const init = { method, headers, cache: "no-store", credentials: "omit" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new Unreachable(err && err.message ? err.message : "no answer");
  }
  let data = null;
  try {
    data = await response.json();
  } catch (_err) {
    data = null;
  }
  if (response.status === 401) {
    const said = data && typeof data.error === "string" ? data.error : null;
    throw new Unauthorized(said || "the admin token is missing or wrong");
  }
  return { status: response.status, ok: response.ok, data };
}

/** The answer's JSON, or Unreachable (a 5xx, a proxy's page) with what was said. */
function must(answer, what) {
  if (answer.ok && answer.data && typeof answer.data === "object") return answer.data;
  throw new Unreachable(`${what}: HTTP ${answer.status}` +
    (errorText(answer.data) ? `, ${errorText(answer.data)}` : ""));
}

// -- signing in and out ---------------------------------------------------------------
function showLogin(message) {
  $("login").hidden = false;
  $("fleet").hidden = true;
  $("node").hidden = true;
  $("sign-out").hidden = true;
  $("stale").hidden = true;
  const error = $("login-error");
  error.textContent = message || "";
  error.hidden = !message;
  $("token").focus();
}

function forget() {
  view.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  clearTimeout(view.timer);
  view.timer = null;
  view.seq += 1; // answers still on their way are dropped
  view.lastGood = null;
  view.formsFor = { config: null, schedule: null };
  for (const id of ["stats", "chart", "chart-summary", "events", "node-title", "node-facts",
    "schedule-now"]) $(id).replaceChildren();
  $("nodes").tBodies[0].replaceChildren();
  $("gpus").tBodies[0].replaceChildren();
  $("notice").hidden = true;
  document.querySelector("main").classList.remove("stale");
}

function signOut(message) {
  forget();
  showLogin(message);
}

async function onLogin(event) {
  event.preventDefault();
  const input = $("token");
  const token = input.value.trim();
  input.value = "";
  if (!token) {
    showLogin("enter the admin token");
    return;
  }
  view.token = token;
  let answer;
  try {
    answer = await api("GET", "/api/hibernation/stats");
  } catch (err) {
    view.token = null;
    showLogin(err instanceof Unauthorized ? err.message
      : `the control plane did not answer (${err.message})`);
    return;
  }
  if (!answer.ok) {
    view.token = null;
    showLogin(errorText(answer.data) || `HTTP ${answer.status}`);
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  showApp();
}

function showApp() {
  $("login").hidden = true;
  $("login-error").hidden = true;
  $("sign-out").hidden = false;
  route();
}

// -- refreshing ---------------------------------------------------------------------
function route() {
  const match = /^#\/node\/(.+)$/.exec(window.location.hash);
  let id = null;
  if (match) {
    try {
      id = decodeURIComponent(match[1]);
    } catch (_err) {
      id = null;
    }
  }
  if (id !== view.nodeId) view.formsFor = { config: null, schedule: null };
  view.nodeId = id;
  if (!view.token) return;
  $("fleet").hidden = id !== null;
  $("node").hidden = id === null;
  if (id !== null) {
    $("node-title").textContent = id;
    $("node-facts").textContent = "";
    $("gpus").tBodies[0].replaceChildren();
    $("events").replaceChildren();
  }
  refresh();
}

function schedule() {
  clearTimeout(view.timer);
  view.timer = null;
  if (view.token && !document.hidden) view.timer = setTimeout(refresh, POLL_MS);
}

async function refresh() {
  clearTimeout(view.timer);
  view.timer = null;
  if (!view.token) return;
  const seq = ++view.seq;
  const current = () => seq === view.seq;
  try {
    if (view.nodeId === null) await loadFleet(current);
    else await loadNode(view.nodeId, current);
    if (current()) fresh();
  } catch (err) {
    if (err instanceof Unauthorized) {
      signOut(err.message);
      return;
    }
    if (!(err instanceof Unreachable)) console.error(err); // a bug here: still say stale
    if (current()) stale(err.message);
  }
  if (current()) schedule();
}

function fresh() {
  view.lastGood = new Date();
  $("stale").hidden = true;
  document.querySelector("main").classList.remove("stale");
}

function stale(why) {
  const since = view.lastGood ? `since ${clock(view.lastGood)}` : "yet";
  $("stale").textContent = `Not up to date: no answer ${since} (${why}); showing the last data.`;
  $("stale").hidden = false;
  document.querySelector("main").classList.add("stale");
}

// -- the fleet view -----------------------------------------------------------------
async function loadFleet(current) {
  const [instances, stats, history] = await Promise.all([
    api("GET", "/api/instances"),
    api("GET", "/api/hibernation/stats"),
    api("GET", "/api/fleet/history").catch((err) => {
      if (err instanceof Unauthorized) throw err;
      return null;
    }),
  ]);
  const list = must(instances, "/api/instances");
  const totals = must(stats, "/api/hibernation/stats");
  if (!current()) return;
  const serverNow = Date.parse(list.now);
  const nowMs = Number.isFinite(serverNow) ? serverNow : Date.now();
  renderStats(totals);
  renderChart(history && history.ok ? history.data : null);
  renderTable(Array.isArray(list.instances) ? list.instances : [], nowMs);
}

const STAT_LABELS = [
  ["nodes", "nodes"], ["running", "running"], ["idle", "idle"],
  ["hibernating", "hibernating"], ["hibernated", "hibernated"], ["waking", "waking"],
  ["lost", "lost"], ["wake_failed", "wake failed"], ["revoked", "revoked"],
  ["hibernated_hours", "hours hibernated"],
  ["idle_gpu_hours_avoided", "idle GPU-hours avoided"],
];

function renderStats(totals) {
  $("stats").replaceChildren(...STAT_LABELS.map(([key, label]) => el(
    "div", { className: `stat stat-${key}`, data: { stat: key } },
    el("span", { className: "n", textContent: num(totals[key]) }),
    el("span", { className: "label", textContent: label }),
  )));
}

function renderChart(history) {
  const box = $("chart");
  const points = history && Array.isArray(history.points) ? history.points : [];
  const stepS = history && isNum(history.step_s) ? history.step_s : 300;
  if (!points.length) {
    box.replaceChildren(el("p", { className: "muted", textContent: "No history yet." }));
    $("chart-summary").textContent = "";
    return;
  }
  const W = Math.max(280, Math.round(box.clientWidth || 600)); // drawn in CSS pixels
  const H = 180;
  const left = 44;
  const right = 8;
  const top = 10;
  const bottom = 24;
  const plotW = W - left - right;
  const plotH = H - top - bottom;
  const times = points.map((p) => Date.parse(p.t));
  const end = Math.max(...times.filter(Number.isFinite), Date.now() - DAY_MS);
  const start = end - DAY_MS;
  const x = (t) => left + ((t - start) / DAY_MS) * plotW;
  const y = (fraction) => top + plotH - fraction * plotH;
  const root = svg("svg", {
    viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
    "aria-label": "GPU utilization and node-hours hibernated over the last day",
  });
  root.append(svg("title", {}, "GPU utilization and node-hours hibernated, last 24 h"));
  for (const level of [0, 0.5, 1]) {
    root.append(svg("line", { class: "grid", x1: left, x2: W - right, y1: y(level), y2: y(level) }));
    root.append(svg("text", { class: "axis", x: left - 6, y: y(level) + 4, "text-anchor": "end" },
      level === 0 ? "0" : `${level * 100}%`));
  }
  for (const [fraction, label] of [[0, "24 h ago"], [0.5, "12 h ago"], [1, "now"]]) {
    const anchor = fraction === 0 ? "start" : fraction === 1 ? "end" : "middle";
    root.append(svg("text", { class: "axis", x: left + fraction * plotW, y: H - 6,
      "text-anchor": anchor }, label));
  }
  const hours = points.map((p) => (isNum(p.hibernated_hours) ? p.hibernated_hours : 0));
  const maxHours = Math.max(...hours);
  if (maxHours > 0) {
    const barW = Math.max(1, (stepS * 1000 / DAY_MS) * plotW - 1);
    points.forEach((p, i) => {
      if (!Number.isFinite(times[i]) || hours[i] <= 0 || times[i] < start) return;
      const h = (hours[i] / maxHours) * plotH;
      root.append(svg("rect", { class: "bar-hib", x: x(times[i]), y: top + plotH - h,
        width: barW, height: h }));
    });
    root.append(svg("text", { class: "axis hib", x: W - right, y: top + 10, "text-anchor": "end" },
      `${maxHours.toFixed(2)} h`));
  }
  let run = [];
  const lines = [];
  points.forEach((p, i) => {
    if (isNum(p.gpu_utilization) && Number.isFinite(times[i]) && times[i] >= start) {
      const fraction = Math.min(Math.max(p.gpu_utilization / 100, 0), 1);
      run.push(`${x(times[i]).toFixed(1)},${y(fraction).toFixed(1)}`);
    } else if (run.length) {
      lines.push(run);
      run = [];
    }
  });
  if (run.length) lines.push(run);
  for (const line of lines) {
    if (line.length === 1) {
      const [cx, cy] = line[0].split(",");
      root.append(svg("circle", { class: "dot-util", cx, cy, r: 3 }));
    } else {
      root.append(svg("polyline", { class: "line-util", points: line.join(" ") }));
    }
  }
  box.replaceChildren(root);
  const last = points[points.length - 1];
  const total = hours.reduce((a, b) => a + b, 0);
  $("chart-summary").textContent = `Last 5 min: GPU utilization ${pct(last.gpu_utilization)}, ` +
    `${num(last.nodes_hibernated)} of ${num(last.nodes)} nodes hibernated. Last day: ` +
    `${total.toFixed(2)} node-hours hibernated.`;
}

function renderTable(nodes, nowMs) {
  const body = $("nodes").tBodies[0];
  const rows = new Map();
  for (const row of body.rows) rows.set(row.dataset.instanceId, row);
  nodes.forEach((node, i) => {
    const id = String(node.instance_id);
    let row = rows.get(id);
    if (!row) row = makeRow(id);
    rows.delete(id);
    updateRow(row, node, nowMs);
    if (body.rows[i] !== row) body.insertBefore(row, body.rows[i] || null);
  });
  for (const gone of rows.values()) gone.remove();
  $("empty").hidden = nodes.length > 0;
}

function makeRow(id) {
  const link = el("a", { className: "node-link", href: `#/node/${encodeURIComponent(id)}` },
    el("span", { className: "hostname" }), el("span", { className: "id muted" }));
  const hibernate = el("button", { type: "button", textContent: "Hibernate",
    data: { action: "hibernate" } });
  const wake = el("button", { type: "button", textContent: "Wake", data: { action: "wake" } });
  hibernate.addEventListener("click", () => hibernateNode(id, hibernate));
  wake.addEventListener("click", () => wakeNode(id, wake));
  return el("tr", { data: { instanceId: id } },
    el("td", { className: "node" }, link),
    el("td", { data: { field: "state" } }, el("span", { className: "badge" })),
    el("td", { className: "gpus", data: { field: "gpus" } }),
    el("td", { data: { field: "swap" } }),
    el("td", { data: { field: "last-heartbeat" } }),
    el("td", { data: { field: "schedule" } }),
    el("td", { className: "actions" }, hibernate, wake));
}

function field(row, name) {
  return row.querySelector(`[data-field="${name}"]`);
}

function updateRow(row, node, nowMs) {
  const id = String(node.instance_id);
  const hostname = typeof node.hostname === "string" && node.hostname ? node.hostname : id;
  row.querySelector(".hostname").textContent = hostname;
  row.querySelector(".id").textContent = hostname === id ? "" : id;
  const badge = field(row, "state").firstChild;
  badge.className = stateClass(node.state);
  badge.textContent = stateText(node, nowMs);
  const gpus = Array.isArray(node.gpu_list) ? node.gpu_list : [];
  field(row, "gpus").replaceChildren(...(gpus.length ? gpus.map(gpuBrief)
    : [el("span", { className: "muted", textContent: node.gpus ? `${node.gpus} GPUs` : "no GPU" })]));
  field(row, "swap").textContent = swapText(node.swap);
  field(row, "last-heartbeat").textContent = ago(node.last_seen_age_s);
  field(row, "schedule").textContent = scheduleText(node.schedule);
  const hibernate = row.querySelector('[data-action="hibernate"]');
  const wake = row.querySelector('[data-action="wake"]');
  if (!hibernate.classList.contains("busy")) hibernate.disabled = !HIBERNATABLE.has(node.state);
  if (!wake.classList.contains("busy")) wake.disabled = !WAKEABLE.has(node.state);
}

function gpuBrief(gpu) {
  const state = gpu.lost ? "lost" : typeof gpu.state === "string" ? gpu.state : "—";
  return el("div", {
    className: `gpu gpu-${gpu.lost ? "lost" : state}`,
    title: typeof gpu.name === "string" ? gpu.name : "",
    data: { gpuIndex: num(gpu.index) },
  },
  el("span", { className: "gpu-index", textContent: `GPU ${num(gpu.index)}` }),
  el("span", { data: { field: "utilization" }, textContent: pct(gpu.utilization) }),
  el("span", { data: { field: "temperature" }, textContent: celsius(gpu.temperature) }),
  el("span", { data: { field: "vram" },
    textContent: vram(gpu.memory_used_mib, gpu.memory_total_mib) }),
  el("span", { className: "gpu-state", data: { field: "gpu-state" }, textContent: state }));
}

// -- actions ------------------------------------------------------------------------
function notice(text, ok) {
  const box = $("notice");
  box.textContent = text;
  box.className = ok ? "notice ok" : "notice error";
  box.hidden = false;
}

function said(what, id, answer) {
  const data = answer.data || {};
  if (!answer.ok) {
    return `${what} ${id}: refused (HTTP ${answer.status}): ${errorText(data) || "no reason given"}`;
  }
  if (data.command && typeof data.command === "object") {
    const base = `${what} ${id}: queued as ${data.command.id}; the node takes it with its next ` +
      "heartbeat";
    return typeof data.note === "string" && data.note ? `${base}. Note: ${data.note}` : base;
  }
  if (typeof data.state === "string") {
    return `${what} ${id}: ${data.state}` + (typeof data.done === "string" ? ` (${data.done})` : "");
  }
  return `${what} ${id}: done (HTTP ${answer.status})`;
}

async function act(what, id, method, path, body, button) {
  if (button) {
    button.disabled = true;
    button.classList.add("busy");
  }
  try {
    const answer = await api(method, path, body);
    notice(said(what, id, answer), answer.ok);
  } catch (err) {
    if (err instanceof Unauthorized) {
      signOut(err.message);
      return;
    }
    notice(`${what} ${id}: the control plane did not answer (${err.message})`, false);
  } finally {
    if (button) button.classList.remove("busy");
  }
  await refresh();
}

const nodePath = (id, rest) => `/api/instances/${encodeURIComponent(id)}/${rest}`;

function hibernateNode(id, button) {
  return act("Hibernate", id, "POST", nodePath(id, "hibernate"), undefined, button);
}

function wakeNode(id, button) {
  return act("Wake", id, "POST", nodePath(id, "wake"), undefined, button);
}

// -- the node view ------------------------------------------------------------------
async function loadNode(id, current) {
  const [status, events] = await Promise.all([
    api("GET", nodePath(id, "status")),
    api("GET", `${nodePath(id, "events")}?limit=50`),
  ]);
  if (!current() || id !== view.nodeId) return;
  if (status.status === 404) {
    $("node-title").textContent = id;
    $("node-facts").textContent = errorText(status.data) || "no such node";
    $("gpus").tBodies[0].replaceChildren();
    $("events").replaceChildren();
    return;
  }
  const node = must(status, "status");
  const listed = must(events, "events");
  const nowMs = Date.now();
  renderNode(node, nowMs);
  renderGpus(node.heartbeat && Array.isArray(node.heartbeat.gpus) ? node.heartbeat.gpus : []);
  renderEvents(Array.isArray(listed.events) ? listed.events : []);
  fillForms(id, node);
}

function renderNode(node, nowMs) {
  const id = String(node.instance_id);
  const hostname = typeof node.hostname === "string" && node.hostname ? node.hostname : id;
  $("node-title").replaceChildren(
    el("span", { className: "hostname", textContent: hostname }),
    hostname === id ? null : el("span", { className: "id muted", textContent: ` ${id}` }),
    " ", el("span", { className: stateClass(node.state), textContent: stateText(node, nowMs) }));
  const facts = [
    `last heartbeat ${ago(node.last_seen_age_s)}`,
    `agent ${node.agent_version || "—"}`,
    `memory in use: ${pct(node.memory_used_percent)}`,
    `swap in use: ${swapText(node.swap)}`,
    `schedule: ${scheduleText(node.schedule)}`,
  ];
  if (node.address) facts.push(`address ${node.address}`);
  if (node.accept_commands === false) facts.push("refuses commands");
  const pending = Array.isArray(node.pending_commands) ? node.pending_commands.length : 0;
  if (pending) facts.push(`${pending} command${pending === 1 ? "" : "s"} pending`);
  $("node-facts").textContent = facts.join(" · ");
  $("node-hibernate").disabled = !HIBERNATABLE.has(node.state);
  $("node-wake").disabled = !WAKEABLE.has(node.state);
}

function renderGpus(gpus) {
  const body = $("gpus").tBodies[0];
  if (!gpus.length) {
    body.replaceChildren(el("tr", {}, el("td", { colSpan: 9, className: "muted",
      textContent: "No GPU in the last heartbeat." })));
    return;
  }
  const shown = gpus.filter((g) => g && typeof g === "object").slice(0, MAX_GPUS_SHOWN);
  body.replaceChildren(...shown.map((gpu) => {
    const memory = gpu.memory && typeof gpu.memory === "object" ? gpu.memory : {};
    const limit = gpu.power_limit && typeof gpu.power_limit === "object" ? gpu.power_limit : {};
    const state = gpu.lost === true ? "lost" : typeof gpu.state === "string" ? gpu.state : "—";
    return el("tr", { data: { gpuIndex: num(gpu.index) } },
      el("td", { textContent: num(gpu.index) }),
      el("td", {},
        el("span", { className: "gpu-name", textContent: typeof gpu.name === "string" ? gpu.name : "—" }),
        el("span", { className: "id muted", textContent: typeof gpu.uuid === "string" ? gpu.uuid : "" })),
      el("td", { data: { field: "utilization" }, textContent: pct(gpu.utilization) }),
      el("td", { textContent: pct(gpu.memory_utilization) }),
      el("td", { data: { field: "vram" }, textContent: vram(memory.used, memory.total) }),
      el("td", { data: { field: "temperature" }, textContent: celsius(gpu.temperature) }),
      el("td", { textContent: `${watts(gpu.power_usage)} / ${watts(limit.current)}` }),
      el("td", { className: `gpu-${state}`, textContent: state }),
      el("td", { textContent: Array.isArray(gpu.processes) ? String(gpu.processes.length) : "—" }));
  }));
}

const EVENT_DETAILS = ["command_type", "command_id", "error", "method", "source"];

function renderEvents(events) {
  const list = $("events");
  if (!events.length) {
    list.replaceChildren(el("li", { className: "muted", textContent: "No events yet." }));
    return;
  }
  list.replaceChildren(...events.filter((e) => e && typeof e === "object").map((event) => {
    const at = parsed(event.timestamp);
    const details = EVENT_DETAILS
      .filter((key) => typeof event[key] === "string" && event[key])
      .map((key) => `${key.replace("_", " ")}: ${event[key]}`).join(" · ");
    return el("li", { data: { eventType: String(event.event_type) } },
      el("time", { dateTime: Number.isFinite(at) ? new Date(at).toISOString() : "",
        textContent: Number.isFinite(at) ? new Date(at).toLocaleString() : "—" }),
      el("span", { className: "event-type", textContent: String(event.event_type) }),
      el("span", { className: "reason", textContent: typeof event.reason === "string" ? event.reason : "" }),
      details ? el("span", { className: "details muted", textContent: details }) : null);
  }));
}

function hhmm(iso, tz) {
  const at = parsed(iso);
  if (!Number.isFinite(at)) return "";
  try {
    const parts = new Intl.DateTimeFormat("en-GB", { hour: "2-digit", minute: "2-digit",
      hourCycle: "h23", timeZone: tz || undefined }).formatToParts(new Date(at));
    const part = (type) => (parts.find((p) => p.type === type) || {}).value || "00";
    return `${part("hour")}:${part("minute")}`;
  } catch (_err) {
    return "";
  }
}

function fillForms(id, node) {
  const settings = node.hibernate;
  if (view.formsFor.config !== id && settings && typeof settings === "object") {
    $("cfg-enabled").checked = settings.enabled === true;
    $("cfg-threshold").value = isNum(settings.gpu_usage_threshold) ? settings.gpu_usage_threshold : "";
    $("cfg-pause").value = isNum(settings.pause_after_minutes) ? settings.pause_after_minutes : "";
    view.formsFor.config = id;
  }
  const sched = node.schedule && typeof node.schedule === "object" ? node.schedule : null;
  $("schedule-now").textContent = sched ? `Now: ${scheduleText(sched)}` +
    (typeof sched.timezone === "string" ? ` (${sched.timezone})` : "") : "No schedule.";
  if (view.formsFor.schedule !== id) {
    const browserTz = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
    const tz = sched && typeof sched.timezone === "string" ? sched.timezone : browserTz;
    $("sch-tz").value = tz;
    $("sch-wake").value = sched ? hhmm(sched.wake_at, tz) : "";
    $("sch-sleep").value = sched ? hhmm(sched.sleep_at, tz) : "";
    view.formsFor.schedule = id;
  }
}

function onConfig(event) {
  event.preventDefault();
  const id = view.nodeId;
  const body = {
    enabled: $("cfg-enabled").checked,
    gpu_usage_threshold: $("cfg-threshold").valueAsNumber,
    pause_after_minutes: $("cfg-pause").valueAsNumber,
  };
  return act("Hibernation settings", id, "PUT", nodePath(id, "config"), body,
    event.submitter || null);
}

function onSchedule(event) {
  event.preventDefault();
  const id = view.nodeId;
  const body = {
    wake: $("sch-wake").value || null,
    sleep: $("sch-sleep").value || null,
    tz: $("sch-tz").value.trim() || "UTC",
  };
  return act("Schedule", id, "PUT", nodePath(id, "schedule"), body, event.submitter || null);
}

function onInhibit(event) {
  event.preventDefault();
  const id = view.nodeId;
  const minutes = $("inh-minutes").valueAsNumber;
  const body = {
    duration_s: Number.isFinite(minutes) ? Math.round(minutes * 60) : null,
    reason: $("inh-reason").value,
  };
  return act("Inhibit", id, "POST", nodePath(id, "inhibit"), body, event.submitter || null);
}

// -- start --------------------------------------------------------------------------
function start() {
  $("login-form").addEventListener("submit", onLogin);
  $("sign-out").addEventListener("click", () => signOut(null));
  $("config-form").addEventListener("submit", onConfig);
  $("schedule-form").addEventListener("submit", onSchedule);
  $("inhibit-form").addEventListener("submit", onInhibit);
  $("sch-clear").addEventListener("click", (event) => act("Clear schedule", view.nodeId,
    "DELETE", nodePath(view.nodeId, "schedule"), undefined, event.currentTarget));
  $("node-hibernate").addEventListener("click", (event) =>
    hibernateNode(view.nodeId, event.currentTarget));
  $("node-wake").addEventListener("click", (event) => wakeNode(view.nodeId, event.currentTarget));
  window.addEventListener("hashchange", route);
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) {
      clearTimeout(view.timer);
      view.timer = null;
    } else {
      refresh();
    }
  });
  view.token = sessionStorage.getItem(TOKEN_KEY);
  if (view.token) showApp();
  else showLogin(null);
}

start();
