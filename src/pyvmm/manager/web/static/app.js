// pyvmm manager web UI: VM list, create form, details (overview, console, log, events), life-cycle actions.
// Talks only to the daemon that served the page. Over TCP the daemon needs its token: it is taken from the
// page address (#token=...) or from the sign-in form, and kept in this tab's sessionStorage.
"use strict";

const API = "/api/v1";
const ACTIVE = ["starting", "running", "paused", "in shutdown"];
// Which states each action is offered in: the daemon's own rules (supervisor.ALLOWED).
const ALLOWED = {
  start: ["shutoff", "crashed"],
  shutdown: ["running", "paused", "in shutdown"],
  destroy: ["starting", "running", "paused", "in shutdown"],
  suspend: ["running", "in shutdown"],
  resume: ["paused"],
  reboot: ["running", "in shutdown"],
  cad: ["running", "in shutdown"],
  undefine: ["shutoff", "crashed"],
};
const DONE = { start: "started", shutdown: "power button pressed", destroy: "forced off", suspend: "paused",
               resume: "resumed", reboot: "reset", cad: "Ctrl-Alt-Del sent", undefine: "deleted" };
const CHART_SECONDS = 120;

const state = {
  vms: [], stats: {}, selected: null, tab: "overview", consoleWs: null, term: null, pre: null,
  statsTimer: null, eventsWs: null, authFailed: false, events: [], history: [],
};

const $ = (id) => document.getElementById(id);

class AuthError extends Error {}

function token() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem("pyvmm-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname);  // keep the token out of the address bar
  }
  return sessionStorage.getItem("pyvmm-token");
}

// One sentence from the daemon's error body: its detail, or pydantic's field errors joined.
function errorText(body, status) {
  if (body && typeof body.detail === "string") return body.detail;
  if (body && Array.isArray(body.detail)) {
    return body.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
  }
  return `the daemon answered HTTP ${status}`;
}

async function api(method, path, body) {
  const headers = {};
  const t = token();
  if (t) headers.Authorization = "Bearer " + t;
  const init = { method, headers };
  if (body !== undefined) { headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
  const r = await fetch(API + path, init);
  if (r.status === 401) { showLogin(t ? "That token was refused." : ""); throw new AuthError("token required"); }
  const data = r.status === 204 ? null : await r.json().catch(() => null);
  if (!r.ok) throw new Error(errorText(data, r.status));
  return data;
}

function wsUrl(path) {
  const t = token();
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  return `${proto}//${location.host}${API}${path}${t ? "?token=" + encodeURIComponent(t) : ""}`;
}

const enc = (name) => encodeURIComponent(name);
const isActive = (vm) => vm && ACTIVE.includes(vm.state);
const selectedVm = () => state.vms.find((v) => v.name === state.selected);

// -- sign-in -------------------------------------------------------------------------------------
function showLogin(message) {
  state.authFailed = true;
  $("app").hidden = true;
  $("create-open").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("conn").textContent = "signed out";
  $("login-token").focus();
}

$("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem("pyvmm-token", $("login-token").value.trim());
  start();
});

// -- alerts: one sentence, and the log one click away ------------------------------------------------
function showError(message, vmName) {
  $("alert-text").textContent = message;
  $("alert").hidden = false;
  const logButton = $("alert-log");
  logButton.hidden = !vmName || !state.vms.some((v) => v.name === vmName);
  logButton.onclick = () => { select(vmName); showTab("log"); };
}

function clearError() { $("alert").hidden = true; }
$("alert-close").onclick = clearError;

// -- the list --------------------------------------------------------------------------------------
function fmtMib(bytes) { return `${Math.round(bytes / 1048576)} MiB`; }

