// Snapshot, clone and migrate in the details pane, and restore under the VM list (pyvmm.manager.snapshots).
// Uses app.js's api(), refresh(), showError(), clearError(), selectedVm() and select().
"use strict";

const STATE_OPS = ["running", "paused"];  // supervisor.ALLOWED["snapshot"] and ["migrate"]

function stateOpsEnable() {
  const vm = selectedVm();
  const on = !!vm && STATE_OPS.includes(vm.state);
  for (const b of document.querySelectorAll("#state-ops button")) b.disabled = !on;
}
setInterval(stateOpsEnable, 300);

async function stateOp(op) {
  const vm = selectedVm();
  if (!vm) return;
  const f = $("state-ops");
  clearError();
  const note = $("state-note");
  note.textContent = `${vm.name}: ${op} in progress…`;
  try {
    if (op === "snapshot") {
      const r = await api("POST", `/vms/${enc(vm.name)}/snapshot`, { dir: f.elements["dir"].value.trim() });
      note.textContent = `${vm.name}: snapshot in ${r.dir} (paused ${Math.round(r.seconds * 1000)} ms)`;
    } else if (op === "clone") {
      const r = await api("POST", `/vms/${enc(vm.name)}/clone`, { count: Number(f.elements["count"].value) });
      note.textContent = `${vm.name}: cloned as ${r.clones.map((c) => c.name).join(", ")}`;
    } else {
      const body = { to: f.elements["to"].value.trim() };
      if (f.elements["token"].value) body.token = f.elements["token"].value;
      const r = await api("POST", `/vms/${enc(vm.name)}/migrate`, body);
      note.textContent = `${vm.name}: ${r.message} in ${r.seconds.toFixed(1)} s`;
    }
  } catch (e) {
    note.textContent = "";
    if (!(e instanceof AuthError)) showError(e.message, vm.name);
  }
  await refresh();
}

for (const b of document.querySelectorAll("#state-ops button")) b.onclick = () => stateOp(b.dataset.op);

$("restore-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  clearError();
  const f = ev.target;
  const body = { dir: f.elements["dir"].value.trim() };
  if (f.elements["name"].value.trim()) body.name = f.elements["name"].value.trim();
  try {
    const vm = await api("POST", "/restore", body);
    $("conn").textContent = `${vm.name}: restored (${vm.state})`;
    await refresh();
    select(vm.name);
  } catch (e) {
    if (!(e instanceof AuthError)) showError(e.message);
  }
});
