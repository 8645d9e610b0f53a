// durable-yaml dashboard: relative times kept current, run selection for bulk actions,
// and live updates over Server-Sent Events (no polling from the browser).
(function () {
  "use strict";

  // "3 min ago" / "in 5 min": the same rule as engine/server/ui.py relative()
  function relative(ts, now) {
    const delta = now - ts;
    const seconds = Math.abs(delta);
    if (seconds < 5) return "just now";
    let amount = "";
    for (const [size, unit] of [[86400, "d"], [3600, "h"], [60, "min"], [1, "s"]]) {
      if (seconds >= size) { amount = Math.floor(seconds / size) + " " + unit; break; }
    }
    return delta > 0 ? amount + " ago" : "in " + amount;
  }
  function refreshTimes(root) {
    const now = Date.now() / 1000;
    for (const el of (root || document).querySelectorAll("time[datetime]")) {
      const ts = Date.parse(el.getAttribute("datetime")) / 1000;
      if (!isNaN(ts)) el.textContent = relative(ts, now);
    }
  }
  setInterval(refreshTimes, 10000);

  // bulk selection on the runs page: the count on the buttons, "select all" on the page
  function selection() {
    const form = document.getElementById("bulk");
    if (!form) return;
    const boxes = document.querySelectorAll("input.pick");
    const picked = [...boxes].filter((b) => b.checked).length;
    const all = document.getElementById("pick-all");
    if (all) all.checked = boxes.length > 0 && picked === boxes.length;
    const total = Number(form.dataset.total || 0);
    const scope = picked ? picked + " selected" : "all " + total + " matching the filter";
    form.dataset.picked = String(picked);
    document.getElementById("bulk-scope").textContent = scope;
  }
  document.addEventListener("change", (e) => {
    const t = e.target;
    if (t && t.id === "pick-all") {
      for (const b of document.querySelectorAll("input.pick")) b.checked = t.checked;
    }
    if (t && (t.id === "pick-all" || (t.classList && t.classList.contains("pick")))) selection();
  });
  document.addEventListener("submit", (e) => {
    const form = e.target;
    if (!form || form.id !== "bulk") return;
    const action = e.submitter ? e.submitter.value : "cancel";
    const picked = Number(form.dataset.picked || 0);
    const count = picked || Number(form.dataset.total || 0);
    const what = picked ? count + " selected run" + (count === 1 ? "" : "s")
                        : "all " + count + " run" + (count === 1 ? "" : "s") + " matching the filter";
    if (!window.confirm(action[0].toUpperCase() + action.slice(1) + " " + what + "?")) e.preventDefault();
  });
  document.addEventListener("click", (e) => {
    const b = e.target.closest ? e.target.closest("button[data-confirm]") : null;
    if (b && !window.confirm(b.dataset.confirm)) e.preventDefault();
  });

  // live regions: replace the elements marked data-live with the freshly rendered page's;
  // while the user types in one, wait until they leave the field
  let deferred = false;
  function typing() {
    const a = document.activeElement;
    return a && /^(INPUT|TEXTAREA|SELECT)$/.test(a.tagName) && a.type !== "checkbox" && a.closest("[data-live]");
  }
  document.addEventListener("focusout", () => { if (deferred) { deferred = false; soon(); } });
  async function refreshPage() {
    if (typing()) { deferred = true; return; }
    const r = await fetch(location.href, { credentials: "same-origin" });
    if (!r.ok) return;
    const doc = new DOMParser().parseFromString(await r.text(), "text/html");
    const picked = new Set([...document.querySelectorAll("input.pick:checked")].map((b) => b.value));
    const open = new Set([...document.querySelectorAll("details[open][data-key]")].map((d) => d.dataset.key));
    for (const fresh of doc.querySelectorAll("[data-live]")) {
      const old = document.getElementById(fresh.id);
      if (!old) continue;
      for (const d of fresh.querySelectorAll("details[data-key]")) if (open.has(d.dataset.key)) d.open = true;
      old.replaceWith(document.importNode(fresh, true));
    }
    for (const b of document.querySelectorAll("input.pick")) if (picked.has(b.value)) b.checked = true;
    refreshTimes();
    selection();
    document.dispatchEvent(new CustomEvent("durable-yaml:refreshed"));
  }
  let pending = null;
  function soon() {
    if (pending) return;
    pending = setTimeout(() => { pending = null; refreshPage(); }, 250);
  }
  function listen(url, onEnd) {
    const live = document.getElementById("live");
    const source = new EventSource(url, { withCredentials: true });
    const changed = () => soon();
    for (const name of ["run", "step", "log", "rows"]) source.addEventListener(name, changed);
    source.addEventListener("end", () => { source.close(); soon(); if (onEnd) onEnd(); });
    source.onopen = () => { if (live) { live.textContent = "live"; live.dataset.state = "open"; } };
    source.onerror = () => { if (live) { live.textContent = "reconnecting…"; live.dataset.state = "error"; } };
    return source;
  }
  window.durableYaml = { listen, refreshPage, refreshTimes, selection };
  document.addEventListener("DOMContentLoaded", () => {
    selection();
    const stream = document.body.dataset.stream;
    if (stream) listen(stream);
  });
})();