function renderList() {
  const tbody = document.querySelector("#vms tbody");
  tbody.replaceChildren();
  $("empty").hidden = state.vms.length > 0;
  for (const vm of state.vms) {
    const st = state.stats[vm.name];
    const tr = document.createElement("tr");
    tr.dataset.vm = vm.name;
    if (vm.name === state.selected) tr.classList.add("selected");
    const cells = [
      ["name", vm.name],
      ["state", vm.state],
      ["vcpus", String(vm.definition.vcpus)],
      ["cpu", isActive(vm) && st ? `${st.cpu_percent.toFixed(1)} %` : "–"],
      ["memory", isActive(vm) && st ? `${fmtMib(st.rss_bytes)} / ${vm.definition.memory_mib} MiB`
                                     : `${vm.definition.memory_mib} MiB`],
    ];
    for (const [cls, text] of cells) {
      const td = document.createElement("td");
      td.className = cls;
      td.textContent = text;
      if (cls === "state") { td.classList.add("state", vm.state.replace(" ", "-")); td.title = vm.reason || ""; }
      tr.appendChild(td);
    }
    const td = document.createElement("td");
    const quick = ALLOWED.start.includes(vm.state) ? "start" : (ALLOWED.shutdown.includes(vm.state) ? "shutdown" : null);
    if (quick) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = quick === "start" ? "Start" : "Shut down";
      b.dataset.action = quick;
      b.onclick = (ev) => { ev.stopPropagation(); act(vm.name, quick); };
      td.appendChild(b);
    }
    tr.appendChild(td);
    tr.onclick = () => select(vm.name);
    tbody.appendChild(tr);
  }
}

async function refresh() {
  try {
    state.vms = await api("GET", "/vms");
    await Promise.all(state.vms.filter(isActive).map(async (vm) => {
      try {
        const r = await api("GET", `/vms/${enc(vm.name)}/stats`);
        state.stats[vm.name] = r.current;
      } catch (e) { /* it may just have stopped */ }
    }));
    if (state.selected && !selectedVm()) deselect();
    renderList();
    renderDetail();
  } catch (e) { if (!(e instanceof AuthError)) showError(e.message); }
}

// -- actions ---------------------------------------------------------------------------------------
async function act(name, action) {
  clearError();
  try {
    if (action === "start" && state.selected !== name) select(name);  // watch it boot
    if (action === "cad") await api("POST", `/vms/${enc(name)}/send-key`, { keys: ["ctrl", "alt", "delete"] });
    else if (action === "undefine") await api("DELETE", `/vms/${enc(name)}`);
    else await api("POST", `/vms/${enc(name)}/${action}`);
    $("conn").textContent = `${name}: ${DONE[action]}`;
  } catch (e) {
    if (!(e instanceof AuthError)) showError(e.message, action === "undefine" ? null : name);
  }
  await refresh();
  if (action === "start" && state.selected === name) showTab("console");
}

let deleteTimer = null;
for (const b of document.querySelectorAll("#actions button")) {
  b.onclick = () => {
    const name = state.selected;
    if (!name) return;
    if (b.dataset.action === "undefine" && !b.classList.contains("confirm")) {
      b.classList.add("confirm");  // a second click within five seconds deletes
      b.textContent = `Really delete ${name}?`;
      clearTimeout(deleteTimer);
      deleteTimer = setTimeout(resetDelete, 5000);
      return;
    }
    resetDelete();
    act(name, b.dataset.action);
  };
}

function resetDelete() {
  const b = document.querySelector('#actions [data-action="undefine"]');
  b.classList.remove("confirm");
  b.textContent = "Delete";
}

// -- details ----------------------------------------------------------------------------------------
function select(name) {
  if (state.selected === name) return;
  state.selected = name;
  state.history = [];
  state.events = [];
  resetDelete();
  $("detail").hidden = false;
  $("detail-name").textContent = name;
  openConsole(name);
  clearInterval(state.statsTimer);
  state.statsTimer = setInterval(updateStats, 1000);
  updateStats();
  loadEvents();
  renderList();
  renderDetail();
  showTab(state.tab);
}

function deselect() {
  state.selected = null;
  $("detail").hidden = true;
  if (state.consoleWs) state.consoleWs.close();
  clearInterval(state.statsTimer);
}

