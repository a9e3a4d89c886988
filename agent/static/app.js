/* The device view: one chart per metric (history, forecast with 80/95 % bands, anomaly
   episodes as spans coloured by severity, exhaustion ETA), the device's status and its events.
   The same code draws the live page (data from /api/...), the fleet's device view
   (/api/devices/<id>/...) and the static report (data inlined as window.EDGE_DATA). */
(function () {
  "use strict";

  var RANGES = [["1h", 3600], ["6h", 6 * 3600], ["24h", 86400], ["7d", 7 * 86400]];
  var COLORS = { history: "#2563eb", forecast: "#7c3aed", band80: "rgba(124,58,237,0.22)",
                 band95: "rgba(124,58,237,0.10)", limit: "#dc2626" };

  // -- data sources --------------------------------------------------------------------------
  function liveSource(base) {
    return {
      live: true,
      get: function (name, params) {
        var q = new URLSearchParams();
        Object.keys(params || {}).forEach(function (k) {
          if (params[k] !== null && params[k] !== undefined) q.set(k, params[k]);
        });
        var url = base + "/" + name + (q.toString() ? "?" + q.toString() : "");
        return fetch(url, { credentials: "same-origin" }).then(function (r) {
          if (!r.ok) throw new Error(name + ": HTTP " + r.status);
          return r.json();
        });
      }
    };
  }

  function staticSource(data) {
    return { live: false, get: function (name) { return Promise.resolve(data[name]); } };
  }

  // -- formatting ----------------------------------------------------------------------------
  function esc(s) {
    return String(s === null || s === undefined ? "" : s).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }
  function fmtTime(ts) {
    if (ts === null || ts === undefined) return "-";
    return new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z";
  }
  function fmtDuration(s) {
    if (s === null || s === undefined || !isFinite(s)) return "-";
    s = Math.abs(s);
    if (s < 90) return Math.round(s) + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    if (s < 172800) return (s / 3600).toFixed(1) + " h";
    return (s / 86400).toFixed(1) + " d";
  }
  function unitOf(metric) {
    var base = metric.split(":")[0];
    if (/Percent$|cpuUsage/.test(base)) return "%";
    if (/PerSec$/.test(base)) return "B/s";
    if (/temperature$/.test(base)) return "°C";
    if (/(Used|Total|Bytes)$/.test(base)) return "B";
    return "";
  }
  function fmtValue(v, unit, axis) {
    if (v === null || v === undefined || !isFinite(v)) return "-";
    var a = Math.abs(v);
    if (axis && unit !== "B" && unit !== "B/s") return String(+v.toPrecision(3)) + (unit ? " " + unit : "");
    if (unit === "B" || unit === "B/s") {
      var units = ["", "k", "M", "G", "T"], i = 0;
      while (a >= 1000 && i < units.length - 1) { a /= 1000; v /= 1000; i++; }
      return v.toFixed(a < 10 ? 2 : 1) + " " + units[i] + unit;
    }
    return (a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : v.toFixed(2)) + (unit ? " " + unit : "");
  }

  // -- chart data ----------------------------------------------------------------------------
  /* One x array for history and forecast: the union of both time axes.  A value missing
     only because the other series has a point there is `undefined` (uPlot joins the line
     across it); a real gap in the history stays `null` (uPlot breaks the line). */
  function align(histT, histV, fc) {
    var fcT = fc ? fc.t : [];
    var xs = [], i = 0, j = 0;
    var out = { x: xs, hist: [], value: [], l80: [], u80: [], l95: [], u95: [] };
    while (i < histT.length || j < fcT.length) {
      var takeH = j >= fcT.length || (i < histT.length && histT[i] <= fcT[j]);
      var takeF = i >= histT.length || (j < fcT.length && fcT[j] <= histT[i]);
      xs.push(takeH ? histT[i] : fcT[j]);
      out.hist.push(takeH ? histV[i] : undefined);
      if (takeF) {
        out.value.push(fc.value[j]); out.l80.push(fc.lower_80[j]); out.u80.push(fc.upper_80[j]);
        out.l95.push(fc.lower_95[j]); out.u95.push(fc.upper_95[j]);
      } else {
        [out.value, out.l80, out.u80, out.l95, out.u95].forEach(function (a) { a.push(undefined); });
      }
      if (takeH) i++;
      if (takeF) j++;
    }
    return out;
  }

  function spansFor(metric, events, x0, x1) {
    return events.filter(function (e) {
      return e.kind === "anomaly" && e.start_s !== null && (e.end_s === null || e.end_s >= x0) && e.start_s <= x1;
    }).map(function (e) {
      return { e: e, involved: !e.features.length || e.features.indexOf(metric) >= 0 };
    });
  }

  function drawSpans(u, spans) {
    var over = u.over;
    Array.prototype.slice.call(over.querySelectorAll(".anomaly-span")).forEach(function (n) { n.remove(); });
    var xmax = u.scales.x.max, xmin = u.scales.x.min;
    spans.forEach(function (s) {
      var start = Math.max(s.e.start_s, xmin), end = Math.min(s.e.end_s === null ? xmax : s.e.end_s, xmax);
      if (end < xmin || start > xmax) return;
      var left = u.valToPos(start, "x"), right = u.valToPos(end, "x");
      var div = document.createElement("div");
      div.className = "anomaly-span sev-" + (s.e.severity || "warning") + (s.involved ? " involved" : "");
      div.style.left = left + "px";
      div.style.width = Math.max(3, right - left) + "px";
      div.title = (s.e.severity || "") + " " + fmtTime(s.e.start_s) + " .. " +
        (s.e.end_s === null ? "open" : fmtTime(s.e.end_s)) + (s.e.explanation ? "\n" + s.e.explanation : "");
      over.appendChild(div);
    });
  }

  function drawLimit(u, limit) {
    if (limit === null || limit === undefined) return;
    var y = u.valToPos(limit, "y", true);
    if (y < u.bbox.top || y > u.bbox.top + u.bbox.height) return;
    var ctx = u.ctx;
    ctx.save();
    ctx.strokeStyle = COLORS.limit;
    ctx.setLineDash([6, 4]);
    ctx.lineWidth = 1.5 * uPlot.pxRatio;
    ctx.beginPath();
    ctx.moveTo(u.bbox.left, y);
    ctx.lineTo(u.bbox.left + u.bbox.width, y);
    ctx.stroke();
    ctx.restore();
  }

  function makeChart(card, metric, t, v, fc, events, width) {
    var unit = unitOf(metric);
    var d = align(t, v, fc);
    var el = card.querySelector(".chart");
    var spans = spansFor(metric, events, d.x[0], d.x[d.x.length - 1]);
    var fmt = function (u, x) { return fmtValue(x, unit); };
    var hidden = { stroke: "rgba(0,0,0,0)", points: { show: false } };
    var series = [{}, { label: metric, stroke: COLORS.history, width: 1.25, value: fmt }];
    var data = [d.x, d.hist];
    if (fc) {
      series.push({ label: "forecast", stroke: COLORS.forecast, width: 1.5, dash: [5, 3], value: fmt },
                  Object.assign({ label: "80 % low" }, hidden), Object.assign({ label: "80 % high" }, hidden),
                  Object.assign({ label: "95 % low" }, hidden), Object.assign({ label: "95 % high" }, hidden));
      data.push(d.value, d.l80, d.u80, d.l95, d.u95);
    }
    var opts = {
      width: width, height: 190,
      legend: { show: true, live: true },
      cursor: { drag: { x: true, y: false } },
      scales: { x: { time: true } },
      axes: [{}, { size: 84, values: function (u, vals) { return vals.map(function (x) { return fmtValue(x, unit, true); }); } }],
      series: series,
      bands: fc ? [{ series: [6, 5], fill: COLORS.band95 }, { series: [4, 3], fill: COLORS.band80 }] : [],
      hooks: {
        draw: [function (u) { drawSpans(u, spans); if (fc) drawLimit(u, fc.limit_value); }],
        drawSeries: [function (u, i) { card.setAttribute("data-drawn-" + (i === 1 ? "history" : i === 2 ? "forecast" : "band"), "1"); }]
      }
    };
    var u = new uPlot(opts, data, el);
    card.setAttribute("data-points", String(t.length));
    card.setAttribute("data-spans", String(spans.length));
    card.setAttribute("data-forecast", fc && fc.t.length ? "1" : "0");
    return u;
  }

  // -- page ------------------------------------------------------------------------------------
  function badge(text, cls) { return '<span class="badge ' + cls + '">' + esc(text) + "</span>"; }

  function renderStatus(st, meta) {
    var badges = [];
    if (st.online !== undefined) badges.push(st.online ? badge("online", "ok") : badge("offline", "bad"));
    if (st.running !== undefined) badges.push(st.running ? badge("running", "ok") : badge("not running", "bad"));
    if (st.mqtt) badges.push(st.mqtt.connected ? badge("MQTT connected", "ok") : badge("MQTT disconnected", "warn"));
    if (st.health) badges.push(st.health.ok ? badge("healthy", "ok") : badge("unhealthy", "bad"));
    document.getElementById("badges").innerHTML = badges.join(" ");
    var models = (st.models || []).map(function (m) {
      return esc(m.kind) + " v" + esc(m.version) + (m.health ? " (" + esc(m.health) + ")" : "") +
        (m.target ? ' <span class="dim">' + esc(m.target) + "</span>" : "");
    }).join("<br>") || '<span class="dim">none</span>';
    var s = st.samples || meta.samples || {};
    var rows = [
      ["samples", (s.count !== undefined ? s.count : "-") + ' <span class="dim">' + fmtTime(s.oldest) + " .. " + fmtTime(s.newest) + "</span>"],
      ["models", models]
    ];
    if (st.outbox) rows.push(["outbox", "depth " + esc(st.outbox.depth) + ", dropped " + esc(st.outbox.dropped)]);
    if (st.last_seen_s !== undefined) rows.push(["last seen", fmtTime(st.last_seen_s)]);
    if (st.agent_version) rows.push(["agent", esc(st.agent_version)]);
    if (st.health && st.health.problems && st.health.problems.length) {
      rows.push(["problems", st.health.problems.map(function (p) { return esc(p.message); }).join("<br>")]);
    }
    (st.extra || []).forEach(function (r) { rows.push([esc(r[0]), esc(r[1])]); });
    return '<table class="kv">' + rows.map(function (r) { return "<tr><th>" + r[0] + "</th><td>" + r[1] + "</td></tr>"; }).join("") + "</table>";
  }

  function renderEvents(evs) {
    if (!evs.length) return '<p class="dim">No events in this range.</p>';
    var rows = evs.slice().reverse().slice(0, 200).map(function (e) {
      var dur = e.end_s !== null && e.start_s !== null ? fmtDuration(e.end_s - e.start_s) : (e.state === "open" ? "open" : "-");
      return '<tr class="ev sev-' + esc(e.severity) + '"><td>' + fmtTime(e.start_s) + "</td><td>" + esc(e.kind) +
        '</td><td><span class="sev sev-' + esc(e.severity) + '">' + esc(e.severity || "-") + "</span></td><td>" + esc(dur) +
        "</td><td>" + esc(e.features.join(", ")) + "</td><td>" + esc(e.explanation || e.message || "") + "</td></tr>";
    });
    return '<table class="grid"><thead><tr><th>start</th><th>kind</th><th>severity</th><th>duration</th><th>metrics</th>' +
      "<th>explanation</th></tr></thead><tbody>" + rows.join("") + "</tbody></table>";
  }

  function etaText(fc, unit) {
    if (!fc || fc.eta_s === null || fc.eta_s === undefined) return "";
    var range = fc.eta_lower_s !== null && fc.eta_upper_s !== null
      ? " (" + fmtDuration(fc.eta_lower_s) + " .. " + fmtDuration(fc.eta_upper_s) + ")" : "";
    return "reaches " + fmtValue(fc.limit_value, unit) + " in ~" + fmtDuration(fc.eta_s) + range +
      " (at " + fmtTime(fc.made_at + fc.eta_s) + ")";
  }

  function lastValue(vals) {
    for (var i = vals.length - 1; i >= 0; i--) if (vals[i] !== null && vals[i] !== undefined) return vals[i];
    return null;
  }

  function renderCharts(meta, series, forecast, events) {
    var root = document.getElementById("charts");
    root.innerHTML = "";
    var byMetric = {};
    (forecast.forecasts || []).forEach(function (f) { byMetric[f.metric] = f; });
    var width = Math.max(320, root.clientWidth - 34);
    var charts = [];
    Object.keys(series.series).forEach(function (metric) {
      var vals = series.series[metric];
      if (!vals.some(function (x) { return x !== null; }) && !byMetric[metric]) return;
      var fc = byMetric[metric] || null;
      var unit = unitOf(metric);
      var card = document.createElement("div");
      card.className = "panel chart-card";
      card.setAttribute("data-metric", metric);
      var score = fc && fc.score && fc.score.mase !== null ? ", MASE " + fc.score.mase.toFixed(2) +
        (fc.score.coverage_80 !== null ? ", 80 % coverage " + Math.round(fc.score.coverage_80 * 100) + " %" : "") : "";
      card.innerHTML = '<div class="chart-head"><h3>' + esc(metric) + '</h3><span class="now">' +
        esc(fmtValue(lastValue(vals), unit)) + "</span>" +
        (fc ? '<span class="dim">forecast ' + esc(fc.model || "") + (fc.version ? " v" + esc(fc.version) : "") + esc(score) + "</span>" : "") +
        (etaText(fc, unit) ? '<span class="eta">' + esc(etaText(fc, unit)) + "</span>" : "") +
        (series.downsampled ? '<span class="dim">min/max of ' + esc(fmtDuration(series.bucket_s)) + " buckets</span>" : "") +
        '</div><div class="chart"></div>';
      root.appendChild(card);
      charts.push(makeChart(card, metric, series.t, vals, fc, events, width));
    });
    if (!charts.length) root.innerHTML = '<div class="panel dim">No samples in this range.</div>';
    return charts;
  }

  function apiBase() {
    var m = location.pathname.match(/^\/devices\/([^/]+)\/?$/);
    return m ? "/api/devices/" + m[1] : "/api";
  }

  function load(source, rangeS) {
    var t0 = performance.now();
    document.body.removeAttribute("data-ready");
    return Promise.all([source.get("meta"), source.get("status")]).then(function (r) {
      var meta = r[0], st = r[1];
      document.getElementById("device").textContent = meta.device_id || st.device_id || "edge-agent";
      document.title = (meta.device_id || "device") + " - edge-agent";
      document.getElementById("summary").innerHTML = renderStatus(st, meta);
      var newest = meta.samples.newest;
      var params = {};
      if (source.live && newest !== null) {
        params = { since: newest - rangeS, until: newest,
                   points: Math.min(meta.max_points || 2000, Math.max(200, 2 * document.getElementById("charts").clientWidth)) };
        params.metrics = meta.metrics.join(",");
      }
      return Promise.all([source.get("series", params), source.get("forecast", { until: params.until }),
                          source.get("events", { since: params.since, until: params.until })]).then(function (d) {
        var charts = renderCharts(meta, d[0], d[1], (d[2].events || []));
        document.getElementById("events").innerHTML = renderEvents(d[2].events || []);
        var loadMs = performance.now() - t0;
        document.body.setAttribute("data-charts", String(charts.length));
        document.body.setAttribute("data-load-ms", loadMs.toFixed(0));
        document.body.setAttribute("data-ready", "1");
        window.__edgeCharts = charts;
        return charts;
      });
    });
  }

  function rangeFromHash() {
    var m = location.hash.match(/range=(\w+)/);
    var found = RANGES.filter(function (r) { return m && r[0] === m[1]; })[0];
    return found || RANGES[1];
  }

  function start() {
    var data = window.EDGE_DATA;
    var source = data ? staticSource(data) : liveSource(apiBase());
    if (location.search.indexOf("token=") >= 0 && history.replaceState) {
      history.replaceState(null, "", location.pathname + location.hash);  // the cookie carries it now
    }
    if (apiBase() !== "/api") document.getElementById("fleet-link").hidden = false;
    var nav = document.getElementById("ranges");
    var current = rangeFromHash();
    var charts = [];
    function go(r) {
      current = r;
      Array.prototype.forEach.call(nav.querySelectorAll("button"), function (b) {
        b.classList.toggle("active", b.getAttribute("data-range") === r[0]);
      });
      charts.forEach(function (c) { c.destroy(); });
      return load(source, r[1]).then(function (c) { charts = c; });
    }
    if (source.live) {
      RANGES.forEach(function (r) {
        var b = document.createElement("button");
        b.textContent = r[0];
        b.setAttribute("data-range", r[0]);
        b.addEventListener("click", function () { location.hash = "range=" + r[0]; });
        nav.appendChild(b);
      });
      window.addEventListener("hashchange", function () { go(rangeFromHash()); });
    } else {
      document.getElementById("generated").textContent = "Report generated " + fmtTime(data.generated_at) +
        ", range " + fmtTime(data.series.since) + " .. " + fmtTime(data.series.until) + ".";
    }
    go(current).catch(function (e) {
      console.error("edge-agent page: " + (e && e.message ? e.message : e));
      document.getElementById("charts").innerHTML = '<div class="panel bad">Cannot load data: ' + esc(e && e.message) + "</div>";
    });
    var resizeTimer = null;
    window.addEventListener("resize", function () {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(function () {
        var w = Math.max(320, document.getElementById("charts").clientWidth - 34);
        charts.forEach(function (c) { c.setSize({ width: w, height: 190 }); });
      }, 150);
    });
  }

  window.EdgeView = { align: align, fmtValue: fmtValue, fmtTime: fmtTime, fmtDuration: fmtDuration, esc: esc };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
