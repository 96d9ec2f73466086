// pyvmm manager web UI: VM list with actions, live serial console (xterm.js), CPU/memory charts.
// Talks only to the daemon that served the page. Over TCP the daemon needs a token: it is taken
// from the page address (#token=...) or asked for once, and kept in this tab's sessionStorage.
"use strict";

const API = "/api/v1";
const ACTIONS = {
  shutoff: ["start"], crashed: ["start"], starting: ["destroy"],
  running: ["shutdown", "suspend", "reboot", "destroy"],
  paused: ["resume", "shutdown", "destroy"],
  "in shutdown": ["suspend", "destroy"],
};
const LABELS = { start: "Start", shutdown: "Shut down", destroy: "Force off", suspend: "Pause",
                 resume: "Resume", reboot: "Reboot" };

const state = { vms: [], selected: null, consoleWs: null, term: null, pre: null, statsTimer: null };

function token() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) sessionStorage.setItem("pyvmm-token", decodeURIComponent(m[1]));
  return sessionStorage.getItem("pyvmm-token");
}

async function api(method, path) {
  const headers = {};
  const t = token();
  if (t) headers.Authorization = "Bearer " + t;
  const r = await fetch(API + path, { method, headers });
  if (r.status === 401) {
    const t2 = prompt("pyvmmd token:");
    if (t2) { sessionStorage.setItem("pyvmm-token", t2); return api(method, path); }
  }
  const body = r.status === 204 ? null : await r.json();
  if (!r.ok) throw new Error((body && typeof body.detail === "string") ? body.detail : `HTTP ${r.status}`);
  return body;
}

function wsUrl(path) {
  const t = token();
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  return `${proto}//${location.host}${API}${path}${t ? "?token=" + encodeURIComponent(t) : ""}`;
}

function showError(msg) { document.getElementById("error").textContent = msg || ""; }

function render() {
  const tbody = document.querySelector("#vms tbody");
  tbody.replaceChildren();
  document.getElementById("empty").hidden = state.vms.length > 0;
  for (const vm of state.vms) {
    const tr = document.createElement("tr");
    tr.dataset.vm = vm.name;
    if (vm.name === state.selected) tr.classList.add("selected");
    const cells = [vm.name, vm.state, vm.pid ?? "-", vm.definition.vcpus, vm.definition.memory_mib + " MiB"];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i === 1) { td.className = "state " + vm.state.replace(" ", "-"); td.title = vm.reason || ""; }
      tr.appendChild(td);
    });
    const td = document.createElement("td");
    for (const action of ACTIONS[vm.state] || []) {
      const b = document.createElement("button");
      b.textContent = LABELS[action];
      b.dataset.action = action;
      b.onclick = (ev) => { ev.stopPropagation(); act(vm.name, action); };
      td.appendChild(b);
    }
    const c = document.createElement("button");
    c.textContent = "Console";
    c.dataset.action = "console";
    c.onclick = (ev) => { ev.stopPropagation(); select(vm.name); };
    td.appendChild(c);
    tr.appendChild(td);
    tr.onclick = () => select(vm.name);
    tbody.appendChild(tr);
  }
  const sel = state.vms.find((v) => v.name === state.selected);
  document.getElementById("detail-state").textContent = sel ? `(${sel.state})` : "";
}

async function refresh() {
  try {
    state.vms = await api("GET", "/vms");
    render();
  } catch (e) { showError(e.message); }
}

async function act(name, action) {
  showError("");
  try {
    if (action === "start" && state.selected !== name) select(name);  // watch it boot
    await api("POST", `/vms/${encodeURIComponent(name)}/${action}`);
  } catch (e) { showError(`${name}: ${e.message}`); }
  refresh();
}

function select(name) {
  if (state.selected === name) return;
  state.selected = name;
  document.getElementById("detail").hidden = false;
  document.getElementById("detail-name").textContent = name;
  openConsole(name);
  history.length = 0;
  drawCharts([]);
  clearInterval(state.statsTimer);
  state.statsTimer = setInterval(updateStats, 1000);
  updateStats();
  render();
}

function openConsole(name) {
  if (state.consoleWs) state.consoleWs.close();
  const box = document.getElementById("console");
  box.replaceChildren();
  state.term = null;
  state.pre = null;
  if (window.Terminal) {
    state.term = new window.Terminal({ convertEol: true, rows: 20, cols: 100, scrollback: 5000 });
    state.term.open(box);
    state.term.onData((d) => { if (ws.readyState === 1) ws.send(new TextEncoder().encode(d)); });
  } else {  // no xterm.js installed: plain text, typed input through a key handler
    state.pre = document.createElement("pre");
    box.appendChild(state.pre);
    box.tabIndex = 0;
    box.onkeydown = (ev) => {
      if (ev.key.length === 1 && ws.readyState === 1) ws.send(new TextEncoder().encode(ev.key));
      else if (ev.key === "Enter" && ws.readyState === 1) ws.send(new TextEncoder().encode("\r"));
    };
  }
  const ws = new WebSocket(wsUrl(`/vms/${encodeURIComponent(name)}/console`));
  ws.binaryType = "arraybuffer";
  const decoder = new TextDecoder();
  ws.onmessage = (ev) => {
    const bytes = new Uint8Array(ev.data);
    if (state.term) state.term.write(bytes);
    else { state.pre.textContent += decoder.decode(bytes, { stream: true }); box.scrollTop = box.scrollHeight; }
  };
  state.consoleWs = ws;
}

const history = [];

async function updateStats() {
  const name = state.selected;
  if (!name) return;
  try {
    const r = await api("GET", `/vms/${encodeURIComponent(name)}/stats`);
    history.splice(0, history.length, ...r.history.slice(-120));
    drawCharts(history);
  } catch (e) { /* the VM may have been undefined */ }
}

function drawChart(canvas, values, unit) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, w, h);
  const max = Math.max(1, ...values) * 1.1;
  ctx.strokeStyle = "#ddd"; ctx.fillStyle = "#666"; ctx.font = "11px sans-serif";
  for (let i = 0; i <= 4; i++) {
    const y = h - 14 - (h - 24) * i / 4;
    ctx.beginPath(); ctx.moveTo(30, y); ctx.lineTo(w, y); ctx.stroke();
    ctx.fillText((max * i / 4).toFixed(0), 2, y + 4);
  }
  if (values.length < 2) { ctx.fillText("waiting for samples…", 40, 20); return; }
  ctx.strokeStyle = "#0969da"; ctx.lineWidth = 2; ctx.beginPath();
  values.forEach((v, i) => {
    const x = 30 + (w - 32) * i / (values.length - 1);
    const y = h - 14 - (h - 24) * v / max;
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
  ctx.fillStyle = "#222";
  ctx.fillText(`now ${values[values.length - 1].toFixed(1)} ${unit}`, w - 110, 12);
}

function drawCharts(samples) {
  drawChart(document.getElementById("cpu-chart"), samples.map((s) => s.cpu_percent), "%");
  drawChart(document.getElementById("mem-chart"), samples.map((s) => s.rss_bytes / 1048576), "MiB");
}

function watchEvents() {
  const conn = document.getElementById("conn");
  const ws = new WebSocket(wsUrl("/events/ws"));
  ws.onopen = () => { conn.textContent = "connected"; refresh(); };
  ws.onmessage = () => refresh();
  ws.onclose = () => { conn.textContent = "disconnected, retrying…"; setTimeout(watchEvents, 2000); };
}

refresh();
watchEvents();
setInterval(refresh, 5000);