function showTab(tab) {
  state.tab = tab;
  for (const b of document.querySelectorAll(".tabs button")) b.setAttribute("aria-selected", String(b.dataset.tab === tab));
  for (const t of document.querySelectorAll(".tab")) t.hidden = t.dataset.tab !== tab;
  if (tab === "console") fitConsole();
  if (tab === "log") loadLog();
  if (tab === "events") renderEvents();
  if (tab === "overview") drawCharts();
}
for (const b of document.querySelectorAll(".tabs button")) b.onclick = () => showTab(b.dataset.tab);

function fact(dl, label, value, key) {
  const dt = document.createElement("dt");
  dt.textContent = label;
  const dd = document.createElement("dd");
  dd.textContent = value;
  dd.dataset.fact = key;
  dl.append(dt, dd);
}

function accelText(vm) {
  if (vm.accelerator) return vm.accelerator + (vm.accelerator_reason ? ` (${vm.accelerator_reason})` : "");
  const a = vm.definition.accel;
  return a === "auto" ? "auto (kvm or tcg, chosen when it starts)" : `${a} (requested)`;
}

function renderDetail() {
  const vm = selectedVm();
  if (!vm) return;
  const d = vm.definition;
  const badge = $("detail-state");
  badge.textContent = vm.state;
  badge.className = "state " + vm.state.replace(" ", "-");
  for (const b of document.querySelectorAll("#actions button")) b.disabled = !ALLOWED[b.dataset.action].includes(vm.state);

  const dl = $("facts");
  dl.replaceChildren();
  fact(dl, "State", vm.state + (vm.reason && vm.reason !== vm.state ? ` (${vm.reason})` : ""), "state");
  fact(dl, "Accelerator", accelText(vm), "accelerator");
  fact(dl, "vCPUs", String(d.vcpus), "vcpus");
  fact(dl, "Memory", `${d.memory_mib} MiB`, "memory");
  fact(dl, "Kernel", d.kernel, "kernel");
  fact(dl, "Initrd", d.initrd || "–", "initrd");
  fact(dl, "Command line", d.cmdline || "–", "cmdline");
  fact(dl, "Id / PID", vm.id != null ? `${vm.id} / ${vm.pid}` : "– (not running)", "id");
  fact(dl, "Autostart", d.autostart ? "yes" : "no", "autostart");
  fact(dl, "UUID", vm.uuid, "uuid");

  const stopped = ALLOWED.undefine.includes(vm.state);
  const disks = document.querySelector("#disks tbody");
  disks.replaceChildren();
  d.disks.forEach((disk, i) => {
    disks.appendChild(row([`vd${"abcdefghijklmnopqrstuvwxyz"[i]}`, disk.path, disk.format, disk.readonly ? "yes" : "no"],
      stopped ? () => editDefinition((def) => { def.disks.splice(i, 1); }) : null));
  });
  const nics = document.querySelector("#nics tbody");
  nics.replaceChildren();
  d.networks.forEach((n, i) => {
    nics.appendChild(row([`net${i}`, n.type, n.tap || "–", n.model, n.mac || "–"],
      stopped ? () => editDefinition((def) => { def.networks.splice(i, 1); }) : null));
  });
  $("disk-add").hidden = !stopped;
  $("nic-add").hidden = !stopped;
  $("edit-note").textContent = stopped ? "" : "Disks and NICs can be changed while the VM is shut off.";

  const off = $("console-off");
  off.hidden = isActive(vm);
  off.textContent = `${vm.name} is not running (${vm.state}${vm.reason ? ": " + vm.reason : ""}). ` +
                    "Start it to use its console; the output of its last run stays below.";
}

function row(cells, onRemove) {
  const tr = document.createElement("tr");
  for (const c of cells) { const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); }
  const td = document.createElement("td");
  if (onRemove) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = "Remove";
    b.className = "link";
    b.onclick = onRemove;
    td.appendChild(b);
  }
  tr.appendChild(td);
  return tr;
}

async function editDefinition(change) {
  const name = state.selected;
  clearError();
  try {
    const def = await api("GET", `/vms/${enc(name)}/definition`);
    change(def);
    await api("PUT", `/vms/${enc(name)}`, def);
  } catch (e) { if (!(e instanceof AuthError)) showError(e.message, name); }
  await refresh();
}

