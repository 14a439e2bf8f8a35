"""The hot-lead board: one HTML page with inline JS, served by the alerts service at ``GET /board``.

No build step. The page asks for a ``sales`` token (kept in sessionStorage), reads ``/v1/alerts/stream`` with
``fetch()`` streaming so the token travels in the ``Authorization`` header (never in a URL), parses the SSE
frames itself, and resumes with ``Last-Event-ID`` after a disconnect or a silent stall (no heartbeat).
Untrusted text is only ever set with ``textContent``.
"""

BOARD_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>leadledger · hot leads</title>
<style>
  :root { --bg:#f6f7f9; --card:#fff; --ink:#1d2330; --mute:#667085; --red:#d92d20; --green:#079455; --amber:#dc6803; }
  * { box-sizing: border-box; }
  body { margin:0; font:14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; background:var(--bg); color:var(--ink); }
  header { display:flex; gap:12px; align-items:center; padding:10px 16px; background:#101828; color:#fff; flex-wrap:wrap; }
  header h1 { font-size:16px; margin:0 12px 0 0; }
  header label { font-size:12px; color:#d0d5dd; }
  header input, header select { font:inherit; padding:3px 6px; border-radius:4px; border:1px solid #475467; }
  header input[type=number] { width:70px; }
  #status { margin-left:auto; font-size:12px; padding:2px 8px; border-radius:10px; background:#475467; }
  #status.live { background:var(--green); }
  #status.down { background:var(--red); }
  button { font:inherit; padding:4px 10px; border-radius:4px; border:0; background:#2e90fa; color:#fff; cursor:pointer; }
  #login { max-width:420px; margin:80px auto; background:var(--card); padding:24px; border-radius:8px;
           box-shadow:0 1px 3px rgba(0,0,0,.1); }
  #login input { width:100%; padding:8px; margin:8px 0 12px; font:inherit; }
  #login .error { color:var(--red); min-height:1.4em; }
  #alerts { list-style:none; margin:0; padding:12px 16px; display:grid; gap:10px; }
  .alert { background:var(--card); border-radius:8px; padding:10px 14px; box-shadow:0 1px 2px rgba(0,0,0,.08);
           display:grid; grid-template-columns: 1fr auto; gap:4px 16px; border-left:5px solid #2e90fa; }
  .alert.kind-intent { border-left-color:var(--amber); }
  .alert.kind-sla_breached, .alert.breached { border-left-color:var(--red); }
  .who { font-weight:600; font-size:15px; }
  .company, .meta, .since { color:var(--mute); font-size:12px; }
  .badge { display:inline-block; font-size:11px; padding:1px 6px; border-radius:8px; background:#eaecf0; margin-right:6px; }
  .why { margin:2px 0 0; padding:0; list-style:none; font-size:13px; }
  .why li::before { content:"▸ "; color:var(--mute); }
  .side { text-align:right; }
  .score { font-size:20px; font-weight:700; }
  .score small { font-size:12px; color:var(--mute); font-weight:400; }
  .sla { display:inline-block; margin-top:4px; padding:2px 8px; border-radius:10px; font-variant-numeric:tabular-nums;
         background:#ecfdf3; color:var(--green); font-weight:600; }
  .sla.overdue, .sla.breached { background:#fef3f2; color:var(--red); }
  .sla.met { background:#ecfdf3; color:var(--green); }
  .empty { color:var(--mute); padding:24px 16px; }
  a.history { font-size:12px; }
</style>
</head>
<body>
<header>
  <h1>Hot leads</h1>
  <label>kinds <select id="f-kind">
    <option value="">all</option><option value="handoff">hand-offs</option><option value="intent">intent</option>
    <option value="handoff,sla_breached,sla_met">hand-offs + SLA</option></select></label>
  <label>owner <input id="f-owner" size="12" placeholder="any"></label>
  <label>min score <input id="f-score" type="number" step="1" placeholder="0"></label>
  <button id="apply" type="button">Apply</button>
  <span id="status">offline</span>
  <button id="logout" type="button" hidden>Sign out</button>
</header>
<form id="login" hidden>
  <h2>Sign in</h2>
  <p>Paste your inside-sales token.</p>
  <input id="token" type="password" autocomplete="off" placeholder="sales token" aria-label="token">
  <div class="error" id="login-error"></div>
  <button id="signin" type="submit">Sign in</button>
</form>
<main id="board" hidden>
  <ul id="alerts"></ul>
  <div id="empty" class="empty">Waiting for hot leads…</div>
</main>
<script>
(() => {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const MAX_CARDS = 200, BACKLOG = 50, STALL_MS = 45000;
  let token = sessionStorage.getItem("leadledger.token");
  let lastId = null, ctrl = null, gen = 0;
  const seen = new Set();

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function dur(ms) {
    const s = Math.max(0, Math.floor(ms / 1000)), h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    if (h >= 48) return Math.floor(h / 24) + "d " + (h % 24) + "h";
    if (h) return h + "h " + String(m).padStart(2, "0") + "m";
    return m + "m " + String(r).padStart(2, "0") + "s";
  }
  function setStatus(text, cls) { const s = $("status"); s.textContent = text; s.className = cls || ""; }

  function filters() {
    const q = new URLSearchParams();
    const k = $("f-kind").value; if (k) q.set("kind", k);
    const o = $("f-owner").value.trim(); if (o) q.set("owner", o);
    const m = $("f-score").value.trim(); if (m) q.set("min_score", m);
    return q;
  }

  function card(a, id) {
    const li = el("li", "alert kind-" + a.kind);
    li.dataset.alertId = a.alert_id; li.dataset.lead = a.lead; li.dataset.eventId = id;
    const attrs = a.attributes || {};
    const main = el("div");
    const top = el("div");
    top.append(el("span", "badge kind", {handoff: "hand-off", intent: "intent", sla_breached: "SLA breached",
                                         sla_met: "SLA met"}[a.kind] || a.kind));
    top.append(el("span", "who", attrs.name || attrs.email || a.lead));
    main.append(top);
    main.append(el("div", "company", [attrs.company, attrs.title, attrs.department].filter(Boolean).join(" · ")));
    const why = el("ul", "why");
    for (const r of (a.reasons || []).slice(0, 3)) {
      let t = r.rule || "";
      if (r.axis === "engagement") t += " (+" + r.value + ", " + r.events + "×)";
      else if (r.axis === "fit") t += " (+" + r.points + " fit)";
      else if (r.axis === "intent") t = "intent: " + r.rule;
      why.append(el("li", "reason", t));
    }
    main.append(why);
    const meta = el("div", "meta");
    const stage = a.stage || {};
    meta.append(el("span", "stage", (stage.from || "?") + " → " + (stage.to || "?")));
    meta.append(document.createTextNode(" · rules "));
    meta.append(el("span", "rules", a.rules_version || "—"));
    if (a.owner) { meta.append(document.createTextNode(" · owner ")); meta.append(el("span", "owner", a.owner)); }
    meta.append(document.createTextNode(" · "));
    const link = el("a", "history", "history");
    if (a.links && a.links.history) { link.href = a.links.history; link.target = "_blank"; link.rel = "noopener"; }
    meta.append(link);
    main.append(meta);
    const side = el("div", "side");
    const sc = a.score || {};
    const score = el("div", "score", sc.after === null || sc.after === undefined ? "—" : Math.round(sc.after));
    if (sc.before !== null && sc.before !== undefined && sc.before !== sc.after)
      score.append(el("small", "before", " from " + Math.round(sc.before)));
    side.append(score);
    const since = el("div", "since"); since.dataset.at = a.at; side.append(since);
    if (a.kind === "handoff" || a.kind === "sla_breached") {
      const sla = el("span", "sla");
      const s = a.sla || {};
      li.dataset.handoffId = a.kind === "handoff" ? a.alert_id : (s.handoff_id || "");
      sla.dataset.due = s.due_at || "";
      if (a.kind === "sla_breached") sla.classList.add("breached");
      side.append(sla);
    }
    li.append(main, side);
    tick(li);
    return li;
  }

  function tick(li) {
    const now = Date.now();
    const since = li.querySelector(".since");
    if (since && since.dataset.at) since.textContent = (li.classList.contains("kind-intent") ? "" : "handed off ")
      + dur(now - Date.parse(since.dataset.at)) + " ago";
    const sla = li.querySelector(".sla");
    if (!sla || !sla.dataset.due) return;
    if (sla.classList.contains("met")) return;
    const left = Date.parse(sla.dataset.due) - now;
    if (left < 0) sla.classList.add("overdue");
    if (left < 0) sla.textContent = "SLA overdue " + dur(-left);
    else sla.textContent = sla.classList.contains("breached") ? "SLA breached" : "SLA " + dur(left);
  }

  function onAlert(id, a) {
    if (seen.has(a.alert_id)) return;
    seen.add(a.alert_id);
    const list = $("alerts");
    if (a.kind === "sla_breached" || a.kind === "sla_met") {
      const hid = (a.sla || {}).handoff_id;
      const target = hid && list.querySelector('li[data-handoff-id="' + CSS.escape(hid) + '"]');
      if (target) {
        const sla = target.querySelector(".sla");
        if (a.kind === "sla_met") {
          sla.classList.remove("overdue"); sla.classList.add("met");
          sla.textContent = "touched after " + dur((a.sla.time_to_first_touch_s || 0) * 1000);
        } else {
          sla.classList.add("breached");
          target.classList.add("breached");
          tick(target);
        }
        return;
      }
      if (a.kind === "sla_met") return;
    }
    list.prepend(card(a, id));
    while (list.children.length > MAX_CARDS) list.lastElementChild.remove();
    $("empty").hidden = true;
  }

  function handleBlock(block) {
    let id = null, event = "message", data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const i = line.indexOf(":");
      const f = i < 0 ? line : line.slice(0, i);
      let v = i < 0 ? "" : line.slice(i + 1);
      if (v.startsWith(" ")) v = v.slice(1);
      if (f === "id") id = v; else if (f === "event") event = v; else if (f === "data") data.push(v);
    }
    if (id !== null) lastId = id;
    if (!data.length) return;
    try { onAlert(id, JSON.parse(data.join("\n"))); } catch (e) { console.error("bad alert", e); }
  }

  async function run(myGen) {
    while (myGen === gen && token) {
      ctrl = new AbortController();
      let stall = null;
      const arm = () => { clearTimeout(stall); stall = setTimeout(() => ctrl.abort(), STALL_MS); };
      try {
        const q = filters();
        const headers = {"Authorization": "Bearer " + token, "Accept": "text/event-stream"};
        if (lastId !== null) headers["Last-Event-ID"] = lastId; else q.set("backlog", String(BACKLOG));
        arm();
        const res = await fetch("/v1/alerts/stream?" + q.toString(), {headers, cache: "no-store", signal: ctrl.signal});
        if (res.status === 401 || res.status === 403) { clearTimeout(stall); signOut("token rejected"); return; }
        if (!res.ok) throw new Error("HTTP " + res.status);
        setStatus("live", "live");
        const reader = res.body.getReader(), dec = new TextDecoder();
        let buf = "";
        for (;;) {
          const {value, done} = await reader.read();
          if (done) break;
          arm();
          buf += dec.decode(value, {stream: true}).replace(/\r\n?/g, "\n");
          let i;
          while ((i = buf.indexOf("\n\n")) >= 0) { handleBlock(buf.slice(0, i)); buf = buf.slice(i + 2); }
        }
      } catch (e) { /* network error, abort on stall: reconnect below */ }
      clearTimeout(stall);
      if (myGen !== gen) return;
      setStatus("reconnecting…", "down");
      await new Promise((r) => setTimeout(r, 2000));
    }
  }

  function start() {
    $("login").hidden = true; $("board").hidden = false; $("logout").hidden = false;
    gen += 1; if (ctrl) ctrl.abort();
    run(gen);
  }
  function signOut(msg) {
    gen += 1; if (ctrl) ctrl.abort();
    token = null; sessionStorage.removeItem("leadledger.token");
    $("board").hidden = true; $("logout").hidden = true; $("login").hidden = false;
    $("login-error").textContent = msg || ""; setStatus("offline");
  }
  $("login").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const t = $("token").value.trim();
    if (!t) return;
    const res = await fetch("/v1/alerts?limit=1", {headers: {"Authorization": "Bearer " + t}});
    if (!res.ok) { $("login-error").textContent = res.status === 403 ? "this token may not read alerts"
                                                                   : "unknown token"; return; }
    token = t; sessionStorage.setItem("leadledger.token", t); $("token").value = "";
    start();
  });
  $("logout").addEventListener("click", () => signOut(""));
  $("apply").addEventListener("click", () => {
    lastId = null; seen.clear(); $("alerts").replaceChildren(); $("empty").hidden = false;
    if (token) start();
  });
  setInterval(() => { for (const li of $("alerts").children) tick(li); }, 1000);
  if (token) start(); else signOut("");
})();
</script>
</body>
</html>
"""
