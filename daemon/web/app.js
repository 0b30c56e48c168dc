// The live page: health, collections, the selected collection's plots and grid heat map, the latest results.
// Read-only.  State comes from GET /status and /api/v1/collections, then live from GET /events (Server-Sent
// Events: the messages PUB sends, id = seq), which resumes after the last seq seen when it reconnects.
// Events only change the state and mark what changed; a throttled render draws at most every RENDER_MS, so a
// 10,000-frame collection costs one plot update per render, not one per frame.
"use strict";
(function () {
  const RENDER_MS = 250;
  const STATUS_MS = 5000;
  const LATEST_ROWS = 25;
  // The heat map's colour ramp: the same stops as the PNG (spotfinder_daemon.collections._STOPS).
  const STOPS = [[0.0, [68, 1, 84]], [0.25, [59, 82, 139]], [0.5, [33, 145, 140]], [0.75, [94, 201, 98]],
    [1.0, [253, 231, 37]]];

  const $ = (id) => document.getElementById(id);
  const state = {
    collections: new Map(), // id -> the collection's summary (as in GET /api/v1/collections)
    keyToId: new Map(), // the messages' "collection" (template or master) -> id
    selected: null, // id
    follow: true, // select each new collection until the user picks one
    frames: null, // the selected collection's per-frame arrays, sorted by image number
    grid: null, // {rows, cols, first, cells: [div by acquisition index]}
    latest: [],
    lastSeq: 0, // the newest seq taken: where a reconnection resumes (EventSource sends it as Last-Event-ID)
    stored: 0, // stored messages taken from the event stream (the tests check none is missed or taken twice)
    dirty: new Set(),
  };
  let plot = null;
  let renderPending = false;
  let lastRender = 0;
  let renders = 0; // how many times the page drew (the tests check that events are batched)

  // ----- small helpers ---------------------------------------------------------------------------------
  function fmt(value, digits) {
    if (value === null || value === undefined) return "–";
    return digits === undefined ? String(value) : Number(value).toFixed(digits);
  }

  function colour(fraction) {
    const f = Math.min(1, Math.max(0, fraction));
    for (let i = 1; i < STOPS.length; i++) {
      const [f1, c1] = STOPS[i];
      if (f <= f1) {
        const [f0, c0] = STOPS[i - 1];
        const t = (f - f0) / (f1 - f0);
        const c = c0.map((a, k) => Math.round(a + (c1[k] - a) * t));
        return "rgb(" + c.join(",") + ")";
      }
    }
    return "rgb(" + STOPS[STOPS.length - 1][1].join(",") + ")";
  }

  async function getJSON(url) {
    const reply = await fetch(url, {cache: "no-store"});
    if (!reply.ok) throw new Error(url + ": HTTP " + reply.status);
    return reply.json();
  }

  function schedule(what) {
    state.dirty.add(what);
    if (renderPending) return;
    renderPending = true;
    const wait = Math.max(0, RENDER_MS - (performance.now() - lastRender));
    setTimeout(() => requestAnimationFrame(render), wait);
  }

  // ----- per-frame arrays, kept sorted by image number -------------------------------------------------
  function emptyFrames() {
    return {x: [], spots: [], bragg: [], res: [], status: []};
  }

  // The first position in the sorted image numbers x whose number is not below n.
  function lowerBound(x, n) {
    let lo = 0, hi = x.length;
    while (lo < hi) { const mid = (lo + hi) >> 1; if (x[mid] < n) lo = mid + 1; else hi = mid; }
    return lo;
  }

  function putFrame(frames, n, spots, bragg, res, status) {
    const x = frames.x;
    const i = x.length && x[x.length - 1] >= n ? lowerBound(x, n) : x.length; // out of order or again: search
    if (x[i] === n) {
      frames.spots[i] = spots; frames.bragg[i] = bragg; frames.res[i] = res; frames.status[i] = status;
    } else {
      x.splice(i, 0, n); frames.spots.splice(i, 0, spots); frames.bragg.splice(i, 0, bragg);
      frames.res.splice(i, 0, res); frames.status.splice(i, 0, status);
    }
  }

  function resolutionOf(result) {
    return result.method2_resolution !== null && result.method2_resolution !== undefined
      ? result.method2_resolution : result.method1_resolution;
  }

  // ----- state changes (from REST and events) ----------------------------------------------------------
  function takeSummary(summary) {
    const key = summary.template || summary.master;
    state.keyToId.set(key, summary.id);
    const known = state.collections.has(summary.id);
    state.collections.set(summary.id, Object.assign(state.collections.get(summary.id) || {}, summary));
    schedule("list");
    if (summary.id === state.selected) {
      schedule("facts");
      if (state.grid) schedule("heatmap"); // the best frame may have moved
      if (summary.grid && !state.grid) loadDetail(summary.id);
    } else if (!known && state.follow && summary.state === "open") {
      select(summary.id, false);
    }
  }

  function takeResult(result) {
    state.latest.unshift(result);
    if (state.latest.length > LATEST_ROWS) state.latest.length = LATEST_ROWS;
    schedule("latest");
    const id = state.keyToId.get(result.collection);
    if (id === undefined) { refreshList(); return; }
    if (id !== state.selected || !state.frames) return;
    const n = result.image_number === null ? 1 : result.image_number;
    const status = result.status === "ok" ? "ok" : "error";
    putFrame(state.frames, n, result.spot_total, result.good_bragg_candidates, resolutionOf(result), status);
    schedule("plot");
    if (state.grid) { state.grid.fresh.add(n); schedule("heatmap"); }
  }

  function take(message) {
    if (message.seq) { state.lastSeq = Math.max(state.lastSeq, message.seq); state.stored += 1; }
    if (message.type === "heartbeat") showHealth(message);
    else if (message.type === "result") takeResult(message);
    else if (message.type === "collection") takeSummary(message);
    else if (message.type === "error") showError(message);
  }

  function showError(message) {
    const el = $("last-error");
    el.hidden = false;
    el.textContent = "last service error (" + message.time + "): " + message.error;
  }

  let listTimer = null;
  function refreshList() { // a result of a collection this page has not heard of: ask once, a little later
    if (listTimer) return;
    listTimer = setTimeout(async () => {
      listTimer = null;
      try {
        (await getJSON("/api/v1/collections")).collections.forEach(takeSummary);
      } catch (err) { console.warn(err); }
    }, 500);
  }

  async function loadDetail(id) {
    const detail = await getJSON("/api/v1/collections/" + encodeURIComponent(id));
    if (id !== state.selected) return;
    const frames = emptyFrames();
    const f = detail.frames;
    for (let i = 0; i < f.image_number.length; i++) {
      putFrame(frames, f.image_number[i], f.spot_total[i], f.good_bragg_candidates[i], f.resolution[i], f.status[i]);
    }
    // events that arrived while loading are already in state.frames: keep them (they are newer)
    if (state.frames) {
      const old = state.frames;
      for (let i = 0; i < old.x.length; i++) putFrame(frames, old.x[i], old.spots[i], old.bragg[i], old.res[i], old.status[i]);
    }
    state.frames = frames;
    takeSummary(detail);
    buildHeatmap(detail);
    buildPlot();
    schedule("plot");
  }

  function select(id, byUser) {
    if (byUser) state.follow = false;
    if (state.selected === id) return;
    state.selected = id;
    state.frames = emptyFrames();
    state.grid = null;
    history.replaceState(null, "", "#c=" + id);
    schedule("list"); schedule("facts");
    loadDetail(id).catch((err) => console.warn(err));
  }

  // ----- drawing ---------------------------------------------------------------------------------------
  function showHealth(s) {
    const el = $("health");
    const healthy = s.healthy;
    el.className = "health " + (healthy ? "ok" : "bad");
    const parts = [healthy ? "healthy" : "unhealthy" + (s.health ? ": " + s.health : ""),
      "workers " + s.workers_alive + "/" + s.workers_configured, "queue " + s.queue_depth,
      fmt(s.frames_per_s, 1) + " frames/s", "done " + s.frames_done, "failed " + s.frames_failed];
    el.textContent = parts.join(" · ");
  }

  function renderList() {
    const body = $("collections").tBodies[0];
    const rows = Array.from(state.collections.values());
    $("no-collections").hidden = rows.length > 0;
    body.replaceChildren(...rows.reverse().map((c) => {
      const tr = document.createElement("tr");
      tr.dataset.id = c.id;
      if (c.id === state.selected) tr.className = "selected";
      const name = (c.template || c.master).split("/").pop();
      const cells = [name, c.state, c.n_done + (c.n_expected ? " / " + c.n_expected : ""),
        c.completeness === null ? "–" : (100 * c.completeness).toFixed(1) + " %", c.best ? c.best.image_number : "–"];
      cells.forEach((text, i) => {
        const td = document.createElement("td");
        td.textContent = text;
        if (i === 0) td.title = c.template || c.master;
        tr.appendChild(td);
      });
      tr.addEventListener("click", () => select(c.id, true));
      return tr;
    }));
  }

  function renderFacts() {
    const c = state.collections.get(state.selected);
    if (!c) return;
    $("detail-title").textContent = c.template || c.master;
    const facts = [
      ["state", c.state + (c.end_reason ? " (" + c.end_reason + ")" : "")],
      ["frames", fmt(c.first_image) + "–" + fmt(c.last_image)],
      ["done", c.n_done + (c.n_expected ? " of " + c.n_expected : "")],
      ["failed", c.n_failed], ["missing", c.n_missing],
      ["best", c.best ? c.best.image_number + " (" + fmt(c.best.good_bragg_candidates) + " good Bragg)" : "–"],
    ];
    if (c.dcid !== null && c.dcid !== undefined) facts.push(["dcid", c.dcid]);
    if (c.best && c.best.cell) facts.push(["best cell", c.best.cell.cell + " (row " + (c.best.cell.row + 1) + ", col " + (c.best.cell.col + 1) + ")"]);
    $("facts").replaceChildren(...facts.map(([k, v]) => {
      const span = document.createElement("span");
      span.dataset.fact = k;
      span.textContent = k + ": " + v;
      return span;
    }));
  }

  function plotSize() {
    return {width: Math.max(300, $("plot").clientWidth || 600), height: 320};
  }

  function buildPlot() {
    if (plot) plot.destroy();
    const opts = Object.assign(plotSize(), {
      scales: {x: {time: false}, count: {auto: true}, res: {auto: true, dir: -1}},
      axes: [
        {label: "image number", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000]},  // whole images
        {scale: "count", label: "spots / good Bragg"},
        {scale: "res", side: 1, label: "resolution (Å, inverted)", grid: {show: false}},
      ],
      series: [
        {label: "image"},
        {label: "spots", scale: "count", stroke: "#1f77b4", width: 1.5, points: {show: false}},
        {label: "good Bragg", scale: "count", stroke: "#d62728", width: 1.5, points: {show: false}},
        {label: "resolution Å", scale: "res", stroke: "#2ca02c", width: 1, points: {show: false},
          value: (u, v) => fmt(v, 2)},
      ],
    });
    $("plot").replaceChildren();
    const f = state.frames;
    plot = new uPlot(opts, [f.x, f.spots, f.bragg, f.res], $("plot"));
  }

  function renderPlot() {
    if (!plot || !state.frames) return;
    const f = state.frames;
    plot.setData([f.x, f.spots, f.bragg, f.res]);
  }

  function buildHeatmap(detail) {
    const panel = $("heatmap-panel");
    const box = $("heatmap");
    if (!detail.heatmap) { panel.hidden = true; box.replaceChildren(); state.grid = null; return; }
    const h = detail.heatmap;
    panel.hidden = false;
    const size = Math.max(6, Math.min(32, Math.floor(900 / Math.max(h.cols, 1))));
    box.style.setProperty("--cell", size + "px");
    box.style.gridTemplateColumns = "repeat(" + h.cols + ", " + size + "px)";
    const cells = new Array(h.rows * h.cols);
    const divs = [];
    for (let r = 0; r < h.rows; r++) {
      for (let c = 0; c < h.cols; c++) {
        const div = document.createElement("div");
        const number = h.cell[r][c];
        div.className = "cell";
        div.dataset.row = r; div.dataset.col = c; div.dataset.cell = number;
        cells[number - 1] = div;
        divs.push(div);
      }
    }
    box.replaceChildren(...divs);
    // fresh: image numbers to colour at the next render; all: every cell (a new scale, a new colouring)
    state.grid = {rows: h.rows, cols: h.cols, first: detail.image_range ? detail.image_range[0] : 1, cells,
      fresh: new Set(), all: true, scale: null, best: null};
    schedule("heatmap");
  }

  function cellText(div) {
    const g = state.grid, n = g.first + Number(div.dataset.cell) - 1;
    const i = indexOf(n);
    const head = "cell " + div.dataset.cell + " (row " + (Number(div.dataset.row) + 1) + ", col " +
      (Number(div.dataset.col) + 1) + "), image " + n;
    if (i < 0) return head + ": no result yet";
    const f = state.frames;
    return head + ": " + fmt(f.spots[i]) + " spots, " + fmt(f.bragg[i]) + " good Bragg, resolution " +
      fmt(f.res[i], 2) + " Å" + (f.status[i] === "ok" ? "" : " (failed)");
  }

  function indexOf(n) {
    const i = lowerBound(state.frames.x, n);
    return state.frames.x[i] === n ? i : -1;
  }

  // Colours the cells whose frames changed, or every cell when the scale (its low or high end) or the best
  // frame moved: a render costs the new results, not the whole grid.
  function renderHeatmap() {
    const g = state.grid, f = state.frames;
    if (!g || !f || (!g.all && !g.fresh.size)) return;
    const by = $("heat-by").value;
    const values = by === "resolution" ? f.res : f.bragg;
    let low = Infinity, high = -Infinity;
    for (let i = 0; i < f.x.length; i++) {
      const v = values[i];
      if (v !== null && v !== undefined && f.x[i] >= g.first && f.x[i] < g.first + g.cells.length) {
        if (v < low) low = v;
        if (v > high) high = v;
      }
    }
    if (by !== "resolution") low = 0;
    const span = (high - low) || 1;
    const best = state.collections.get(state.selected);
    const bestNumber = best && best.best ? best.best.image_number : null;
    const scale = low + "/" + high + "/" + bestNumber;
    const all = g.all || scale !== g.scale;
    const todo = all ? f.x.map((_, i) => i) : Array.from(g.fresh, indexOf).filter((i) => i >= 0);
    g.all = false; g.fresh.clear(); g.scale = scale;
    for (const i of todo) {
      const k = f.x[i] - g.first;
      const div = g.cells[k];
      if (!div) continue;
      const v = values[i];
      div.classList.add("done");
      div.classList.toggle("failed", f.status[i] !== "ok");
      div.classList.toggle("best", f.x[i] === bestNumber);
      div.style.background = v === null || v === undefined ? "" :
        colour(by === "resolution" ? (high - v) / span : (v - low) / span);
    }
  }

  function renderLatest() {
    const body = $("latest").tBodies[0];
    body.replaceChildren(...state.latest.map((r) => {
      const tr = document.createElement("tr");
      [r.image_number, r.spot_total, r.good_bragg_candidates, fmt(resolutionOf(r), 2), r.status, r.file]
        .forEach((text, i) => {
          const td = document.createElement("td");
          td.textContent = fmt(text);
          if (i === 5) td.className = "file";
          tr.appendChild(td);
        });
      return tr;
    }));
  }

  function render() {
    renderPending = false;
    renders += 1;
    lastRender = performance.now();
    const dirty = state.dirty;
    state.dirty = new Set();
    if (dirty.has("list")) renderList();
    if (dirty.has("facts")) renderFacts();
    if (dirty.has("plot")) renderPlot();
    if (dirty.has("heatmap")) renderHeatmap();
    if (dirty.has("latest")) renderLatest();
  }

  // ----- wiring ----------------------------------------------------------------------------------------
  function connect() {
    const source = new EventSource("/events?since=" + state.lastSeq); // reconnections send Last-Event-ID
    source.onopen = () => { $("live").className = "live on"; $("live").textContent = "live"; };
    source.onerror = () => { $("live").className = "live off"; $("live").textContent = "reconnecting…"; };
    source.onmessage = (event) => take(JSON.parse(event.data));
  }

  async function pollStatus() {
    try { showHealth(await getJSON("/status")); } catch (err) { $("health").className = "health bad"; }
  }

  async function start() {
    $("heat-by").addEventListener("change", () => { if (state.grid) { state.grid.all = true; schedule("heatmap"); } });
    const box = $("heatmap");
    const info = (event) => {
      const div = event.target.closest(".cell");
      if (!div || !state.grid) return;
      $("cell-info").textContent = cellText(div);
      if (event.type === "click") {
        box.querySelectorAll(".picked").forEach((el) => el.classList.remove("picked"));
        div.classList.add("picked");
      }
    };
    box.addEventListener("mouseover", info);
    box.addEventListener("click", info);
    window.addEventListener("resize", () => { if (plot) plot.setSize(plotSize()); });
    const status = await getJSON("/status");
    showHealth(status);
    state.lastSeq = status.last_seq; // everything up to here is in what the REST calls below return
    const recent = await getJSON("/results?since=" + Math.max(0, status.last_seq - 200) + "&limit=200");
    recent.results.forEach((m) => {
      if (m.seq > status.last_seq) return;
      if (m.type === "result") state.latest.unshift(m);
      else if (m.type === "error") showError(m);
    });
    state.latest.length = Math.min(state.latest.length, LATEST_ROWS);
    schedule("latest");
    const listing = (await getJSON("/api/v1/collections")).collections;
    const wanted = (location.hash.match(/c=([0-9a-f]+)/) || [])[1];
    state.follow = !wanted;
    listing.forEach((c) => { state.keyToId.set(c.template || c.master, c.id); state.collections.set(c.id, c); });
    schedule("list");
    const pick = wanted && state.collections.has(wanted) ? wanted : (listing.length ? listing[listing.length - 1].id : null);
    if (pick) select(pick, false);
    connect();
    setInterval(pollStatus, STATUS_MS);
  }

  window.spotfinderPage = {state, take, get plot() { return plot; }, get renders() { return renders; }};
  start().catch((err) => { $("health").textContent = "cannot reach the service: " + err.message; });
})();
