// probe-cascade's viewer: one script for the live page (`serve`'s GET /) and for recorded
// reports (`run --html`, Python `to_html`). With embedded data it shows that; without, it
// reads the server: GET /v1/pack, GET /v1/sessions, and GET /v1/sessions/{id}/events
// (server-sent events, read with fetch so that a bearer token can go in a header).
"use strict";
(() => {
  const MAX_TOKENS = 4000;   // tokens kept per session in the page: memory stays bounded
  const SPARK_WINDOW = 300;  // tokens a sparkline spans
  const SPARK_TOP = 6;       // top concepts given a sparkline
  const $ = (s) => document.querySelector(s);
  const el = (tag, attrs = {}, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") e.className = v; else if (k.startsWith("data-")) e.setAttribute(k, v); else e[k] = v;
    }
    for (const c of kids) e.append(c);
    return e;
  };
  const recorded = JSON.parse($("#pc-data").textContent);
  const state = { pack: null, packWatched: [], colour: { mode: "top", concept: null }, session: null, events: [], token: sessionStorage.getItem("pc-token") || "", watched: new Set(), abort: null, drawQueued: false };

  // -- colours: a concept's hue is a hash of its name, so it is the same in every view ------
  const hue = (name) => { let h = 2166136261; for (const c of name) { h ^= c.codePointAt(0); h = Math.imul(h, 16777619); } return (h >>> 0) % 360; };
  const colour = (name, a) => `hsla(${hue(name)}, 70%, 50%, ${a})`;
  const fmt = (x, n = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(n));

  function setPack(pack) {
    state.pack = pack;
    state.packWatched = (pack && pack.watched) || [];
    for (const name of state.packWatched) state.watched.add(name);
    const names = $("#pc-names");
    names.replaceChildren();
    const seen = new Set();
    for (const c of (pack && pack.hierarchy) || []) {
      if (!seen.has(c.name)) names.append(el("option", { value: c.name }));
      seen.add(c.name);
    }
  }
  // Root-first path of a concept through first parents: every event's entry carries it.
  const path = (d) => d.path || [d.name];

  // The path under the concept's name: its ancestors, the nearest three (all of them on hover).
  function pathNode(d) {
    const up = path(d).slice(0, -1);
    const shown = up.length > 3 ? ["…", ...up.slice(-3)] : up;
    return el("div", { class: "path", title: up.join(" › ") }, shown.length ? shown.join(" › ") + " ›" : "root");
  }

  // -- the token stream ----------------------------------------------------------------------
  // How tokens are coloured: by their strongest concept ("top"), by that concept's root in
  // the hierarchy ("area"), or shaded by one chosen concept's score ("concept").
  function tint(e) {
    const top = e.top[0];
    if (state.colour.mode === "concept") {
      const d = e.top.find((x) => x.name === state.colour.concept);
      return d ? colour(d.name, 0.08 + 0.7 * Math.min(1, d.prob)) : "transparent";
    }
    if (!top) return "transparent";
    if (state.colour.mode === "area") return colour(path(top)[0], 0.45);
    return colour(top.name, 0.12 + 0.55 * Math.min(1, top.prob));
  }
  function tokenNode(e) {
    const top = e.top[0];
    const text = e.text !== null && e.text !== undefined && e.text !== "" ? e.text : `·${e.token}`;
    const span = el("span", { class: "tok" + (e.alerts.length ? " alert" : ""), "data-token": String(e.token), "data-top": top ? top.name : "" }, text);
    span.style.background = tint(e);
    if (top) span.title = `token ${e.token}: ${top.name} ${fmt(top.prob)}` + (e.alerts.length ? ` · ${e.alerts.length} alert(s)` : "");
    span.addEventListener("click", () => select(e, span));
    return span;
  }
  function setColour(mode, concept) {
    state.colour = { mode, concept: concept || null };
    $("#pc-tokens").dataset.mode = mode;
    document.querySelectorAll("#pc-modes button").forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.mode === mode)));
    $("#pc-shaded").textContent = mode === "concept" ? `shaded by ${concept}` : "";
    const spans = $("#pc-tokens").children;
    state.events.forEach((e, i) => { spans[i].style.background = tint(e); });
  }
  document.querySelectorAll("#pc-modes button").forEach((b) => b.addEventListener("click", () => {
    if (b.dataset.mode !== "concept") setColour(b.dataset.mode);
    else if (state.colour.concept) setColour("concept", state.colour.concept);
  }));
  function add(e) {
    state.events.push(e);
    const box = $("#pc-tokens");
    const stick = box.parentElement.scrollTop + box.parentElement.clientHeight >= box.parentElement.scrollHeight - 30;
    box.append(tokenNode(e));
    if (state.events.length > MAX_TOKENS) { state.events.shift(); box.firstChild.remove(); }
    for (const a of e.alerts) state.watched.add(a.watched);
    $("#pc-count").textContent = `${state.events.length} shown · last ${e.token}`;
    if (stick) box.parentElement.scrollTop = box.parentElement.scrollHeight;
    queueDraw();
  }
  function select(e, span) {
    document.querySelectorAll(".tok.sel").forEach((s) => s.classList.remove("sel"));
    if (span) span.classList.add("sel");
    const rows = e.top.map((d) => el("tr", { class: "concept", "data-name": d.name, title: "click: shade the tokens by this concept", onclick: () => setColour("concept", d.name) },
      el("td", {}, el("span", { class: "sw", style: `background:${colour(d.name, 0.9)}` }), d.name, pathNode(d)),
      el("td", {}, fmt(d.prob), el("div", {}, el("span", { class: "bar", style: `width:${Math.round(60 * Math.min(1, d.prob))}px;color:${colour(d.name, 0.9)}` }))),
      el("td", {}, fmt(d.logit, 2)),
      el("td", { class: "layers" }, (d.probes || []).map((p) => `L${p.model_layer} ${fmt(p.calibrated ?? p.prob)}`).join(" · "))));
    const parts = [el("h2", {}, `token ${e.token}`),
      el("p", {}, e.text ? `“${e.text}” · ` : "", `${fmt(e.ms, 2)} ms · ${e.scored} scored · ${e.active} active`),
      el("table", {}, el("tr", {}, el("th", {}, "concept"), el("th", {}, "score"), el("th", {}, "logit"), el("th", {}, "model layers")), ...rows)];
    if (e.alerts.length) parts.push(el("h2", {}, "alerts"), el("ul", { class: "alerts" }, ...e.alerts.map((a) => el("li", { "data-concept": a.concept }, `${a.profile}: ${a.concept} (under ${a.watched}) ${fmt(a.score)}`))));
    if (e.simplex && e.simplex.length) parts.push(el("h2", {}, "simplexes"), el("table", {}, ...e.simplex.map((s) => el("tr", {}, el("td", {}, `${s.simplex} · ${s.pole}`), el("td", {}, fmt(s.prob)), el("td", {}, s.deviation === null ? "" : `${s.deviation >= 0 ? "+" : ""}${fmt(s.deviation, 1)}σ`)))));
    $("#pc-detail").replaceChildren(...parts);
  }

  // -- sparklines ------------------------------------------------------------------------------
  function queueDraw() {
    if (state.drawQueued) return;
    state.drawQueued = true;
    requestAnimationFrame(() => { state.drawQueued = false; drawSparks(); });
  }
  function drawSparks() {
    const win = state.events.slice(-SPARK_WINDOW);
    const sums = new Map();
    for (const e of win) for (const d of e.top) sums.set(d.name, (sums.get(d.name) || 0) + d.prob);
    const top = [...sums.entries()].sort((a, b) => b[1] - a[1]).slice(0, SPARK_TOP).map(([n]) => n);
    const names = [...state.watched].concat(top.filter((n) => !state.watched.has(n)));
    const lines = names.map((name) => {
      const ys = win.map((e) => { const d = e.top.find((x) => x.name === name); return d ? d.prob : 0; });
      const w = 200, h = 26, n = Math.max(1, win.length - 1);
      const pts = ys.map((y, i) => `${(i * w / n).toFixed(1)},${(h - 1 - y * (h - 2)).toFixed(1)}`).join(" ");
      const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
      svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
      svg.setAttribute("preserveAspectRatio", "none");
      const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
      line.setAttribute("points", pts);
      line.setAttribute("fill", "none");
      line.setAttribute("stroke", colour(name, 1));
      line.setAttribute("stroke-width", "1.2");
      svg.append(line);
      win.forEach((e, i) => {
        if (!e.alerts.some((a) => a.concept === name || a.watched === name)) return;
        const dot = document.createElementNS("http://www.w3.org/2000/svg", "circle");
        dot.setAttribute("cx", (i * w / n).toFixed(1)); dot.setAttribute("cy", "3"); dot.setAttribute("r", "1.6"); dot.setAttribute("fill", "#d0021b");
        svg.append(dot);
      });
      return el("div", { class: "spark" + (state.watched.has(name) ? " watched" : ""), "data-name": name, title: "click: shade the tokens by this concept", onclick: () => setColour("concept", name) }, el("span", { title: name }, name), svg, el("span", {}, fmt(ys[ys.length - 1] || 0, 2)));
    });
    $("#pc-lines").replaceChildren(...lines);
  }
  $("#pc-watch").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const name = $("#pc-watch-name").value.trim();
    if (name) { state.watched.add(name); $("#pc-watch-name").value = ""; queueDraw(); }
  });

  // -- sessions ----------------------------------------------------------------------------------
  function listSessions(sessions, live) {
    const ul = $("#pc-sessions ul");
    ul.replaceChildren(...sessions.map((s) => {
      const li = el("li", { class: s.id === state.session ? "on" : "", "data-id": String(s.id) }, s.label || `session ${s.id}`,
        el("small", {}, live ? `#${s.id} · ${s.tokens} tokens · ${s.mode}` : `${s.events.length} tokens`));
      li.addEventListener("click", () => { location.hash = `session=${s.id}`; });
      return li;
    }));
    if (!sessions.length) ul.append(el("li", { class: "hint" }, "no open sessions"));
  }
  function reset(id) {
    state.session = id;
    state.events = [];
    state.watched = new Set(state.packWatched);
    $("#pc-tokens").replaceChildren();
    $("#pc-detail").replaceChildren(el("h2", {}, "token"), el("p", { class: "hint" }, "click a token"));
    document.querySelectorAll("#pc-sessions li").forEach((li) => li.classList.toggle("on", li.dataset.id === String(id)));
    queueDraw();
  }
  const hashSession = () => { const m = /session=(\d+)/.exec(location.hash); return m ? Number(m[1]) : null; };
  const status = (s) => { $("#pc-status").textContent = s; };

  // -- recorded ------------------------------------------------------------------------------------
  if (recorded) {
    setPack(recorded.pack);
    const show = () => {
      const id = hashSession() ?? (recorded.sessions[0] && recorded.sessions[0].id);
      const s = recorded.sessions.find((x) => x.id === id) || recorded.sessions[0];
      listSessions(recorded.sessions, false);
      if (!s) { status("no tokens"); return; }
      reset(s.id);
      s.events.forEach(add);
      const first = recorded.sessions.length && s.events.find((e) => e.alerts.length) || s.events[0];
      if (first) select(first, document.querySelector(`.tok[data-token="${first.token}"]`));
      status(`recorded · ${s.events.length} tokens`);
    };
    window.addEventListener("hashchange", show);
    show();
    return;
  }

  // -- live ------------------------------------------------------------------------------------------
  const headers = () => (state.token ? { authorization: `Bearer ${state.token}` } : {});
  async function get(url) {
    const r = await fetch(url, { headers: headers() });
    if (r.status === 401) { $("#pc-auth").hidden = false; throw new Error("this server needs a bearer token"); }
    if (!r.ok) throw new Error(`${url}: ${r.status}`);
    return r;
  }
  $("#pc-auth").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.token = $("#pc-token").value;
    sessionStorage.setItem("pc-token", state.token);
    $("#pc-auth").hidden = true;
    start();
  });
  async function follow(id) {
    if (state.abort) state.abort.abort();
    const abort = new AbortController();
    state.abort = abort;
    reset(id);
    let last = null;
    while (!abort.signal.aborted && state.session === id) {
      try {
        const url = `/v1/sessions/${id}/events` + (last === null ? "" : `?after=${last}`);
        const r = await fetch(url, { headers: headers(), signal: abort.signal });
        if (r.status === 404) { status(`session ${id} has closed`); return; }
        if (!r.ok) throw new Error(`events: ${r.status}`);
        status(`live · session ${id}`);
        const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value;
          let end;
          while ((end = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, end);
            buf = buf.slice(end + 2);
            let data = null, eid = null;
            for (const line of block.split("\n")) {
              if (line.startsWith("data:")) data = (data === null ? "" : data + "\n") + line.slice(5).trimStart();
              else if (line.startsWith("id:")) eid = Number(line.slice(3).trim());
            }
            if (data === null) continue;
            if (eid !== null) last = eid;
            add(JSON.parse(data));
          }
        }
        status(`session ${id}: stream ended, reconnecting`);
      } catch (err) {
        if (abort.signal.aborted) return;
        status(`session ${id}: ${err.message}; reconnecting`);
      }
      await new Promise((res) => setTimeout(res, 1000));
    }
  }
  async function poll() {
    try {
      const sessions = await (await get("/v1/sessions")).json();
      listSessions(sessions, true);
      const want = hashSession() ?? (sessions[0] && sessions[0].id);
      if (want !== null && want !== undefined && want !== state.session && sessions.some((s) => s.id === want)) follow(want);
    } catch (err) {
      status(err.message);
    }
  }
  async function start() {
    try { setPack(await (await get("/v1/pack")).json()); } catch (err) { status(err.message); return; }
    poll();
  }
  window.addEventListener("hashchange", () => { const id = hashSession(); if (id !== null && id !== state.session) follow(id); });
  setInterval(() => { if ($("#pc-auth").hidden) poll(); }, 2000);
  start();
})();