$("disk-add").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const f = ev.target;
  const disk = { path: f.elements.path.value.trim(), format: f.elements.format.value, readonly: f.elements.readonly.checked };
  editDefinition((def) => def.disks.push(disk)).then(() => f.reset());
});

$("nic-add").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const f = ev.target;
  const nic = { type: f.elements.type.value };
  if (f.elements.type.value === "tap" && f.elements.tap.value.trim()) nic.tap = f.elements.tap.value.trim();
  editDefinition((def) => def.networks.push(nic)).then(() => f.reset());
});

// -- console: xterm.js sized to its pane ---------------------------------------------------------------
const FONT_SIZE = 14;

function openConsole(name) {
  if (state.consoleWs) state.consoleWs.close();
  const box = $("console");
  box.replaceChildren();
  state.term = null;
  state.pre = null;
  const ws = new WebSocket(wsUrl(`/vms/${enc(name)}/console`));
  ws.binaryType = "arraybuffer";
  const send = (text) => { if (ws.readyState === 1) ws.send(new TextEncoder().encode(text)); };
  if (window.Terminal) {
    state.term = new window.Terminal({ convertEol: true, scrollback: 5000, fontSize: FONT_SIZE, fontFamily: "monospace" });
    state.term.open(box);
    state.term.onData(send);
  } else {  // no xterm.js installed: plain text, typed input through a key handler
    state.pre = document.createElement("pre");
    box.appendChild(state.pre);
    box.tabIndex = 0;
    box.onkeydown = (ev) => {
      if (ev.key.length === 1) send(ev.key);
      else if (ev.key === "Enter") send("\r");
    };
  }
  const decoder = new TextDecoder();
  ws.onmessage = (ev) => {
    const bytes = new Uint8Array(ev.data);
    if (state.term) state.term.write(bytes);
    else { state.pre.textContent += decoder.decode(bytes, { stream: true }); box.scrollTop = box.scrollHeight; }
  };
  state.consoleWs = ws;
  state.consoleSend = send;
  fitConsole();
}

// The size of one character cell: xterm's own measurement when it has one, else the font's.
function cellSize() {
  const dims = state.term && state.term._core && state.term._core._renderService &&
               state.term._core._renderService.dimensions;
  if (dims && dims.css && dims.css.cell && dims.css.cell.width > 0) return [dims.css.cell.width, dims.css.cell.height];
  const ctx = document.createElement("canvas").getContext("2d");
  ctx.font = `${FONT_SIZE}px monospace`;
  return [ctx.measureText("W").width, Math.ceil(FONT_SIZE * 1.2)];
}

function fitConsole() {
  if (!state.term || $("tab-console").hidden) return;
  const box = $("console");
  const [cw, ch] = cellSize();
  const cols = Math.max(20, Math.floor((box.clientWidth - 8) / cw));
  const rows = Math.max(5, Math.floor((box.clientHeight - 8) / ch));
  if (cols !== state.term.cols || rows !== state.term.rows) state.term.resize(cols, rows);
  const note = $("console-size");
  note.replaceChildren();
  note.append(`Terminal ${cols}×${rows}, sized to this pane. A serial console cannot tell the guest its size ` +
              "(there is no TIOCSWINSZ through a serial line), so programs in the guest assume 80×24 until told: ");
  const b = document.createElement("button");
  b.type = "button";
  b.className = "link";
  b.id = "console-stty";
  b.textContent = `type “stty cols ${cols} rows ${rows}” in the guest`;
  b.onclick = () => { state.consoleSend(`stty cols ${cols} rows ${rows}\r`); state.term.focus(); };
  note.append(b);
}

let resizeTimer = null;
window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(fitConsole, 100); });

// -- log and events --------------------------------------------------------------------------------
async function loadLog() {
  const name = state.selected;
  if (!name) return;
  try {
    const r = await api("GET", `/vms/${enc(name)}/log`);
    $("log").textContent = r.text || "(empty: the VM has not been started yet)";
    $("log-path").textContent = `The end of ${r.path}`;
  } catch (e) { if (!(e instanceof AuthError)) $("log").textContent = e.message; }
}

