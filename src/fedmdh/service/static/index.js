/* The task list and the new-task form. */
"use strict";
(() => {
  const form = document.getElementById("task-form");
  const instInput = document.getElementById("institutions");
  const testInput = document.getElementById("test");
  const list = document.getElementById("institution-list");
  const target = document.getElementById("target");
  const chosen = [];            // {file, columns}
  let testFile = null, testColumns = null;

  function renderFiles() {
    list.innerHTML = "";
    chosen.forEach((c, i) => {
      const li = document.createElement("li");
      li.innerHTML = `<span>${fedmdh.esc(c.file.name)}</span><span class="muted">${c.columns.length} columns, ` +
        `${(c.file.size / 1e6).toFixed(2)} MB</span>`;
      const rm = document.createElement("button");
      rm.type = "button"; rm.textContent = "remove"; rm.title = `remove ${c.file.name}`;
      rm.addEventListener("click", () => { chosen.splice(i, 1); renderFiles(); updateTargets(); });
      li.appendChild(rm);
      list.appendChild(li);
    });
  }

  function updateTargets() {
    const sets = chosen.map(c => c.columns);
    if (testColumns) sets.push(testColumns);
    const previous = target.value;
    target.innerHTML = "";
    if (!sets.length) {
      target.disabled = true;
      target.innerHTML = '<option value="">choose the files first</option>';
      return;
    }
    const order = testColumns || sets[0];
    const common = order.filter(c => sets.every(s => s.includes(c)));
    target.disabled = false;
    if (!common.length) {
      target.innerHTML = '<option value="">no column is in every file</option>';
      return;
    }
    for (const c of common) {
      const o = document.createElement("option");
      o.value = c; o.textContent = c;
      target.appendChild(o);
    }
    if (common.includes(previous)) target.value = previous;
    document.getElementById("target-help").textContent =
      `${common.length} column${common.length > 1 ? "s are" : " is"} in every chosen file.`;
  }

  instInput.addEventListener("change", async () => {
    for (const file of instInput.files) chosen.push({ file, columns: await fedmdh.csvHeader(file) });
    instInput.value = "";
    renderFiles(); updateTargets();
  });
  testInput.addEventListener("change", async () => {
    testFile = testInput.files[0] || null;
    testColumns = testFile ? await fedmdh.csvHeader(testFile) : null;
    document.getElementById("test-info").textContent = testFile
      ? `${testFile.name}: ${testColumns.length} columns, ${(testFile.size / 1e6).toFixed(2)} MB`
      : "Every institution's model is scored on these rows, through its own columns.";
    updateTargets();
  });

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    fedmdh.clearErrors(form);
    const data = new FormData();
    for (const c of chosen) data.append("institutions", c.file, c.file.name);
    if (testFile) data.append("test", testFile, testFile.name);
    for (const name of ["target", "algorithm", "rounds", "seed", "ledger", "exclude"]) {
      const el = form.elements[name];
      if (el && el.value !== "") data.append(name, el.value);
    }
    const button = document.getElementById("submit"), status = document.getElementById("submit-status");
    button.disabled = true; status.textContent = "checking the files…";
    try {
      const resp = await fedmdh.api("/api/tasks", { method: "POST", body: data });
      if (resp.status === 201) {
        const body = await resp.json();
        status.textContent = `task ${body.id} queued`;
        location.href = `/tasks/${body.id}`;
        return;
      }
      const p = await fedmdh.problem(resp);
      fedmdh.showError(form, p.field, p.message);
      status.textContent = "";
    } catch (e) {
      fedmdh.showError(form, "", `the service did not answer (${e}); is it still running?`);
      status.textContent = "";
    } finally {
      button.disabled = false;
    }
  });

  async function refresh() {
    let tasks = [];
    try {
      const resp = await fedmdh.api("/api/tasks");
      if (!resp.ok) return;
      tasks = (await resp.json()).tasks;
    } catch (e) { return; }
    const body = document.querySelector("#task-table tbody");
    body.innerHTML = tasks.length ? "" : '<tr><td colspan="7" class="muted">no tasks yet</td></tr>';
    for (const t of tasks) {
      const rmse = t.final ? t.final.rmse : (t.latest ? t.latest.rmse : null);
      const tr = document.createElement("tr");
      tr.innerHTML = `<td><a href="/tasks/${t.id}"><code>${t.id}</code></a></td>` +
        `<td><span class="status ${t.status}">${t.status}</span></td><td>${fedmdh.esc(t.algorithm)}</td>` +
        `<td>${fedmdh.esc(t.target)}</td><td>${t.round} / ${t.rounds}</td><td class="num">${fedmdh.num(rmse)}</td>` +
        `<td>${fedmdh.when(t.created)}</td>`;
      body.appendChild(tr);
    }
    const active = tasks.some(t => t.status === "queued" || t.status === "running");
    setTimeout(refresh, active ? 1500 : 6000);
  }
  refresh();
})();
