/* Helpers shared by the pages: the API (same origin, the session cookie), escaping, numbers. */
"use strict";
const fedmdh = {
  async api(path, options = {}) {
    const resp = await fetch(path, { credentials: "same-origin", ...options });
    if (resp.status === 401) { location.href = "/login?next=" + encodeURIComponent(location.pathname); }
    return resp;
  },
  async problem(resp) {
    try { const body = await resp.json(); return { message: body.detail || resp.statusText, field: body.field || "" }; }
    catch (e) { return { message: `${resp.status} ${resp.statusText}`, field: "" }; }
  },
  esc(s) {
    return String(s ?? "").replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  },
  num(x, digits = 4) { return (x === null || x === undefined || Number.isNaN(x)) ? "–" : Number(x).toFixed(digits); },
  when(iso) { return iso ? new Date(iso).toLocaleString() : ""; },
  /* Clear the per-field errors of a form, then show one beside its field (or at the form's foot). */
  clearErrors(form) {
    form.querySelectorAll("[data-error-for]").forEach(e => { e.textContent = ""; });
    form.querySelectorAll(".field.invalid").forEach(e => e.classList.remove("invalid"));
  },
  showError(form, field, message) {
    let slot = form.querySelector(`[data-error-for="${field}"]`);
    if (!slot) slot = form.querySelector('[data-error-for=""]');
    slot.textContent = message;
    const f = form.querySelector(`.field[data-field="${field}"]`);
    if (f) { f.classList.add("invalid"); const d = f.closest("details"); if (d) d.open = true; }
  },
  /* One CSV line as fields (quotes honoured). */
  csvLine(line) {
    const out = []; let cur = "", quoted = false;
    for (let i = 0; i < line.length; i++) {
      const c = line[i];
      if (quoted) {
        if (c === '"' && line[i + 1] === '"') { cur += '"'; i++; }
        else if (c === '"') quoted = false;
        else cur += c;
      } else if (c === '"') quoted = true;
      else if (c === ",") { out.push(cur.trim()); cur = ""; }
      else cur += c;
    }
    out.push(cur.trim());
    return out;
  },
  /* The header row of a CSV file (its first line), read in the browser. */
  async csvHeader(file) {
    const text = await file.slice(0, 1 << 20).text();
    return fedmdh.csvLine(text.replace(/^\uFEFF/, "").split(/\r?\n/)[0]).filter(c => c !== "");
  },
};
