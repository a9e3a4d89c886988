/* The fleet page: one row per device; a click opens the device's charts (/devices/<id>). */
(function () {
  "use strict";
  function esc(s) {
    return String(s === null || s === undefined ? "" : s).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }
  function ago(now, ts) {
    if (ts === null || ts === undefined) return "-";
    var s = Math.max(0, now - ts);
    if (s < 90) return Math.round(s) + " s ago";
    if (s < 5400) return Math.round(s / 60) + " min ago";
    if (s < 172800) return (s / 3600).toFixed(1) + " h ago";
    return (s / 86400).toFixed(1) + " d ago";
  }
  function fmtTime(ts) {
    return ts === null || ts === undefined ? "-" : new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z";
  }
  function alerts(counts) {
    var out = ["critical", "warning"].filter(function (s) { return counts[s]; }).map(function (s) {
      return '<span class="sev sev-' + s + '">' + counts[s] + " " + s + "</span>";
    });
    return out.join(" ") || '<span class="dim">none</span>';
  }
  function risk(p) {
    if (p === null || p === undefined) return '<span class="dim">-</span>';
    var cls = p >= 0.5 ? "risk-high" : p >= 0.2 ? "risk-mid" : "";
    return '<span class="' + cls + '">' + Math.round(p * 100) + " %</span>";
  }
  function cluster(c) {
    if (!c) return '<span class="dim">-</span>';
    var text = c.distance.toPrecision(3) + (c.radius ? " / " + c.radius.toPrecision(3) : "");
    var cls = c.ratio !== null && c.ratio > 1 ? "risk-high" : "";
    return '<span class="' + cls + '">' + esc(text) + (c.ratio !== null && c.ratio > 1 ? " outside" : "") + "</span>";
  }
  function render(doc) {
    var tbody = document.querySelector("#devices tbody");
    tbody.innerHTML = doc.devices.map(function (d) {
      var models = d.models.map(function (m) { return esc(m.kind) + " v" + esc(m.version); }).join(", ");
      return '<tr class="device" data-device="' + esc(d.device_id) + '"><td><a href="/devices/' +
        encodeURIComponent(d.device_id) + '">' + esc(d.device_id) + "</a></td><td>" +
        '<span class="dot ' + (d.online ? "on" : "off") + '"></span>' + (d.online ? "online" : "offline") +
        "</td><td>" + esc(ago(doc.now, d.last_seen_s)) + "</td><td>" + alerts(d.open_alerts) + "</td><td>" +
        risk(d.failure_risk_24h) + "</td><td>" + cluster(d.cluster) + "</td><td>" +
        (models || '<span class="dim">-</span>') + "</td><td>" + esc(d.agent_version || "-") + "</td></tr>";
    }).join("");
    Array.prototype.forEach.call(tbody.querySelectorAll("tr.device"), function (tr) {
      tr.addEventListener("click", function () {
        location.href = "/devices/" + encodeURIComponent(tr.getAttribute("data-device"));
      });
    });
    var total = doc.open_alerts;
    document.getElementById("badges").innerHTML =
      '<span class="badge ok">' + doc.online + " / " + doc.devices.length + " online</span>" +
      (total.critical ? '<span class="badge bad">' + total.critical + " critical open</span>" : "") +
      (total.warning ? '<span class="badge warn">' + total.warning + " warning open</span>" : "");
    var rows = doc.recent_alerts.map(function (e) {
      return "<tr><td>" + fmtTime(e.start_s) + "</td><td>" + esc(e.device_id) + '</td><td><span class="sev sev-' +
        esc(e.severity) + '">' + esc(e.severity) + "</span></td><td>" + esc(e.state) + "</td><td>" +
        esc(e.features.join(", ")) + "</td><td>" + esc(e.explanation || "") + "</td></tr>";
    });
    document.getElementById("alerts").innerHTML = rows.length
      ? '<table class="grid"><thead><tr><th>start</th><th>device</th><th>severity</th><th>state</th><th>metrics</th>' +
        "<th>explanation</th></tr></thead><tbody>" + rows.join("") + "</tbody></table>"
      : '<p class="dim">No anomaly events.</p>';
    document.body.setAttribute("data-devices", String(doc.devices.length));
    document.body.setAttribute("data-ready", "1");
  }
  fetch("/api/fleet", { credentials: "same-origin" }).then(function (r) {
    if (!r.ok) throw new Error("fleet: HTTP " + r.status);
    return r.json();
  }).then(render).catch(function (e) { console.error("edge-fleet page: " + e.message); });
})();
