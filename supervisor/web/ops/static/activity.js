/* The ops page's Activity section: the latest requests (GET /activity, refreshed with the page's poll),
   filters, one request in detail (its timings as a bar, what the supervisor did, its capture), p50/p95/p99
   per model over the page's window (GET /activity/stats), and Replay (POST /admin/activity/{id}/replay) with
   the two records side by side. The admin key and the poll come from app.js (window.llamaOps). */
(function () {
  "use strict";
  var ops = window.llamaOps;
  var $ = function (id) { return document.getElementById(id); };
  var STATS_MS = 10000;
  var A = { rows: [], selected: null, compare: null, busy: false, models: [], statsAt: 0, statsWindow: 0 };
  var esc = ops.esc;

  function ms(v) { return v == null ? "–" : v >= 10000 ? (v / 1000).toFixed(1) + " s" : Math.round(v) + " ms"; }
  function num(v, d) { return v == null ? "–" : Number(v).toFixed(d || 0); }
  function cls(status) { return status >= 500 ? "s5" : status >= 400 ? "s4" : "s2"; }

  function query() {
    var q = ["limit=100"];
    if ($("act-model").value) q.push("model=" + encodeURIComponent($("act-model").value));
    if ($("act-status").value) q.push("status=" + $("act-status").value);
    if ($("act-slow").value) q.push("min_duration_ms=" + $("act-slow").value);
    return q.join("&");
  }

  async function refresh() {
    if (A.busy || ops.needKey()) return;
    A.busy = true;
    try {
      // The percentiles read the whole window from disk: every STATS_MS, or at once for a new window.
      var statsDue = Date.now() - A.statsAt > STATS_MS || A.statsWindow !== ops.windowS();
      var res = await Promise.all([ops.getJSON("/activity?" + query()),
                                   statsDue ? ops.getJSON("/activity/stats?window=" + ops.windowS()) : null]);
      A.rows = res[0].requests;
      renderState(res[0].log);
      renderTable();
      if (res[1]) {
        renderStats(res[1].models || {});
        A.statsAt = Date.now();
        A.statsWindow = ops.windowS();
      }
    } catch (e) {
      $("act-state").textContent = "activity unavailable: " + e.message;
    } finally {
      A.busy = false;
    }
  }

  function renderState(log) {
    var el = $("act-state");
    if (!log) { el.textContent = ""; return; }
    var lost = Object.keys(log.dropped || {}).reduce(function (a, k) { return a + log.dropped[k]; }, 0);
    var text = !log.enabled ? "the activity log is off (activity: false)"
      : log.state === "ok" ? "kept on disk (" + log.days + " days, " + log.max_rows + " rows at most)"
      : "NOT written to disk: " + (log.error || log.state);
    if (lost) text += " · " + lost + " records lost (" + Object.keys(log.dropped).map(function (k) {
      return k.replace("_", " ") + " " + log.dropped[k]; }).join(", ") + ")";
    el.textContent = text;
    el.className = log.state === "ok" && !lost ? "muted" : "warn-text";
    el.dataset.state = log.state;
  }

  function renderTable() {
    var names = {};
    A.rows.forEach(function (r) { names[r.model] = 1; });
    ops.models().forEach(function (m) { names[m] = 1; });
    var sel = $("act-model"), want = Object.keys(names).sort();
    if (want.join("|") !== A.models.join("|")) {
      var cur = sel.value;
      sel.innerHTML = '<option value="">all</option>' + want.map(function (m) {
        return '<option value="' + esc(m) + '">' + esc(m) + "</option>"; }).join("");
      sel.value = cur;
      A.models = want;
    }
    var sig = A.selected + JSON.stringify(A.rows);  // unchanged: the rows stay as they are (focus, hover)
    if (sig === A.sig) return;
    A.sig = sig;
    $("act-rows").innerHTML = A.rows.map(function (r) {
      var did = (r.notes || []).concat(r.context_trimmed ? ["trimmed " + r.context_trimmed] : [])
        .concat(r.images && r.images.downscaled ? [r.images.downscaled + " image(s) downscaled"] : []);
      return '<tr data-id="' + r.id + '" tabindex="0" class="' + (A.selected === r.id ? "sel" : "") + '">' +
        "<td>" + r.id + "</td><td>" + esc(new Date(r.at).toLocaleTimeString([], { hour12: false })) + "</td>" +
        "<td>" + esc(r.model) + '</td><td class="route">' + esc(r.route) + (r.stream ? ' <span class="muted">stream</span>' : "") +
        (r.replay_of ? ' <span class="muted">replay of ' + r.replay_of + "</span>" : "") + "</td>" +
        '<td class="' + cls(r.status) + '">' + r.status + "</td><td>" + ms(r.duration_ms) + "</td><td>" + ms(r.ttft_ms) +
        "</td><td>" + num(r.prompt_tokens) + " / " + num(r.completion_tokens) + "</td><td>" + num(r.decode_tps, 1) +
        '</td><td class="did">' + esc(r.error ? r.error.slice(0, 120) : did.join("; ")) + "</td></tr>";
    }).join("") || '<tr><td colspan="10" class="muted">no requests recorded (with these filters)</td></tr>';
  }

  function renderStats(models) {
    var names = Object.keys(models);
    $("act-stats").innerHTML = names.length ? '<table class="kv"><thead><tr><th scope="col">model</th>' +
      '<th scope="col">requests</th><th scope="col">errors</th><th scope="col">TTFT p50 / p95 / p99</th>' +
      '<th scope="col">decode tok/s p50 / p95 / p99</th></tr></thead><tbody>' + names.map(function (m) {
        var s = models[m], t = s.ttft_ms, d = s.decode_tps;
        return '<tr data-model="' + esc(m) + '"><th scope="row">' + esc(m) + "</th><td>" + s.count + "</td><td>" + s.errors +
          "</td><td>" + ms(t.p50) + " / " + ms(t.p95) + " / " + ms(t.p99) + "</td><td>" + num(d.p50, 1) + " / " +
          num(d.p95, 1) + " / " + num(d.p99, 1) + "</td></tr>";
      }).join("") + "</tbody></table>" : '<p class="muted">no requests in this window</p>';
  }

  // ---- one request --------------------------------------------------------------------------------
  function bar(r) {
    var prompt = r.prompt_ms || 0, decode = r.decode_ms || 0, total = Math.max(r.duration_ms || 0, 1);
    var parts = [["queue", r.queue_ms || 0], ["load", r.load_ms || 0], ["prompt", prompt], ["decode", decode]];
    var known = parts.reduce(function (a, p) { return a + p[1]; }, 0);
    parts.push(["other", Math.max(0, total - known)]);
    var scale = Math.max(total, known);
    return '<div class="tbar" role="img" aria-label="' + parts.map(function (p) { return p[0] + " " + ms(p[1]); }).join(", ") +
      '">' + parts.filter(function (p) { return p[1] > 0; }).map(function (p) {
        return '<span class="seg seg-' + p[0] + '" style="width:' + (p[1] / scale * 100).toFixed(2) + '%" title="' +
          p[0] + " " + ms(p[1]) + '"></span>';
      }).join("") + '</div><div class="tbar-legend">' + parts.map(function (p) {
        return '<span class="lg seg-' + p[0] + '">' + p[0] + " " + ms(p[1]) + "</span>"; }).join("") + "</div>";
  }

  function facts(r) {
    var rows = [["status", r.status + (r.error ? ": " + r.error : "")], ["model", r.model], ["route", r.method + " " + r.route],
                ["at", r.at], ["client", r.client], ["stream", r.stream ? "yes" : "no"],
                ["time to first token", ms(r.ttft_ms)], ["duration", ms(r.duration_ms)],
                ["tokens in / cached / out", num(r.prompt_tokens) + " / " + num(r.cached_tokens) + " / " + num(r.completion_tokens)],
                ["prompt / decode tok/s", num(r.prompt_tps, 1) + " / " + num(r.decode_tps, 1)],
                ["finish", r.finish_reason], ["images in / downscaled", r.images.in + " / " + r.images.downscaled],
                ["context trimmed", r.context_trimmed || "no"], ["supervisor did", (r.notes || []).join("; ") || "nothing special"]];
    if (r.replay_of) rows.push(["replay of", r.replay_of]);
    return '<dl class="facts">' + rows.map(function (x) {
      return "<dt>" + esc(x[0]) + "</dt><dd>" + esc(x[1] == null ? "–" : x[1]) + "</dd>"; }).join("") + "</dl>";
  }

  function capture(r) {
    var c = r.capture;
    if (!c) return '<p class="muted">Not captured (set <code>capture: errors</code> or <code>all</code> to keep requests for replay).</p>';
    return '<details class="cap"><summary>Request as sent to llama-server' + (c.images_hashed ? " (" + c.images_hashed +
      " images kept as SHA-256 only)" : "") + "</summary><pre>" + esc(c.request) + "</pre></details>" +
      '<details class="cap" open><summary>Answer' + (c.truncated ? " (truncated)" : "") + '</summary><pre data-role="text">' +
      esc(c.text != null ? c.text : c.response) + "</pre></details>";
  }

  async function show(id) {
    A.selected = id;
    renderTable();
    var box = $("act-detail");
    try {
      var r = await ops.getJSON("/activity/" + id);
    } catch (e) {
      box.hidden = false;
      box.innerHTML = '<p class="warn-text">' + esc(e.message) + "</p>";
      return;
    }
    var canReplay = r.capture && !r.capture.truncated && !r.capture.images_hashed;
    var options = A.models.map(function (m) {
      return '<option value="' + esc(m) + '"' + (m === r.model ? " selected" : "") + ">" + esc(m) + "</option>"; }).join("");
    box.hidden = false;
    box.dataset.id = r.id;
    box.innerHTML = '<div class="section-head"><h3>Request ' + r.id + "</h3>" +
      '<button type="button" data-act="close" aria-label="Close the request\'s detail">Close</button></div>' +
      bar(r) + facts(r) + capture(r) +
      '<div class="actions"><label for="act-replay-model">Replay on</label><select id="act-replay-model">' + options + "</select>" +
      '<button type="button" data-act="replay"' + (canReplay ? "" : " disabled") + ' title="' +
      (canReplay ? "send the captured request again" : "needs a whole capture with its images (capture, capture_images)") +
      '">Replay</button></div><div id="act-compare"></div>';
    if (A.compare && A.compare[0].id === r.id) renderCompare();
  }

  async function replay(id) {
    var model = $("act-replay-model").value;
    var r;
    try {
      r = await fetch("/admin/activity/" + id + "/replay" + (model ? "?model=" + encodeURIComponent(model) : ""),
                      { method: "POST", headers: ops.headers() });
    } catch (e) {
      ops.toast("Could not reach the supervisor: " + e.message, false);
      return;
    }
    var body = {};
    try { body = await r.json(); } catch (e) { /* the status says enough */ }
    if (!r.ok) {
      ops.toast("Replay refused (" + r.status + "): " + ((body.error && body.error.message) || r.statusText), false);
      if (r.status === 401) ops.checkKey();
      return;
    }
    ops.toast("Replayed " + id + " as " + body.id, true);
    var both = await Promise.all([ops.getJSON("/activity/" + id), settled(body.id)]);
    A.compare = both;
    renderCompare();
    refresh();
  }

  // A new record's numbers and capture are written by the log's own thread a moment after the answer.
  async function settled(id) {
    for (var i = 0; ; i++) {
      var r = await ops.getJSON("/activity/" + id);
      if (r.on_disk || i >= 20) return r;
      await new Promise(function (ok) { setTimeout(ok, 150); });
    }
  }

  function renderCompare() {
    var a = A.compare[0], b = A.compare[1], box = $("act-compare");
    if (!box) return;
    var rows = [["status", "status"], ["model", "model"], ["TTFT", "ttft_ms", ms], ["duration", "duration_ms", ms],
                ["tokens out", "completion_tokens", num], ["decode tok/s", "decode_tps", function (v) { return num(v, 1); }],
                ["finish", "finish_reason"]];
    var text = function (r) { return r.capture ? (r.capture.text != null ? r.capture.text : r.capture.response) : "(not captured)"; };
    box.innerHTML = '<table class="kv compare" id="act-compare-table"><thead><tr><th scope="col"></th><th scope="col">request ' + a.id +
      '</th><th scope="col">replay ' + b.id + "</th></tr></thead><tbody>" + rows.map(function (x) {
        var f = x[2] || function (v) { return v == null ? "–" : v; };
        return '<tr><th scope="row">' + x[0] + "</th><td>" + esc(f(a[x[1]])) + '</td><td data-key="' + x[1] + '">' +
          esc(f(b[x[1]])) + "</td></tr>";
      }).join("") + '<tr><th scope="row">text</th><td><pre>' + esc(text(a)) + "</pre></td><td><pre>" + esc(text(b)) +
      "</pre></td></tr></tbody></table>";
  }

  $("act-rows").addEventListener("click", function (ev) {
    var tr = ev.target.closest("tr[data-id]");
    if (tr) show(Number(tr.dataset.id));
  });
  $("act-rows").addEventListener("keydown", function (ev) {
    var tr = ev.target.closest("tr[data-id]");
    if (tr && (ev.key === "Enter" || ev.key === " ")) { ev.preventDefault(); show(Number(tr.dataset.id)); }
  });
  $("act-detail").addEventListener("click", function (ev) {
    var b = ev.target.closest("button[data-act]");
    if (!b) return;
    if (b.dataset.act === "close") { $("act-detail").hidden = true; A.selected = null; A.compare = null; renderTable(); }
    else if (b.dataset.act === "replay") replay(Number($("act-detail").dataset.id));
  });
  ["act-model", "act-status", "act-slow"].forEach(function (id) { $(id).addEventListener("change", refresh); });
  ops.onPoll.push(refresh);
})();
