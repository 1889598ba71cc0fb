/* The task page: progress, the live RMSE curve (server-sent events), institutions, heterogeneity,
   the ledger with Verify, the model download and Predict. */
"use strict";
(() => {
  const root = document.getElementById("task");
  const id = root.dataset.taskId;
  const PALETTE = ["#d9822b", "#2a9d8f", "#8e44ad", "#c0392b", "#7f8c8d", "#16a085", "#b7950b", "#5d6d7e"];
  const FINAL = ["finished", "failed", "interrupted"];
  let task = null, chart = null, source = null, ledgerLoaded = false;
  const rounds = new Map();   // round -> record

  /* ---------------------------------------------------------------- header and progress */
  function renderStatus(status, round, total, error) {
    const el = document.getElementById("status");
    el.textContent = status; el.className = `status ${status}`;
    const bar = document.getElementById("progress");
    bar.max = total || 1; bar.value = round || 0;
    document.getElementById("progress-text").textContent = `round ${round || 0} of ${total}`;
    document.getElementById("task-error").textContent = error || "";
  }

  /* ---------------------------------------------------------------- RMSE chart */
  function chartData() {
    const recs = [...rounds.values()].sort((a, b) => a.round - b.round);
    const data = [recs.map(r => r.round), recs.map(r => r.rmse)];
    for (const name of task.institutions) data.push(recs.map(r => (r.per_institution[name] || {}).rmse ?? null));
    return data;
  }
  function drawChart() {
    const el = document.getElementById("chart");
    const data = chartData();
    el.dataset.points = String(data[0].length);
    if (chart) { chart.setData(data); return; }
    const series = [{ label: "round" }, { label: "mean", stroke: "#1f5fae", width: 2.5, value: (u, v) => fedmdh.num(v) }];
    task.institutions.forEach((name, i) => series.push({
      label: name, stroke: PALETTE[i % PALETTE.length], width: 1.2, dash: [5, 4], value: (u, v) => fedmdh.num(v) }));
    chart = new uPlot({
      width: Math.max(320, el.clientWidth || 900), height: 300, series,
      scales: { x: { time: false } },
      axes: [{ label: "round" }, { label: `test RMSE [${task.target}]`, size: 70 }],
    }, data, el);
    window.addEventListener("resize", () => chart.setSize({ width: Math.max(320, el.clientWidth), height: 300 }));
  }

  /* ---------------------------------------------------------------- institutions */
  function renderInstitutions() {
    const fed = task.federation || {};
    const per = (task.final && task.final.per_institution) || (task.latest && task.latest.per_institution) || {};
    const kl = fed.kl || [];
    const which = task.final ? `final (model of round ${task.final.best_round}, chosen on validation)` :
      (task.latest ? `round ${task.latest.round}` : "");
    const table = document.getElementById("institution-table");
    table.querySelector("thead").innerHTML = "<tr><th>institution</th><th>file</th><th class=num>rows</th>" +
      `<th class=num>columns</th><th class=num>${fedmdh.esc(task.target)} mean</th><th class=num>std</th>` +
      `<th class=num>KL(P_i‖P)</th><th class=num>RMSE</th><th class=num>MAE</th><th class=num>R²</th></tr>`;
    const body = table.querySelector("tbody");
    body.innerHTML = "";
    (fed.institutions || []).forEach((s, i) => {
      const m = per[s.name] || {};
      const tr = document.createElement("tr");
      tr.innerHTML = `<td>${fedmdh.esc(s.name)}</td><td>${fedmdh.esc((fed.files || {})[s.name] || "")}</td>` +
        `<td class=num>${s.rows}</td><td class=num>${s.columns}</td><td class=num>${fedmdh.num(s.label_mean)}</td>` +
        `<td class=num>${fedmdh.num(s.label_std)}</td><td class=num>${fedmdh.num(kl[i])}</td>` +
        `<td class=num>${fedmdh.num(m.rmse)}</td><td class=num>${fedmdh.num(m.mae)}</td><td class=num>${fedmdh.num(m.r2)}</td>`;
      body.appendChild(tr);
    });
    const f = task.final || task.latest;
    if (f) {
      const tr = document.createElement("tr");
      tr.innerHTML = `<th>mean</th><td class="muted">${which}</td><td colspan=5></td><th class=num>${fedmdh.num(f.rmse)}</th>` +
        `<th class=num>${fedmdh.num(f.mae)}</th><th class=num>${fedmdh.num(f.r2)}</th>`;
      body.appendChild(tr);
    }
  }

  function renderFigures() {
    const fed = task.federation || {};
    const figs = [["H", fed.H, "feature overlap"], ["alpha", fed.alpha, "size imbalance"],
      ["KL_avg", fed.KL_avg, "label skew"], ["union features", fed.union_features, "columns in all"],
      ["test rows", fed.test && fed.test.rows, fed.test && fed.test.file]];
    document.getElementById("figures").innerHTML = figs.map(([name, v, note]) =>
      `<div class="figure" data-figure="${name}"><div class="value">${typeof v === "number" && !Number.isInteger(v) ?
        fedmdh.num(v) : fedmdh.esc(v ?? "–")}</div><div class="name">${name}: ${fedmdh.esc(note || "")}</div></div>`).join("");
    const h = fed.label_histogram;
    const box = document.getElementById("histograms");
    box.innerHTML = "";
    if (!h) return;
    const pooledTotal = h.pooled.reduce((a, b) => a + b, 0);
    const pooled = h.pooled.map(c => c / pooledTotal);
    (fed.institutions || []).forEach((s, i) => {
      const counts = h.counts[s.name] || [];
      const total = counts.reduce((a, b) => a + b, 0) || 1;
      const frac = counts.map(c => c / total);
      const W = 300, H = 130, P = 18, n = counts.length;
      const top = Math.max(...frac, ...pooled) || 1, bw = (W - 2 * P) / n;
      const y = v => H - P - (v / top) * (H - 2 * P);
      const bars = frac.map((v, j) => `<rect x="${(P + j * bw + 0.5).toFixed(1)}" y="${y(v).toFixed(1)}" ` +
        `width="${(bw - 1).toFixed(1)}" height="${(H - P - y(v)).toFixed(1)}" fill="${PALETTE[i % PALETTE.length]}">` +
        `<title>${fedmdh.num(h.edges[j], 2)} – ${fedmdh.num(h.edges[j + 1], 2)}: ${counts[j]} rows</title></rect>`).join("");
      const line = pooled.map((v, j) => `${(P + j * bw).toFixed(1)},${y(v).toFixed(1)} ${(P + (j + 1) * bw).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
      const div = document.createElement("div");
      div.className = "histogram";
      div.dataset.institution = s.name;
      div.innerHTML = `<h3>${fedmdh.esc(s.name)} <span class="muted">· ${s.rows} rows · KL ${fedmdh.num((fed.kl || [])[i], 3)}</span></h3>` +
        `<svg viewBox="0 0 ${W} ${H}" role="img" aria-label="label histogram of ${fedmdh.esc(s.name)}">${bars}` +
        `<polyline points="${line}" fill="none" stroke="#1d2430" stroke-width="1.2" stroke-dasharray="3,2"/>` +
        `<line x1="${P}" y1="${H - P}" x2="${W - P}" y2="${H - P}" stroke="#5d6778"/>` +
        `<text x="${P}" y="${H - 3}" font-size="10" fill="#5d6778">${fedmdh.num(h.edges[0], 2)}</text>` +
        `<text x="${W - P}" y="${H - 3}" font-size="10" fill="#5d6778" text-anchor="end">${fedmdh.num(h.edges[n], 2)}</text>` +
        `<text x="${W / 2}" y="${H - 3}" font-size="10" fill="#5d6778" text-anchor="middle">${fedmdh.esc(task.target)}</text></svg>`;
      box.appendChild(div);
    });
  }

  /* ---------------------------------------------------------------- model tab */
  function renderModel() {
    const dl = document.getElementById("download");
    const sel = document.getElementById("predict-institution");
    if (!sel.options.length) {
      for (const name of task.institutions) {
        const o = document.createElement("option"); o.value = name; o.textContent = name; sel.appendChild(o);
      }
    }
    const info = document.getElementById("model-info");
    if (task.status === "finished") {
      dl.href = `/api/tasks/${id}/model`;
      dl.setAttribute("aria-disabled", "false");
      dl.setAttribute("download", `fedmdh-${id}-models.zip`);
      info.textContent = `One ${task.algorithm} model per institution (the round with the lowest validation loss, ` +
        `${task.final.best_round}). ` + (task.ledger !== "off" ? "The zip is read from the ledger's archive, every file " +
        "checked against its archived sha256; MANIFEST.json lists them." : "The task ran with the ledger off: no archive.");
    } else {
      dl.setAttribute("aria-disabled", "true");
      info.textContent = FINAL.includes(task.status) ? `The task is ${task.status}: it has no models.` :
        "The models are available when the task has finished.";
    }
    document.getElementById("predict").disabled = task.status !== "finished";
  }

  /* ---------------------------------------------------------------- loading and live updates */
  async function load() {
    const resp = await fedmdh.api(`/api/tasks/${id}`);
    if (!resp.ok) { document.getElementById("task-error").textContent = (await fedmdh.problem(resp)).message; return; }
    task = await resp.json();
    for (const r of task.metrics) rounds.set(r.round, r);
    document.getElementById("task-title").textContent =
      `${task.algorithm} → ${task.target}, ${task.institutions.length} institutions, seed ${task.seed}`;
    renderStatus(task.status, task.round, task.rounds, task.error);
    drawChart(); renderInstitutions(); renderFigures(); renderModel();
    if (!FINAL.includes(task.status) && !source) listen();
  }

  function listen() {
    source = new EventSource(`/api/tasks/${id}/events`);
    source.addEventListener("round", (e) => {
      const r = JSON.parse(e.data);
      root.dataset.liveRounds = String(Number(root.dataset.liveRounds || 0) + 1);  // rounds that came as events
      rounds.set(r.round, r);
      task.latest = r; task.round = r.round;
      renderStatus(task.status === "queued" ? "running" : task.status, r.round, r.rounds, task.error);
      drawChart();
      if (r.round % 5 === 0 || r.round === r.rounds) renderInstitutions();
    });
    source.addEventListener("status", (e) => {
      const s = JSON.parse(e.data);
      if (s.status === "stopping") return;
      task.status = s.status;
      renderStatus(s.status, s.round, s.rounds, s.error);
    });
    source.addEventListener("end", () => { source.close(); source = null; load(); if (ledgerLoaded) loadLedger(); });
  }

  /* ---------------------------------------------------------------- tabs */
  document.querySelectorAll("nav.tabs button").forEach(b => b.addEventListener("click", () => {
    document.querySelectorAll("nav.tabs button").forEach(x => x.classList.toggle("active", x === b));
    document.querySelectorAll("section.tab").forEach(s => { s.hidden = s.id !== `panel-${b.dataset.tab}`; });
    if (b.dataset.tab === "ledger" && !ledgerLoaded) loadLedger();
    if (b.dataset.tab === "overview" && chart) chart.setSize({ width: document.getElementById("chart").clientWidth, height: 300 });
  }));

  /* ---------------------------------------------------------------- ledger */
  const short = h => h ? `<span class="hash" title="${h}">${h.slice(2, 14)}</span>` : "";
  async function loadLedger() {
    ledgerLoaded = true;
    const info = document.getElementById("ledger-info"), table = document.getElementById("ledger-table");
    const resp = await fedmdh.api(`/api/tasks/${id}/ledger`);
    if (!resp.ok) { info.textContent = (await fedmdh.problem(resp)).message; table.hidden = true; return; }
    const l = await resp.json();
    const t = l.task;
    info.className = "";
    info.innerHTML = `<p>Contract <span class="hash">${fedmdh.esc(t.contract)}</span> on the ${fedmdh.esc(t.chain)} chain ` +
      `(id ${t.chain_id}); ${t.algorithm} → ${fedmdh.esc(t.target)}, ${t.rounds} rounds, quorum ${t.quorum}. ` +
      `${l.transactions} transactions, ${l.total_gas.toLocaleString()} gas.</p>` +
      `<p>Participants: ${Object.entries(l.participants).map(([n, a]) => `${fedmdh.esc(n)} <span class="hash">${a.slice(0, 10)}…</span>`).join(", ")}</p>` +
      `<p>Archived model: ${l.archive ? `<span class="hash" id="archive-hash">${l.archive.model_hash}</span>` : "none yet"}</p>`;
    const body = table.querySelector("tbody");
    body.innerHTML = "";
    for (const r of l.rounds) {
      const commits = Object.entries(r.commitments).map(([n, c]) => `${fedmdh.esc(n)}: ${short(c.update_hash)} × ${c.num_examples}`).join("<br>");
      const fin = r.finalized ? short(r.finalized) : (r.failed ? "FAILED (no quorum)" : "not finalized");
      const att = `${Object.keys(r.attestations).length}` + (r.dissent.length ? `, dissent: ${r.dissent.map(fedmdh.esc).join(", ")}` : "");
      const tr = document.createElement("tr");
      tr.innerHTML = `<td class=num>${r.round}</td><td>${commits}</td><td class=num>${att}</td><td>${fin}</td><td class=num>${r.gas.toLocaleString()}</td>`;
      body.appendChild(tr);
    }
    table.hidden = false;
  }
  document.getElementById("ledger-refresh").addEventListener("click", loadLedger);
  document.getElementById("verify").addEventListener("click", async () => {
    const button = document.getElementById("verify"), out = document.getElementById("verify-result");
    button.disabled = true; out.hidden = false; out.className = "verify"; out.textContent = "verifying: replaying every transaction…";
    try {
      const resp = await fedmdh.api(`/api/tasks/${id}/verify`, { method: "POST" });
      if (!resp.ok) { out.className = "verify bad"; out.textContent = (await fedmdh.problem(resp)).message; return; }
      const v = await resp.json();
      out.className = `verify ${v.ok ? "ok" : "bad"}`;
      out.innerHTML = `<div class="head" id="verify-message">${fedmdh.esc(v.message)}</div>` +
        (v.notes.length ? `<ul>${v.notes.map(n => `<li>${fedmdh.esc(n)}</li>`).join("")}</ul>` : "");
    } finally { button.disabled = false; }
  });

  /* ---------------------------------------------------------------- predict */
  let savedUrl = null;
  document.getElementById("predict-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const form = ev.target;
    fedmdh.clearErrors(form);
    const data = new FormData();
    data.append("institution", document.getElementById("predict-institution").value);
    const file = document.getElementById("predict-file").files[0];
    if (file) data.append("file", file, file.name);
    const resp = await fedmdh.api(`/api/tasks/${id}/predict`, { method: "POST", body: data });
    const result = document.getElementById("predict-result");
    if (!resp.ok) { const p = await fedmdh.problem(resp); fedmdh.showError(form, p.field, p.message); result.hidden = true; return; }
    const text = await resp.text();
    const lines = text.trim().split(/\r?\n/);
    const header = fedmdh.csvLine(lines[0]);
    const col = header.length - 1;   // the prediction column is the last one
    const show = [...new Set([0, 1, 2, col].filter(i => i >= 0 && i <= col))];
    const table = document.getElementById("predict-table");
    table.querySelector("thead").innerHTML = "<tr><th>line</th>" + show.map(i =>
      `<th class="${i === col ? "pred num" : "num"}">${fedmdh.esc(header[i])}</th>`).join("") + "</tr>";
    table.querySelector("tbody").innerHTML = lines.slice(1, 21).map((line, k) => {
      const cells = fedmdh.csvLine(line);
      return `<tr><td class=num>${k + 2}</td>` + show.map(i => `<td class="${i === col ? "pred num" : "num"}">` +
        `${fedmdh.esc(i === col ? fedmdh.num(Number(cells[i])) : cells[i])}</td>`).join("") + "</tr>";
    }).join("");
    const inst = data.get("institution");
    document.getElementById("predict-summary").textContent =
      `${header[col]} for ${lines.length - 1} rows of ${file.name} with ${inst}'s ${task.algorithm} model` +
      (lines.length > 21 ? " (first 20 shown)." : ".");
    if (savedUrl) URL.revokeObjectURL(savedUrl);
    savedUrl = URL.createObjectURL(new Blob([text], { type: "text/csv" }));
    const save = document.getElementById("predict-save");
    save.href = savedUrl; save.download = `predictions_${inst}_${file.name.replace(/\.csv$/i, "")}.csv`;
    result.hidden = false;
  });

  load();
})();
