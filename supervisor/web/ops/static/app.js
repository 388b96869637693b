/* The ops page: polls /ui/api/* every few seconds, streams /logs/stream, draws charts with uPlot.
   The admin key (when the supervisor has one) lives in sessionStorage only: gone when the tab closes. */
(function () {
  "use strict";
  var KEY_NAME = "llama-supervisor-admin-key";
  var POLL_MS = 2000;
  var LOG_KEEP = 1000;
  var $ = function (id) { return document.getElementById(id); };
  var S = { key: sessionStorage.getItem(KEY_NAME) || "", needKey: false, lastEvent: 0, events: [],
            data: null, sinceT: 0, windowS: 3600, charts: {}, cards: {}, polling: false };

  function esc(s) {
    return String(s == null ? "" : s).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }
  function headers() { return S.key ? { "Authorization": "Bearer " + S.key } : {}; }
  function ago(iso) {
    if (!iso) return "";
    var s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (s < 60) return Math.round(s) + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    if (s < 86400) return (s / 3600).toFixed(1) + " h ago";
    return (s / 86400).toFixed(1) + " d ago";
  }
  function clock(t) { return new Date(t * 1000).toLocaleTimeString([], { hour12: false }); }
  function dur(s) {
    s = Math.round(s || 0);
    if (s < 120) return s + " s";
    if (s < 7200) return Math.round(s / 60) + " min";
    if (s < 172800) return (s / 3600).toFixed(1) + " h";
    return (s / 86400).toFixed(1) + " d";
  }
  function mb(bytes) { return bytes == null ? "–" : (bytes / 1e6).toFixed(1) + " MB"; }

  function toast(text, ok) {
    var el = $("toast");
    el.textContent = text;
    el.className = "toast " + (ok ? "ok" : "bad");
    el.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(function () { el.hidden = true; }, 8000);
  }
  function conn(ok, text) { var el = $("conn"); el.className = "conn " + (ok ? "ok" : "bad"); el.textContent = text; }

  // ---- the admin key ------------------------------------------------------------------------------
  function showKeyState(required, valid) {
    $("key-form").hidden = !required || valid;
    $("key-forget").hidden = !S.key;
    $("key-state").textContent = !required ? "no admin key on this supervisor: actions are open"
      : valid ? "admin key accepted" : (S.key ? "admin key refused" : "admin key needed");
  }
  async function checkKey() {
    var r = await fetch("/ui/api/auth", { headers: headers(), cache: "no-store" });
    var a = await r.json();
    S.needKey = a.required && !a.valid;
    showKeyState(a.required, a.valid);
    $("models").classList.toggle("stale", S.needKey);
    $("stale-note").hidden = !S.needKey || !Object.keys(S.cards).length;
    if (S.needKey) conn(false, "admin key needed");
    return !S.needKey;
  }
  $("key-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    S.key = $("key-input").value.trim();
    $("key-input").value = "";
    sessionStorage.setItem(KEY_NAME, S.key);
    start();
  });
  $("key-forget").addEventListener("click", function () {
    S.key = "";
    sessionStorage.removeItem(KEY_NAME);
    stopLogs();
    checkKey();
  });

  // ---- model cards --------------------------------------------------------------------------------
  var SETTINGS = [["n_gpu_layers", "GPU layers"], ["ctx_size", "context"], ["mmproj_offload", "projector on GPU"],
                  ["cpu_only", "CPU only"], ["placement", "GPUs", gpusText]];

  // Several GPUs: where a model runs (or would), as core/placement.py describes it.
  function gpusText(p) {
    if (!p || !p.gpus || !p.gpus.length) return "llama-server's default";
    return p.gpus.length === 1 ? "GPU " + p.gpus[0]
      : "GPUs " + p.gpus.join("+") + (p.split && p.split.length ? " (" + p.split.join(":") + " layers)" : "");
  }

  function card(name) {
    if (S.cards[name]) return S.cards[name];
    var el = document.createElement("article");
    el.className = "card";
    el.dataset.model = name;
    el.innerHTML = '<div class="card-head"><h3></h3><span class="badge" data-role="state"></span>' +
      '<span class="muted" data-role="since"></span></div><div data-role="body"></div>' +
      '<div class="actions">' +
      '<button type="button" data-act="load" hidden>Load</button>' +
      '<button type="button" data-act="unload" hidden>Unload</button>' +
      '<button type="button" data-act="restart">Restart</button>' +
      '<button type="button" data-act="reset" class="danger">Restart with reset</button>' +
      '<button type="button" data-act="reload">Reload profile</button></div>';
    el.querySelector("h3").textContent = name;
    el.querySelector('[data-act="load"]').setAttribute("aria-label", "Load " + name + " (start its llama-server)");
    el.querySelector('[data-act="unload"]').setAttribute("aria-label",
      "Unload " + name + " once its requests are done (frees its memory)");
    el.querySelector('[data-act="restart"]').setAttribute("aria-label", "Restart llama-server of " + name);
    el.querySelector('[data-act="reset"]').setAttribute("aria-label",
      "Restart " + name + " and forget learned settings (back to the profile's values)");
    el.querySelector('[data-act="reload"]').setAttribute("aria-label", "Reload the profile of " + name);
    el.querySelector(".actions").addEventListener("click", function (ev) {
      var b = ev.target.closest("button");
      if (b) act(name, b.dataset.act);
    });
    $("models").appendChild(el);
    S.cards[name] = el;
    return el;
  }

  function renderModel(m) {
    var el = card(m.profile.name);
    var st = el.querySelector('[data-role="state"]');
    st.textContent = m.state;
    st.className = "badge st-" + m.state;
    st.id = "state-" + m.profile.name;
    el.dataset.state = m.state;
    el.querySelector('[data-role="since"]').textContent = m.since ? "since " + ago(m.since) : "";
    var s = m.settings || {}, prof = s.profile || {}, eff = s.effective;
    var rows = SETTINGS.map(function (k) {
      var adjusted = eff != null && JSON.stringify(prof[k[0]]) !== JSON.stringify(eff[k[0]]);
      var show = k[2] ? function (v) { return esc(k[2](v)); } : esc;
      return '<tr class="' + (adjusted ? "adjusted" : "") + '"><th scope="row">' + k[1] + "</th><td>" +
        show(prof[k[0]]) + "</td><td>" + (eff == null ? '<span class="muted">–</span>' : show(eff[k[0]])) +
        (adjusted ? " ⚠ adjusted" : "") + "</td></tr>";
    }).join("");
    var exits = Object.keys(m.exits_by_cause || {}).map(function (c) {
      return "<span>" + esc(c) + " × " + m.exits_by_cause[c] + "</span>";
    }).join("") || '<span class="muted">none seen</span>';
    var le = m.last_exit, child = m.child || {};
    var html = (m.reason ? '<p class="reason">' + esc(m.reason) + "</p>" : "") +
      '<table class="kv"><thead><tr><th scope="col">setting</th><th scope="col">profile</th>' +
      '<th scope="col">effective</th></tr></thead><tbody>' + rows + "</tbody></table>" +
      (s.adjustment ? '<p class="adj-note"><strong>Adjusted:</strong> ' + esc(s.adjustment) + "</p>" : "") +
      '<dl class="facts">' +
      "<dt>restarts</dt><dd>" + esc(m.restarts) + ' <span class="chips" data-role="exits">' + exits + "</span></dd>" +
      "<dt>last exit</dt><dd data-role=\"last-exit\">" + (le ? esc(le.cause) + " (" +
        esc(le.signal || ("code " + le.code)) + ") " + ago(le.at) + (le.detail ? ": " + esc(le.detail) : "")
        : '<span class="muted">none</span>') + "</dd>" +
      "<dt>load / warmup</dt><dd>" + (m.load_s == null ? "–" : m.load_s.toFixed(2) + " s") + " / " +
        (m.warmup_s == null ? "–" : Number(m.warmup_s).toFixed(2) + " s") + "</dd>" +
      "<dt>llama-server</dt><dd>" + (m.child ? "pid <span data-role=\"pid\">" + esc(child.pid) + "</span>, " +
        mb(child.rss_bytes) + (child.cpu_percent != null ? ", " + child.cpu_percent.toFixed(0) + " % CPU" : "") +
        (child.vram_mib != null ? ", " + child.vram_mib.toFixed(0) + " MiB VRAM" : "") : '<span class="muted">not running</span>') +
        "</dd>" +
      "<dt>requests</dt><dd>" + esc(m.requests.in_flight) + " in flight, " + esc(m.requests.waiting) + " waiting</dd>" +
      (m.quarantine ? '<dt>quarantined</dt><dd data-role="quarantine">' + (m.quarantine.requests.length
        ? m.quarantine.requests.map(function (q) { return esc(q.what) + " (until " + esc(q.until) + ")"; }).join("<br>")
        : '<span class="muted">none</span>') + "</dd>" : "") +
      (m.last_reload_error ? '<dt>reload error</dt><dd class="st-failed">' + esc(JSON.stringify(m.last_reload_error)) + "</dd>" : "") +
      residencyFacts(m.residency) + planFacts(m.plan) + buildFacts(m.builds) +
      "<dt>profile</dt><dd>" + esc(m.profile.file) + "</dd>" +
      "</dl>";
    el.querySelector('[data-role="body"]').innerHTML = html;
    actionsFor(el, m);
  }

  // The llama-server builds (docs/upgrading.md): what runs, the last good one, and a candidate with its fate.
  function buildFacts(b) {
    if (!b) return "";
    function label(x) { return x ? esc(x.version) + " [" + esc(x.id) + "]" : '<span class="muted">–</span>'; }
    var c = b.candidate;
    return '<dt>build</dt><dd data-role="builds">running ' + label(b.running) + ", last good " + label(b.last_good) +
      (c ? '<br><span class="' + (c.state === "rejected" ? "st-failed" : "muted") + '">candidate ' + label(c.build) +
        ": " + esc(c.state) + (c.reasons && c.reasons.length ? " (" + esc(c.reasons.join("; ")) + ")" : "") + "</span>"
        : "") + "</dd>";
  }

  // With several models (profiles_dir) each card also says what the model holds and why it is in or out.
  function mib(v) { return v == null ? "–" : Math.round(v) + " MiB"; }
  function residencyFacts(r) {
    if (!r) return "";
    var mem = r.memory.measured || r.memory.estimate || {};
    var gpuMib = (mem.gpu_mib || []).reduce(function (a, b) { return a + b; }, 0);
    var flags = [r.default ? "default" : "", r.settings.pinned ? "pinned" : "",
                 r.settings.ttl_s ? "unloads after " + dur(r.settings.ttl_s) + " idle" : "",
                 r.settings.preload ? "preloaded" : ""].filter(Boolean);
    var lu = r.last_unload;
    return "<dt>residency</dt><dd data-role=\"residency\">" + esc(r.state) + (flags.length ? " · " + esc(flags.join(", ")) : "") +
      (r.waiting_for ? '<br><span class="muted">waiting: ' + esc(r.waiting_for) + "</span>" : "") +
      (r.draining ? '<br><span class="muted">draining: ' + esc(r.draining) + "</span>" : "") + "</dd>" +
      "<dt>memory</dt><dd>" + mib(mem.host_mib) + " host, " + mib(gpuMib) + " GPU " +
        '<span class="muted">(' + (r.memory.measured ? "measured" : "estimate") + ")</span></dd>" +
      "<dt>loads</dt><dd>" + esc(r.loads) + (r.last_used_s_ago != null ? ", last used " + dur(r.last_used_s_ago) + " ago" : "") +
        (lu ? '<br><span class="muted" data-role="last-unload">last unload: ' + esc(lu.reason) +
          (lu.detail ? " (" + esc(lu.detail) + ")" : "") + "</span>" : "") + "</dd>";
  }
  // An unloaded model: what loading it now would do (GET /plan, the same decision the load takes).
  function planFacts(p) {
    if (!p || p.loaded) return "";
    var mem = p.memory || {}, pl = p.placement;
    var where = pl ? gpusText(pl) + " (" + pl.kind + ")" : "llama-server's default devices";
    var expects = Object.keys(mem.gpu_mib || {}).map(function (k) { return "GPU " + k + " " + mib(mem.gpu_mib[k]); })
      .concat([mib(mem.host_mib) + " host"]);
    return '<dt>would load</dt><dd data-role="plan">' + (p.refused ? '<span class="st-failed">' + esc(p.refused) + "</span>"
      : "on " + esc(where) + ", " + esc(p.layers) + " GPU layers, ctx " + esc(p.ctx_size) +
        (p.unload.length ? "<br>unloading " + esc(p.unload.join(", ")) : "") +
        (p.wait_for.length ? "<br>once " + esc(p.wait_for.join(", ")) + " finish their requests" : "") +
        '<br><span class="muted">expects ' + esc(expects.join(", ")) + " · " + esc(p.why) + "</span>") + "</dd>";
  }
  // Each GPU: its room, and which models hold how much of it.
  function renderGpus(gpus) {
    var el = $("gpus");
    el.hidden = !gpus || !gpus.length;
    el.innerHTML = (gpus || []).map(function (g) {
      var held = Object.keys(g.models || {}).map(function (k) { return esc(k) + " " + mib(g.models[k]); });
      if (g.others_mib > 0) held.push('<span class="muted">others ' + mib(g.others_mib) + "</span>");
      return '<div class="gpu" data-gpu="' + esc(g.index) + '"><strong>GPU ' + esc(g.index) + "</strong> " + esc(g.name) +
        " · " + mib(g.memory_free_mib) + " free of " + mib(g.memory_total_mib) +
        (held.length ? " · " + held.join(", ") : "") + "</div>";
    }).join("");
  }
  function actionsFor(el, m) {
    var r = m.residency, running = !!m.child;
    var btn = function (a) { return el.querySelector('[data-act="' + a + '"]'); };
    btn("load").hidden = btn("unload").hidden = !r;
    if (r) {
      btn("load").disabled = (r.state === "loaded" && !r.draining) || r.state === "loading";  // Load calls off a drain
      btn("unload").disabled = r.state === "unloaded" || r.settings.pinned;
      btn("unload").title = r.settings.pinned ? "pinned: never unloaded" : "";
    }
    btn("restart").disabled = btn("reset").disabled = !!r && !running;
  }

  async function act(model, what) {
    var label = { restart: "Restart llama-server of " + model + "?",
                  reset: "Restart " + model + " with the profile's settings (forget learned and ladder settings)?",
                  reload: Object.keys(S.cards).length > 1 ? "Reload the profiles (every model's file)?"
                    : "Reload the profile of " + model + "?",
                  load: "Load " + model + "?",
                  unload: "Unload " + model + "? Requests in flight finish first; a request for it loads it again." }[what];
    if (!window.confirm(label)) return;
    var q = "model=" + encodeURIComponent(model);
    var url = what === "reload" ? "/admin/reload"
      : what === "load" || what === "unload" ? "/admin/models/" + encodeURIComponent(model) + "/" + what
      : "/admin/restart" + (what === "reset" ? "?reset=1" + (q ? "&" + q : "") : (q ? "?" + q : ""));
    var r;
    try {
      r = await fetch(url, { method: "POST", headers: headers() });
    } catch (e) {
      toast("Could not reach the supervisor: " + e.message, false);
      return;
    }
    var body = {};
    try { body = await r.json(); } catch (e) { /* not JSON: the status says enough */ }
    if (r.status === 401) {
      toast("Refused (401): " + ((body.error && body.error.message) || "admin key required"), false);
      checkKey();
    } else if (r.ok) {
      toast(what === "reload" ? "Reload: " + reloadSummary(body)
        : what === "load" || what === "unload" ? (r.status === 202 ? (what === "load" ? "Load" : "Unload") +
          " requested (" + model + ")" : model + " is already " + body.state)
        : "Restart requested (" + model + ")", true);
      poll();
    } else {
      toast("Failed (" + r.status + "): " + ((body.error && (body.error.message || JSON.stringify(body.error))) || r.statusText), false);
    }
  }

  function reloadSummary(body) {
    var parts = ["added", "removed", "restarted", "updated"].filter(function (k) { return (body[k] || []).length; })
      .map(function (k) { return k + " " + body[k].join(", "); });
    return parts.length ? parts.join("; ") : "nothing changed";
  }

  // ---- timeline -----------------------------------------------------------------------------------
  function renderTimeline() {
    var now = Date.now() / 1000, from = Math.max(now - S.windowS, (S.startedAt || 0) - 5);
    var span = Math.max(30, now - from);
    from = now - span;
    $("strip-from").textContent = clock(from);
    var list = $("timeline");
    var shown = S.events.filter(function (e) { return e.t >= from; });
    var multi = Object.keys(S.cards).length > 1;
    list.innerHTML = shown.slice().reverse().map(function (e) {
      var cls = "kind k-" + e.kind + (e.kind === "reload" && e.ok === false ? " rejected" : "");
      return '<li id="ev-' + e.id + '" data-kind="' + esc(e.kind) + '" data-model="' + esc(e.model) + '"' +
        (e.cause ? ' data-cause="' + esc(e.cause) + '"' : "") + (e.action ? ' data-action="' + esc(e.action) + '"' : "") +
        '><details><summary><time datetime="' + new Date(e.t * 1000).toISOString() + '">' + clock(e.t) + "</time>" +
        '<span class="' + cls + '">' + esc(e.kind) + "</span>" + (multi ? '<span class="muted">' + esc(e.model) + "</span>" : "") +
        "<span>" + esc(e.title) + "</span>" +
        (e.detail ? '<span class="snip">' + esc(e.detail.slice(0, 90)) + "</span>" : "") + "</summary>" +
        '<div class="detail">' + esc(e.detail || "(no detail)") + (e.changed && Object.keys(e.changed).length
          ? "\n" + Object.keys(e.changed).map(function (k) { return k + ": " + e.changed[k][0] + " → " + e.changed[k][1]; }).join("\n") : "") +
        (e.source ? "\nsource: " + esc(e.source) : "") + "</div></details></li>";
    }).join("") || '<li class="muted">nothing happened in this window</li>';
    var w = 1000, colors = { exit: "var(--bad)", state: "var(--accent)", ladder: "var(--warn)", reload: "var(--ok)",
                             swap: "var(--swap)" };
    var rowY = { state: 10, exit: 21, ladder: 32, reload: 32, swap: 43 };
    var guides = [10, 21, 32, 43].map(function (y) {
      return '<line x1="0" x2="' + w + '" y1="' + y + '" y2="' + y + '" stroke="var(--grid)" stroke-dasharray="2 4"/>';
    }).join("");
    var marks = shown.map(function (e) {
      var x = ((e.t - from) / span * (w - 10) + 5).toFixed(1);
      return '<g class="mk" data-ev="' + e.id + '"><title>' + esc(clock(e.t) + " " + e.title + (e.detail ? ": " + e.detail : "")) +
        '</title><rect x="' + (x - 2.5) + '" y="' + (rowY[e.kind] - 5) + '" width="5" height="10" rx="1.5" fill="' +
        (e.kind === "state" && e.dst === "ready" ? "var(--ok)" : colors[e.kind]) + '"/></g>';
    }).join("");
    $("timeline-strip").innerHTML = '<svg viewBox="0 0 ' + w + ' 54" preserveAspectRatio="none">' +
      '<line x1="0" x2="' + w + '" y1="53" y2="53" stroke="var(--line)"/>' + guides + marks + "</svg>";
  }
  $("timeline-strip").addEventListener("click", function (ev) {
    var g = ev.target.closest("[data-ev]");
    if (!g) return;
    var li = $("ev-" + g.dataset.ev);
    if (!li) return;
    document.querySelectorAll(".timeline li.hl").forEach(function (x) { x.classList.remove("hl"); });
    li.classList.add("hl");
    li.querySelector("details").open = true;
    li.scrollIntoView({ block: "nearest" });
  });

  // ---- charts -------------------------------------------------------------------------------------
  var CHARTS = [
    { id: "tokens", title: "Tokens/s", re: /^(prompt|completion)_tps@/ },
    { id: "requests", title: "Requests/s by status", re: /^rps_(2xx|4xx|5xx)@/ },
    { id: "latency", title: "Latency (ms, proxied requests)", re: /^lat_p(50|90|99)@/ },
    { id: "queue", title: "Requests in flight / waiting", re: /^(in_flight|queued)@/ },
    { id: "queue_wait", title: "Queue wait (ms, mean)", re: /^queue_wait_ms@/ },
    { id: "loop", title: "Inference loop latency (ms, liveness probe)", re: /^loop_ms@/ },
    { id: "memory", title: "RSS (MB)", re: /^(sup_rss_mb|child_rss_mb@.*)$/ },
    { id: "cpu", title: "CPU (% of one core)", re: /^(sup_cpu|child_cpu@.*)$/ },
    { id: "vram", title: "VRAM used (MB, per GPU)", re: /^gpu_mem_mb@/ },
    { id: "gpu_util", title: "GPU utilisation (%, per GPU)", re: /^gpu_util@/ }
  ];
  var PALETTE = ["#2563eb", "#db2777", "#16a34a", "#ea580c", "#7c3aed", "#0891b2", "#ca8a04", "#dc2626"];
  var NICE = { prompt_tps: "prompt", completion_tps: "completion", rps_2xx: "2xx", rps_4xx: "4xx", rps_5xx: "5xx",
               lat_p50: "p50", lat_p90: "p90", lat_p99: "p99", in_flight: "in flight", queued: "waiting",
               queue_wait_ms: "wait", loop_ms: "loop", sup_rss_mb: "supervisor", child_rss_mb: "llama-server", sup_cpu: "supervisor",
               child_cpu: "llama-server", gpu_mem_mb: "GPU", gpu_util: "GPU" };

  function label(name) {
    var parts = name.split("@"), base = NICE[parts[0]] || parts[0];
    if (parts.length < 2) return base;
    if (parts[0].indexOf("gpu_") === 0) return base + " " + parts[1];
    return Object.keys(S.cards).length > 1 ? base + " · " + parts[1] : base;
  }
  function cssVar(n) { return getComputedStyle(document.documentElement).getPropertyValue(n).trim(); }

  function drawCharts() {
    var d = S.data;
    if (!d || typeof uPlot === "undefined") return;
    var names = Object.keys(d.series);
    var anyGpu = false;
    CHARTS.forEach(function (c) {
      var cols = names.filter(function (n) { return c.re.test(n); }).sort();
      if (/gpu/.test(c.id) && cols.length) anyGpu = true;
      var box = $("chart-" + c.id);
      if (!cols.length) { if (box) box.hidden = true; return; }
      if (!box) {
        box = document.createElement("figure");
        box.className = "chart";
        box.id = "chart-" + c.id;
        box.innerHTML = "<h3></h3><p class=\"empty\" hidden>no values in this window</p><div class=\"plot\" role=\"img\"></div>";
        box.querySelector("h3").textContent = c.title;
        box.querySelector(".plot").setAttribute("aria-label", c.title + " over the selected window");
        $("charts").appendChild(box);
      }
      box.hidden = false;
      var data = [d.t].concat(cols.map(function (n) { return d.series[n]; }));
      var points = 0;
      cols.forEach(function (n) { d.series[n].forEach(function (v) { if (v != null) points++; }); });
      box.dataset.points = String(points);
      box.querySelector(".empty").hidden = points > 0;
      box.dataset.series = cols.join(",");
      var ch = S.charts[c.id];
      var width = Math.max(260, box.clientWidth - 16);
      if (ch && ch.key === cols.join(",")) {
        ch.plot.setData(data);
        if (Math.abs(ch.plot.width - width) > 2) ch.plot.setSize({ width: width, height: 170 });
        return;
      }
      if (ch) ch.plot.destroy();
      var axis = { stroke: cssVar("--muted"), grid: { stroke: cssVar("--grid"), width: 1 }, ticks: { stroke: cssVar("--grid") } };
      var opts = {
        width: width, height: 170, cursor: { drag: { x: false, y: false } },
        scales: { x: { time: true } },
        axes: [Object.assign({}, axis), Object.assign({ size: 50 }, axis)],
        series: [{}].concat(cols.map(function (n, i) {
          return { label: label(n), stroke: PALETTE[i % PALETTE.length], width: 1.5, spanGaps: false,
                   value: function (u, v) { return v == null ? "–" : (Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(2)); } };
        }))
      };
      S.charts[c.id] = { key: cols.join(","), plot: new uPlot(opts, data, box.querySelector(".plot")) };
    });
    var note = $("gpu-note");
    note.hidden = anyGpu;
    note.textContent = anyGpu ? "" : "No GPU charts: " + (S.gpuUnavailable || "NVML reports no GPU") + ".";
  }

  function mergeSamples(fresh, reset) {
    if (reset || !S.data || fresh.interval_s !== S.data.interval_s) {
      S.data = fresh;
    } else {
      var d = S.data, n = d.t.length;
      Object.keys(fresh.series).forEach(function (k) {
        if (!d.series[k]) d.series[k] = new Array(n).fill(null);
      });
      d.t = d.t.concat(fresh.t);
      Object.keys(d.series).forEach(function (k) {
        d.series[k] = d.series[k].concat(fresh.series[k] || new Array(fresh.t.length).fill(null));
      });
      var from = Date.now() / 1000 - S.windowS, cut = 0;
      while (cut < d.t.length && d.t[cut] < from) cut++;
      if (cut) { d.t = d.t.slice(cut); Object.keys(d.series).forEach(function (k) { d.series[k] = d.series[k].slice(cut); }); }
    }
    if (S.data.t.length) S.sinceT = S.data.t[S.data.t.length - 1];
  }

  $("window").addEventListener("change", function () {
    S.windowS = Number($("window").value);
    S.data = null; S.sinceT = 0;
    poll();
  });
  // Axis and grid colours are read from the scheme when a chart is made: a scheme change makes them again.
  window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", function () {
    Object.keys(S.charts).forEach(function (id) { S.charts[id].plot.destroy(); delete S.charts[id]; });
    drawCharts();
  });
  window.addEventListener("resize", function () { clearTimeout(drawCharts.t); drawCharts.t = setTimeout(drawCharts, 150); });

  // ---- polling ------------------------------------------------------------------------------------
  async function getJSON(path) {
    var r = await fetch(path, { headers: headers(), cache: "no-store" });
    if (r.status === 401) { var e = new Error("admin key needed"); e.status = 401; throw e; }
    if (!r.ok) throw new Error(path + ": " + r.status);
    return r.json();
  }

  async function poll() {
    if (S.needKey) return;
    try {
      var reset = !S.data;
      var res = await Promise.all([
        getJSON("/ui/api/overview"),
        getJSON("/ui/api/events?after=" + S.lastEvent),
        getJSON("/ui/api/samples?window=" + S.windowS + (reset ? "" : "&since=" + S.sinceT))
      ]);
      var ov = res[0];
      S.gpuUnavailable = ov.gpu_unavailable;
      renderGpus(ov.gpus);
      ov.models.forEach(renderModel);
      var names = ov.models.map(function (m) { return m.profile.name; });
      Object.keys(S.cards).forEach(function (n) {  // a profile removed by a reload: its card goes too
        if (names.indexOf(n) < 0) { S.cards[n].remove(); delete S.cards[n]; }
      });
      var sup = ov.supervisor || {};
      if (S.supPid && sup.pid !== S.supPid) { S.lastEvent = 0; S.events = []; }  // a new supervisor: ids restart
      S.supPid = sup.pid;
      S.startedAt = Date.now() / 1000 - (sup.uptime_s || 0);
      $("sup-info").textContent = "v" + (sup.version || "?") + " · pid " + (sup.pid || "?") + " · up " + dur(sup.uptime_s);
      res[1].events.forEach(function (e) { S.events.push(e); S.lastEvent = Math.max(S.lastEvent, e.id); });
      if (S.events.length > 1000) S.events = S.events.slice(-1000);
      renderTimeline();
      mergeSamples(res[2], reset);
      drawCharts();
      conn(true, "live");
      window.llamaOps.onPoll.forEach(function (f) { f(); });
    } catch (e) {
      if (e.status === 401) { S.needKey = true; checkKey(); stopLogs(); return; }
      conn(false, "unreachable: " + e.message);
    }
  }

  function loop() {
    if (!document.hidden) poll();
    S.timer = setTimeout(loop, POLL_MS);
  }

  // ---- live logs (SSE over fetch, so the admin key can go in a header) -----------------------------
  var L = { lastId: null, abort: null, paused: false, held: [], retry: null };
  function stopLogs() {
    if (L.abort) L.abort.abort();
    L.abort = null;
    clearTimeout(L.retry);
  }
  function addLines(lines) {
    var box = $("logs");
    var stick = box.scrollTop + box.clientHeight >= box.scrollHeight - 30;
    var frag = document.createDocumentFragment();
    lines.forEach(function (ln) {
      var div = document.createElement("div");
      if (ln.gap) {
        div.className = "ln gap";
        div.textContent = "… " + ln.gap + " lines were missed (the ring moved on)";
      } else {
        div.className = "ln lv-" + ln.level + " src-" + ln.source;
        div.dataset.id = ln.id;
        var src = document.createElement("span");
        src.className = "src";
        src.textContent = clock(ln.t) + " " + (ln.source === "child" ? "llama-server" : "supervisor");
        div.appendChild(src);
        div.appendChild(document.createTextNode(ln.text));
      }
      frag.appendChild(div);
    });
    box.appendChild(frag);
    while (box.childElementCount > LOG_KEEP) box.removeChild(box.firstElementChild);
    if (stick) box.scrollTop = box.scrollHeight;
  }
  function onLog(ev) {
    if (L.paused) {
      L.held.push(ev);
      if (L.held.length > LOG_KEEP) L.held.shift();
      $("log-state").textContent = L.held.length + " new lines held";
    } else addLines([ev]);
  }
  async function streamLogs() {
    stopLogs();
    if (S.needKey) return;
    var ctl = new AbortController();
    L.abort = ctl;
    var h = headers();
    var url = "/logs/stream?n=300";
    if (L.lastId != null) h["Last-Event-ID"] = String(L.lastId);
    try {
      var r = await fetch(url, { headers: h, signal: ctl.signal, cache: "no-store" });
      if (r.status === 401) { S.needKey = true; checkKey(); return; }
      if (!r.ok || !r.body) throw new Error("status " + r.status);
      var reader = r.body.getReader(), dec = new TextDecoder(), buf = "";
      for (;;) {
        var chunk = await reader.read();
        if (chunk.done) break;
        buf += dec.decode(chunk.value, { stream: true });
        var parts = buf.split("\n\n");
        buf = parts.pop();
        parts.forEach(function (block) {
          var id = null, kind = "message", data = "";
          block.split("\n").forEach(function (line) {
            if (line.indexOf("id: ") === 0) id = Number(line.slice(4));
            else if (line.indexOf("event: ") === 0) kind = line.slice(7);
            else if (line.indexOf("data: ") === 0) data += line.slice(6);
          });
          if (kind === "log" && data) { onLog(JSON.parse(data)); if (id != null) L.lastId = id; }
          else if (kind === "gap" && data) onLog({ gap: JSON.parse(data).missed });
        });
      }
    } catch (e) {
      if (ctl.signal.aborted) return;
    }
    if (L.abort === ctl) L.retry = setTimeout(streamLogs, 2000);  // resumes after L.lastId (Last-Event-ID)
  }
  function toEnd() { var box = $("logs"); box.scrollTop = box.scrollHeight; }
  $("log-source").addEventListener("change", function () { $("logs").dataset.source = $("log-source").value; toEnd(); });
  $("log-level").addEventListener("change", function () { $("logs").dataset.level = $("log-level").value; toEnd(); });
  $("log-pause").addEventListener("click", function () {
    L.paused = !L.paused;
    var b = $("log-pause");
    b.setAttribute("aria-pressed", String(L.paused));
    b.textContent = L.paused ? "Resume" : "Pause";
    if (!L.paused) { addLines(L.held); L.held = []; $("log-state").textContent = ""; toEnd(); }
    else $("log-state").textContent = "paused";
  });

  // What activity.js (the Activity section) uses of this file: the key, the poll, the window.
  window.llamaOps = { esc: esc, headers: headers, toast: toast, getJSON: getJSON, checkKey: checkKey,
                      needKey: function () { return S.needKey; }, windowS: function () { return S.windowS; },
                      models: function () { return Object.keys(S.cards); }, onPoll: [] };

  // ---- start --------------------------------------------------------------------------------------
  async function start() {
    try {
      if (!(await checkKey())) return;
    } catch (e) {
      conn(false, "unreachable");
      setTimeout(start, 3000);
      return;
    }
    streamLogs();
    if (!S.polling) { S.polling = true; loop(); } else poll();
  }
  start();
})();
