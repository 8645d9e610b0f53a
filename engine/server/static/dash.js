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

  // bulk selection on the runs page: what the bulk buttons act on, "select all" on the page
  function selection() {
    const form = document.getElementById("bulk");
    if (!form) return;
    const boxes = document.querySelectorAll("input.pick");
    const picked = [...boxes].filter((b) => b.checked).length;
    const all = document.getElementById("pick-all");
    if (all) all.checked = boxes.length > 0 && picked === boxes.length;
    const filtered = form.dataset.filtered === "yes";
    const scope = picked ? picked + " selected"
      : filtered ? "all runs matching the filter" : "select runs, or filter them";
    document.getElementById("bulk-scope").textContent = scope;
    for (const b of form.querySelectorAll("button")) b.disabled = !picked && !filtered;
  }
  document.addEventListener("change", (e) => {
    const t = e.target;
    if (t && t.id === "pick-all") {
      for (const b of document.querySelectorAll("input.pick")) b.checked = t.checked;
    }
    if (t && (t.id === "pick-all" || (t.classList && t.classList.contains("pick")))) selection();
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
  function status(text, state) {
    const live = document.getElementById("live");
    if (live) { live.textContent = text; live.dataset.state = state; }
  }
  // the runs page: its own change stream says "the first page changed"; the server closes
  // it every few seconds and the page opens it again with what it shows now (data-seen)
  let failures = 0;
  function listenRows(url) {
    const rows = document.getElementById("rows");
    const u = new URL(url, location.href);
    u.searchParams.set("seen", rows ? rows.dataset.seen || "" : "");
    const source = new EventSource(u.toString(), { withCredentials: true });
    source.addEventListener("run", soon);
    source.onopen = () => { failures = 0; status("live", "open"); };
    source.onerror = () => {  // also the server's planned close: reopen, say so if it fails
      source.close();
      if (++failures > 1) status("reconnecting…", "error");
      setTimeout(() => listenRows(url), failures > 1 ? 3000 : 200);
    };
  }
  // a run's page: GET /api/runs/{id}/events sends the run, each step and each log line;
  // the page refreshes when one differs from what it shows. The page reopens the stream
  // every ROTATE_MS (from the newest line seen), so a server asked to stop waits for it
  // at most that long.
  const ROTATE_MS = 15000;
  function listenRun(url) {
    const shown = (sel, attr) => { const el = document.querySelector(sel); return el ? el.dataset[attr] : null; };
    let newest = Number(shown("#run-page", "lastLog") || 0);
    let ended = false;
    const open = () => {
      const u = new URL(url, location.href);
      u.searchParams.set("after", String(Math.max(newest, Number(u.searchParams.get("after") || 0))));
      const source = new EventSource(u.toString(), { withCredentials: true });
      const rotate = setTimeout(() => { source.close(); if (!ended) open(); }, ROTATE_MS);
      source.addEventListener("run", (e) => {
        const r = JSON.parse(e.data);
        const sig = [r.status, r.current_step || "", r.finished_at || ""].join("|");
        if (sig !== shown("#run-page", "sig")) soon();
      });
      source.addEventListener("step", (e) => {
        const st = JSON.parse(e.data);
        const el = document.querySelector('tr.step[data-step="' + CSS.escape(st.id) + '"]');
        if (!el || el.dataset.sig !== st.status + ":" + st.attempts) soon();
      });
      source.addEventListener("log", (e) => {
        const id = Number(e.lastEventId || 0);
        if (id > newest) newest = id;
        if (id > Number(shown("#run-page", "lastLog") || 0)) soon();
      });
      source.addEventListener("end", () => {
        ended = true; clearTimeout(rotate); source.close(); status("", "closed"); soon();
      });
      source.onopen = () => status("live", "open");
      source.onerror = () => status("reconnecting…", "error");
    };
    open();
  }
  window.durableYaml = { refreshPage, refreshTimes, selection };
  document.addEventListener("DOMContentLoaded", () => {
    selection();
    const b = document.body.dataset;
    if (b.runStream) listenRun(b.runStream);
    else if (b.stream) listenRows(b.stream);
  });
})();