async function loadEvents() {
  const name = state.selected;
  try {
    state.events = await api("GET", `/vms/${enc(name)}/events`);
    renderEvents();
  } catch (e) { /* undefined meanwhile */ }
}

function renderEvents() {
  const tbody = document.querySelector("#events tbody");
  tbody.replaceChildren();
  for (const e of [...state.events].reverse()) {
    const when = new Date(e.timestamp * 1000).toLocaleTimeString();
    const tr = row([when, e.name, e.state, e.reason || "–"], null);
    tr.lastChild.remove();
    tbody.appendChild(tr);
  }
}

// -- charts: time axis and units -------------------------------------------------------------------------
async function updateStats() {
  const name = state.selected;
  if (!name) return;
  try {
    const r = await api("GET", `/vms/${enc(name)}/stats`);
    state.history = r.history;
    if (!$("tab-overview").hidden) drawCharts();
  } catch (e) { /* the VM may have been undefined */ }
}

function niceMax(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function drawChart(canvas, samples, value, unit, minMax) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  const L = 58, R = 8, T = 10, B = 26;  // plot margins: y labels left, time labels below
  ctx.clearRect(0, 0, w, h);
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, w, h);
  ctx.font = "11px sans-serif";
  const vm = selectedVm();
  const now = Date.now() / 1000;
  const pts = samples.filter((s) => s.timestamp >= now - CHART_SECONDS);
  const max = niceMax(Math.max(minMax, ...pts.map(value)));
  ctx.strokeStyle = "#e3e3e3"; ctx.fillStyle = "#555"; ctx.textAlign = "right"; ctx.textBaseline = "middle";
  const yLabels = [], xLabels = [];
  for (let i = 0; i <= 4; i++) {
    const y = T + (h - T - B) * (1 - i / 4);
    ctx.beginPath(); ctx.moveTo(L, y); ctx.lineTo(w - R, y); ctx.stroke();
    const v = max * i / 4;
    const label = `${Number.isInteger(v) ? v : v.toFixed(1)} ${unit}`;
    yLabels.push(label);
    ctx.fillText(label, L - 4, y);
  }
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  for (let s = CHART_SECONDS; s >= 0; s -= 30) {
    const x = L + (w - L - R) * (1 - s / CHART_SECONDS);
    ctx.beginPath(); ctx.moveTo(x, T); ctx.lineTo(x, h - B); ctx.stroke();
    const label = s === 0 ? "now" : `−${s} s`;
    xLabels.push(label);
    ctx.fillText(label, Math.min(x, w - R - 12), h - B + 6);
  }
  // The axes, also for screen readers and tests: the canvas says what it drew.
  canvas.dataset.yLabels = yLabels.join("|");
  canvas.dataset.xLabels = xLabels.join("|");
  ctx.textAlign = "left";
  const status = !isActive(vm) ? "not running" : (pts.length < 2 ? "waiting" : "drawn");
  canvas.dataset.status = status;
  const last = pts.length ? value(pts[pts.length - 1]) : null;
  canvas.setAttribute("aria-label", status === "drawn" ? `now ${last.toFixed(1)} ${unit}` : status);
  if (status === "not running") {
    ctx.fillStyle = "#333"; ctx.fillText("no samples: the VM is not running", L + 10, T + 8);
    return;
  }
  if (status === "waiting") { ctx.fillStyle = "#333"; ctx.fillText("waiting for samples…", L + 10, T + 8); return; }
  ctx.strokeStyle = "#0969da"; ctx.lineWidth = 2; ctx.beginPath();
  pts.forEach((s, i) => {
    const x = L + (w - L - R) * (1 - (now - s.timestamp) / CHART_SECONDS);
    const y = T + (h - T - B) * (1 - value(s) / max);
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
  ctx.lineWidth = 1;
}

function drawCharts() {
  drawChart($("cpu-chart"), state.history, (s) => s.cpu_percent, "%", 10);
  drawChart($("mem-chart"), state.history, (s) => s.rss_bytes / 1048576, "MiB", 16);
}

// -- create form -----------------------------------------------------------------------------------------
function addDiskRow() {
  const div = document.createElement("div");
  div.className = "disk-row";
  div.innerHTML = '<input name="disk-path" placeholder="/path/to/image" aria-label="disk image path">' +
    '<select name="disk-format" aria-label="disk format"><option>raw</option><option>qcow2</option></select>' +
    '<label><input type="checkbox" name="disk-readonly"> read-only</label>' +
    '<button type="button" class="link">Remove</button>';
  div.querySelector("button").onclick = () => div.remove();
  $("create-disks").appendChild(div);
}

function openCreate() {
  $("create-form").reset();
  $("create-disks").replaceChildren();
  $("create-error").textContent = "";
  $("create").showModal();
}
$("create-open").onclick = openCreate;
$("create-empty").onclick = openCreate;
$("create-add-disk").onclick = addDiskRow;
$("create-cancel").onclick = () => $("create").close();

$("create-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const f = ev.target;
  const body = { name: f.elements.name.value.trim(), memory_mib: Number(f.elements.memory_mib.value), vcpus: Number(f.elements.vcpus.value),
                 accel: f.elements.accel.value, disks: [], networks: [] };
  for (const key of ["kernel", "initrd", "cmdline"]) if (f.elements[key].value.trim()) body[key] = f.elements[key].value.trim();
  for (const r of $("create-disks").querySelectorAll(".disk-row")) {
    const path = r.querySelector('[name="disk-path"]').value.trim();
    if (path) body.disks.push({ path, format: r.querySelector('[name="disk-format"]').value,
                                readonly: r.querySelector('[name="disk-readonly"]').checked });
  }
  if (f.elements.nic.value) {
    const nic = { type: f.elements.nic.value };
    if (f.elements.nic.value === "tap" && f.elements.tap.value.trim()) nic.tap = f.elements.tap.value.trim();
    body.networks.push(nic);
  }
  $("create-submit").disabled = true;
  $("create-error").textContent = "";
  try {
    await api("POST", "/vms", body);
    $("create").close();
    await refresh();
    select(body.name);
    if (f.elements.start.checked) await act(body.name, "start");
  } catch (e) {
    if (!(e instanceof AuthError)) $("create-error").textContent = e.message;
  } finally { $("create-submit").disabled = false; }
});

// -- events from the daemon -----------------------------------------------------------------------------
let retryDelay = 1000;

function watchEvents() {
  const conn = $("conn");
  const ws = new WebSocket(wsUrl("/events/ws"));
  state.eventsWs = ws;
  ws.onopen = () => { conn.textContent = "connected"; retryDelay = 1000; refresh(); };
  ws.onmessage = (msg) => {
    const ev = JSON.parse(msg.data);
    if (ev.seq !== undefined && ev.vm === state.selected) {
      state.events.push(ev);
      if (!$("tab-events").hidden) renderEvents();
      if (!$("tab-log").hidden && ev.name === "state") loadLog();
    }
    scheduleRefresh();
  };
  ws.onclose = async () => {
    if (state.eventsWs !== ws || state.authFailed) return;
    try { await api("GET", "/version"); } catch (e) { if (e instanceof AuthError) return; }
    conn.textContent = "disconnected from pyvmmd, retrying…";
    setTimeout(watchEvents, retryDelay);
    retryDelay = Math.min(retryDelay * 2, 30000);
  };
}

let refreshTimer = null;
function scheduleRefresh() { clearTimeout(refreshTimer); refreshTimer = setTimeout(refresh, 100); }

async function start() {
  try {
    await api("GET", "/version");
  } catch (e) {
    if (!(e instanceof AuthError)) { $("conn").textContent = `cannot reach pyvmmd: ${e.message}`; }
    return;
  }
  state.authFailed = false;
  $("login").hidden = true;
  $("app").hidden = false;
  $("create-open").hidden = false;
  await refresh();
  watchEvents();
}

start();
setInterval(() => { if (!state.authFailed) refresh(); }, 2000);
